"""llama.cpp's context shift, as llama.cpp's own examples do it: when the next chunk would not fit,
drop the older half of what follows the first n_keep tokens and slide the rest down."""

from __future__ import annotations

from typing import Any

import llama_cpp.llama_cpp as C


class ContextShifter:
    """Makes room in a cache of kv_budget cells; positions stay below kv_budget."""

    def __init__(self, kv_budget: int, n_keep: int) -> None:
        self.kv_budget, self.n_keep = kv_budget, n_keep
        self.evicted = 0

    def make_room(self, mem: Any, seq: int, next_pos: int, m: int) -> int:
        """Shift until m more tokens fit; returns the new next_pos."""
        n_keep = self.n_keep
        while next_pos + m > self.kv_budget:  # the budget, not n_ctx: llama.cpp pads n_ctx up to 256 cells
            n_discard = (next_pos - n_keep) // 2
            if n_discard <= 0:
                raise RuntimeError(
                    f"context shift cannot make room for {m} tokens (kv_budget {self.kv_budget}, n_keep {n_keep})"
                )
            C.llama_memory_seq_rm(mem, seq, n_keep, n_keep + n_discard)
            C.llama_memory_seq_add(mem, seq, n_keep + n_discard, next_pos, -n_discard)
            next_pos -= n_discard
            self.evicted += n_discard
        return next_pos
