"""The engine's side of recall (engine/recall.py): logging each ubatch's keys, the query probe, and decoding a
recalled block. A mixin of KVEngine, kept apart so the decode loop reads as the decode loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import llama_cpp.llama_cpp as C
import numpy as np

from pymorph_edge.engine.key_log import KeyLog
from pymorph_edge.engine.recall_keys import QUERY_TOKENS, key_layers

if TYPE_CHECKING:
    from pymorph_edge.engine.kv_engine import KVEngine
    from pymorph_edge.engine.recall import PendingBlock

SEQ = 0  # one sequence per context (kv_engine re-exports it)
# a restored run decoded at its new positions, its K re-rotated by the scorer, rather than moved by llama.cpp's
# whole-cache K shift (False: the shift, as before; tests compare the two)
ROTATE_ON_RESTORE = True


class RecallDecoding:
    def decode_block(self: KVEngine, block: Sequence[int], lpos: Sequence[int]) -> None:
        """Decode a recalled block at the next positions (engine/recall.py): pinned until release_pin, outside the
        token sequence (history, log and n_past are untouched), then evicted down to the budget."""
        if self.scorer is None:
            raise RuntimeError("only a natively scored cache can take a recalled block")
        m = len(block)
        if not 0 < m <= self.n_batch:
            raise ValueError(f"a recalled block must have 1..{self.n_batch} tokens, got {m}")
        if self.compacts and self.next_pos + m > self.max_span:
            self.compact()
        lo = self.next_pos
        self.consistent = False
        self.scorer.set_pins(self.n_keep, lo, lo + m)
        self._decode_ubatch(block, lo, False, False)
        self.scorer.mark_recalled(lo, list(lpos))
        self.next_pos += m
        self.tokens_decoded += m
        self.scorer.evict(self.mem, SEQ, self.next_pos)
        self.consistent = True

    def _check_block(
        self: KVEngine, block: PendingBlock | None, n: int, step: int, on_logits: Callable[[int, int], None] | None
    ) -> int:
        """The length of the block decode() carries in its first chunk (0: none), once it is known to fit there."""
        if block is None:
            return 0
        if self.scorer is None:
            raise RuntimeError("only a natively scored cache can take a recalled block")
        m = len(block.tokens)
        if on_logits is not None:  # the hook reads the chunk's rows as the prompt's: a block among them would shift it
            raise ValueError("a recalled block cannot ride in a chunk whose every logit row is read")
        if not (0 < m and 0 <= block.at <= n and block.at + m <= step):
            raise ValueError(
                f"a recalled block of {m} tokens after {block.at} of {n} does not fit a {step}-token chunk"
            )
        return m

    def _decode_with_block(
        self: KVEngine, chunk: Sequence[int], block: PendingBlock, logits: bool, last_chunk: bool, superseded: bool
    ) -> None:
        """decode()'s first chunk with the recalled block after its first block.at tokens, in one ubatch: the block
        takes the positions between them and its own logical positions, is pinned until release_pin, and is kept
        out of the sequence (history, log and key log); next_pos moves past the block, the caller moves it past the
        chunk. A block's share of the ubatch's time, by tokens, goes to recall's counters."""
        assert self.scorer is not None
        at, m, b = block.at, len(chunk), len(block.tokens)
        lo = self.next_pos + at
        self.scorer.set_pins(self.n_keep, lo - block.pin_back, lo + b)
        t0 = time.perf_counter()
        self._decode_ubatch(
            [*chunk[:at], *block.tokens, *chunk[at:]], self.next_pos, logits, last_chunk, superseded=superseded
        )
        self.scorer.mark_recalled(lo, list(block.lpos))
        if self._logs_keys:
            self._log_keys(self.n_past, m, skip=(at, b))
        self.next_pos += b
        self.tokens_decoded += b
        block.landed((time.perf_counter() - t0) * b / (b + m))

    def restorable(self: KVEngine, runs: list[tuple[int, int]]) -> bool:
        """Whether every token of these runs of logical positions has saved KV at consecutive positions."""
        if self.scorer is None or not self.kv_store_bytes:
            return False
        for lo, hi in runs:
            self.scorer.kvstore_save_live(list(range(lo, hi)))  # the kept part of a half-kept sentence
            pos = self.scorer.kvstore_arm(list(range(lo, hi)))
            if pos is None or pos != list(range(pos[0], pos[0] + hi - lo)):
                return False
        return True

    def restore_block(
        self: KVEngine, prefix: Sequence[int], runs: list[tuple[int, int]], suffix: Sequence[int], lpos: Sequence[int]
    ) -> None:
        """A recalled block at the next positions as decode_block puts it, but with the runs' tokens restored
        from their saved KV: only the wrap's prefix and suffix are decoded."""
        assert self.scorer is not None
        m = len(prefix) + sum(hi - lo for lo, hi in runs) + len(suffix)
        if self.compacts and self.next_pos + m > self.max_span:
            self.compact()
        lo_pos = self.next_pos
        self.consistent = False
        self.scorer.set_pins(self.n_keep, lo_pos, lo_pos + m)
        for part in (prefix, None, suffix):
            if part is None:
                self._restore_each(runs)
            elif part:
                self._decode_ubatch(list(part), self.next_pos, False, False)
                self.next_pos += len(part)
                self.tokens_decoded += len(part)
        self.scorer.mark_recalled(lo_pos, list(lpos))
        self.scorer.evict(self.mem, SEQ, self.next_pos)
        self.consistent = True

    def restore_runs(self: KVEngine, runs: list[tuple[int, int]], lpos: Sequence[int], pinned_before: int) -> None:
        """Restore these runs from their saved KV at the next positions as part of a recalled block whose first
        pinned_before tokens are the cache's last: pinned with them, then evicted down to the budget (recall.py's
        _restore_riding; restorable() said they are all saved)."""
        assert self.scorer is not None
        m = sum(hi - lo for lo, hi in runs)
        if self.compacts and self.next_pos + m > self.max_span:
            self.compact()  # the pinned part stays one run of positions: it is live
        lo_pos = self.next_pos
        self.consistent = False
        self.scorer.set_pins(self.n_keep, lo_pos - pinned_before, lo_pos + m)
        self._restore_each(runs)
        self.scorer.mark_recalled(lo_pos, list(lpos))
        self.scorer.evict(self.mem, SEQ, self.next_pos)
        self.consistent = True

    def _restore_each(self: KVEngine, runs: list[tuple[int, int]]) -> None:
        """Restore runs of logical positions one after another at the next positions (restorable() said they are
        all saved, so one that is not is an error, not a fallback: the block's positions are already pinned)."""
        for lo, hi in runs:
            if not self.restore_run(list(range(lo, hi)), self.log.tokens(lo, hi), self.next_pos):
                raise RuntimeError(f"saved KV of tokens [{lo}, {hi}) went missing while restoring")
            self.next_pos += hi - lo

    def restore_run(self: KVEngine, lpos: list[int], tokens: Sequence[int], pos_new: int) -> bool:
        """Put evicted tokens (one run of logical positions, with their ids) back at positions pos_new.. from
        their saved K/V rows (EngineConfig(recall_kv_bytes), resolved as kv_store_bytes), without recomputing
        them. False (nothing done) when not all are saved, or their saved positions are not one run. The caller
        keeps `consistent` (restore_block clears it for the whole block). See native/pme_kvstore.c."""
        if self.scorer is None or not self.kv_store_bytes or not 0 < len(lpos) <= self.n_batch:
            return False
        pos = self.scorer.kvstore_arm(list(lpos))
        m = len(lpos)
        if pos is None or pos != list(range(pos[0], pos[0] + m)):
            return False
        # on the empty second sequence, which takes any start (tests/test_llama_cpp_facts.py). Where the scorer can
        # re-rotate the saved K rows as it writes them (native/pme_kvrotate.c), at their new positions at once;
        # elsewhere at their saved ones, then moved, and llama.cpp re-rotates the K of the whole cache next decode
        rotates = ROTATE_ON_RESTORE and self.scorer.kvstore_rotates()
        self._decode_ubatch(tokens, pos_new if rotates else pos[0], False, False, restore=True)
        if not rotates:
            C.llama_memory_seq_add(self.mem, SEQ + 1, pos[0], pos[0] + m, pos_new - pos[0])
        C.llama_memory_seq_cp(self.mem, SEQ + 1, SEQ, -1, -1)
        C.llama_memory_seq_rm(self.mem, SEQ + 1, -1, -1)
        self.scorer.kvstore_place(pos_new, list(lpos))
        return True

    def close_gap(self: KVEngine) -> None:
        """After a truncation whose token before is evicted (a 1-token window, TOVA's): llama.cpp takes the next
        batch only right after its newest cached position, so the next tokens start there, the positions between
        left free, and keep their sequence indices (generation/generation_recall.py)."""
        if self.scorer is None:
            return
        gap = self.next_pos - (C.llama_memory_seq_pos_max(self.mem, SEQ) + 1)
        if gap > 0:
            self.scorer.skip_positions(gap)
            self.next_pos -= gap

    def release_pin(self: KVEngine) -> None:
        """End a recalled block's pin: from now on the policy keeps or evicts it like any other tokens."""
        if self.scorer is not None:
            self.scorer.set_pins(self.n_keep, 0, 0)

    def _log_keys(self: KVEngine, index: int, m: int, skip: tuple[int, int] = (0, 0)) -> None:
        """Append the keys the last ubatch wrote for sequence indices index..index+m-1 to the key log; skip=(at, b):
        its rows at..at+b-1 were a recalled block's, not the sequence's."""
        assert self.scorer is not None  # only a scored cache logs keys
        info = self.model.info
        if self.keys is None:
            layers = key_layers(self.scorer.scored_layers())
            self.keys = KeyLog(
                layers, info.n_head_kv, info.n_embd_k_gqa // info.n_head_kv, self.config.recall_key_bytes
            )
            # the other layers' keys are neither staged nor, off the host, copied over (11.5 KB a token on SmolLM2)
            self.scorer.keylog_layers(layers)
        at, b = skip
        rows = self.scorer.staged_keys(self.keys.layers, m + b, info.n_head_kv)
        if rows is None:
            raise RuntimeError(f"the key log read no keys at layers {self.keys.layers} in the last ubatch")
        if b:
            rows = np.concatenate([rows[:at], rows[at + b :]])
        self.keys.append(index, rows)

    def query_probe(self: KVEngine, tokens: Sequence[int]) -> tuple[object, object] | None:
        """Decode the last QUERY_TOKENS of tokens at the next positions for their queries at the key log's layers,
        then remove them: ((layers, rows, n_head, d_k) queries, per-layer scales), or None (no key log yet)."""
        if self.scorer is None or self.keys is None or not tokens:
            return None
        probe = list(tokens[-QUERY_TOKENS:])
        if self.compacts and self.next_pos + len(probe) > self.max_span:
            self.compact()
        lo = self.next_pos
        self.consistent = False
        self._decode_ubatch(probe, lo, False, False, query=True)
        out = self.scorer.staged_query(self.keys.layers, self.model.info.n_head)
        self.scorer.truncate(self.mem, SEQ, lo)
        self.consistent = True
        return out
