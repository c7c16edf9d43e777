"""llama.cpp's context shift, what llama.cpp users get today.

Keeps the first `n_keep` tokens; when the cache is full, drops the older half of the rest and
shifts the remaining positions down with llama_memory_seq_add (K is re-rotated). No attention is
read and no native state is used. Needs a cache that can shift: iSWA models (Gemma 3) cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymorph_edge.policies.base import KVPolicy


@dataclass
class ContextShift(KVPolicy):
    """llama.cpp's context shift: when full, drop the older half after the first `n_keep` tokens and shift.

    Parameters
    ----------
    n_keep : int, default 4
        First tokens never dropped.
    """

    n_keep: int = 4

    name = "context_shift"
    shifts = True

    def __post_init__(self) -> None:
        if isinstance(self.n_keep, bool) or not isinstance(self.n_keep, int) or self.n_keep < 0:
            raise ValueError(f"n_keep must be an int >= 0, got {self.n_keep!r}")

    @property
    def protected_recent(self) -> int:
        return self.n_keep

    def cells_needed(self, kv_budget: int, n_ubatch: int) -> int:
        if kv_budget <= self.n_keep + n_ubatch:
            raise ValueError(
                f"kv_budget={kv_budget} must exceed n_keep + n_ubatch = {self.n_keep + n_ubatch} "
                "for context_shift, so that a prompt chunk fits after a shift"
            )
        return kv_budget  # positions never pass kv_budget: the shift makes room before each chunk

    def native_fields(self) -> dict[str, int | float | str]:
        return {}
