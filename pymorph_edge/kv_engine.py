"""The decode loop under a KV budget: llama.cpp context + native scorer + eviction after every ubatch."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Sequence

import llama_cpp.llama_cpp as C

from ._native import native
from .engine_config import EngineConfig, can_compact, default_max_span, validate_budget
from .llama_log import KVSizeCapture
from .model_file import LoadedModel
from .policies import FullCache, KVPolicy
from .stats import KVStats
from .token_history import TokenHistory

logger = logging.getLogger(__name__)

SEQ = 0  # one sequence per context


class KVEngine:
    """One llama.cpp context whose KV cache never holds more than kv_budget + n_ubatch cells."""

    def __init__(self, model: LoadedModel, kv_budget: int | None, policy: KVPolicy, config: EngineConfig) -> None:
        if kv_budget is not None and not policy.evicts:
            raise ValueError(f"policy {policy.name!r} does not evict; use kv_budget=None with it")
        if kv_budget is None:
            policy = FullCache()
        validate_budget(kv_budget, policy, model.info.n_swa)
        if policy.shifts and kv_budget is not None and kv_budget <= policy.protected_recent + config.n_ubatch:
            raise ValueError(
                f"kv_budget={kv_budget} must exceed n_keep + n_ubatch = {policy.protected_recent + config.n_ubatch} "
                "for context_shift, so that a prompt chunk fits after a shift"
            )
        if policy.grows and kv_budget is not None and policy.n_ctx < kv_budget + config.n_ubatch:  # type: ignore[attr-defined]
            raise ValueError(
                f"snapkv n_ctx={policy.n_ctx} must be at least kv_budget + n_ubatch = {kv_budget + config.n_ubatch}"
            )  # type: ignore[attr-defined]
        self.model, self.kv_budget, self.policy, self.config = model, kv_budget, policy, config
        self.shifting = policy.shifts and kv_budget is not None
        bounded = kv_budget is not None and not self.shifting  # bounded by the native scorer

        cp = C.llama_context_default_params()
        if self.shifting:
            cp.n_ctx = kv_budget
        elif bounded:
            cp.n_ctx = policy.n_ctx if policy.grows else kv_budget + config.n_ubatch  # type: ignore[attr-defined]
        else:
            cp.n_ctx = config.n_ctx or 4096
        # one ubatch per llama_decode, so the callback knows each token's position
        cp.n_batch = config.n_ubatch if (bounded or self.shifting) else max(config.n_ubatch, 512)
        cp.n_ubatch = config.n_ubatch
        cp.n_seq_max = 1
        threads = config.n_threads or os.cpu_count() or 1
        cp.n_threads = cp.n_threads_batch = threads
        if bounded:
            cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED  # kq_soft_max exists only without it
            cp.swa_full = False  # otherwise the sliding-window cache grows to n_ctx
            ffi, lib = native()
            self._ffi, self._lib = ffi, lib
            self._cb = ctypes.cast(
                ctypes.c_void_p(int(ffi.cast("uintptr_t", lib.pme_eval_callback_ptr()))),
                C.ggml_backend_sched_eval_callback,
            )
        else:
            # like llama_cpp.Llama, so a full-cache run compares like for like
            cp.flash_attn_type = (
                C.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            # swa_full as llama_cpp.Llama; context shift needs it too: llama.cpp shifts an iSWA cache only when its
            # sliding-window cache is as large as the base one (llama_kv_cache_iswa::get_can_shift), which at
            # n_ctx = kv_budget costs little
            cp.swa_full = True if config.swa_full is None else config.swa_full
        self._state = None
        with KVSizeCapture() as cap:
            if bounded:
                # the native state must exist first: its pointer is the callback's user data
                self._state = self._create_state(n_cells=self._padded(cp.n_ctx))
                cp.cb_eval = self._cb
                cp.cb_eval_user_data = ctypes.c_void_p(int(self._ffi.cast("uintptr_t", self._state)))
            self.ctx = C.llama_init_from_model(model.ptr, cp)
        if not self.ctx:
            self._free_state()
            raise RuntimeError(f"llama.cpp could not create a context with n_ctx={cp.n_ctx} for {str(model.path)!r}")
        self.kv_bytes = cap.total_bytes(model.info.n_embd_k_gqa, model.info.n_embd_v_gqa)
        self.n_ctx = C.llama_n_ctx(self.ctx)
        if bounded and self.n_ctx != self._padded(cp.n_ctx):
            self.close()
            raise RuntimeError(f"llama.cpp allocated {self.n_ctx} cells, expected {self._padded(cp.n_ctx)}")
        self.mem = C.llama_get_memory(self.ctx)
        if self.shifting and not C.llama_memory_can_shift(self.mem):
            self.close()
            raise ValueError(
                f"policy 'context_shift': llama.cpp cannot shift this model's KV cache ({str(model.path)!r})"
            )
        self.max_span = config.max_span or default_max_span(model.info.n_ctx_train, self.n_ctx)
        self.compacts = bounded and can_compact(self.mem, model)
        if bounded and not self.compacts:
            logger.warning(
                "llama.cpp cannot renumber this model's KV cache positions: past %d tokens the kept tokens span "
                "more than the model's trained context (n_ctx_train) and quality is at risk",
                model.info.n_ctx_train,
            )
        if self.compacts and self.max_span <= self.n_ctx + config.n_ubatch:
            self.close()
            raise ValueError(
                f"max_span={self.max_span} must exceed the cache's {self.n_ctx} cells + n_ubatch {config.n_ubatch}, "
                "or a renumbering could not make room for the next chunk"
            )
        self.batch = C.llama_batch_init(cp.n_batch, 0, 1)
        self.n_batch = cp.n_batch
        self._pos_buf = ffi.new("int32_t[]", config.n_ubatch) if bounded else None
        self.next_pos = 0  # llama.cpp position of the next token; compaction and context shift lower it
        self.n_past = 0  # tokens in the sequence since the reset; never renumbered
        self.tokens_decoded = 0
        self._full_peak = 0
        self._shift_evicted = 0
        # history[i] is token i of the sequence; only a cache's worth of tail is stored (see TokenHistory)
        self.history = TokenHistory(keep=self.n_ctx + config.n_ubatch)
        self.consistent = True  # False if a decode was interrupted: the cache must be reset
        logger.debug("context: n_ctx=%d kv_bytes=%d budget=%s policy=%s", self.n_ctx, self.kv_bytes, kv_budget, policy)

    @staticmethod
    def _padded(n: int) -> int:
        return (n + 255) // 256 * 256  # llama.cpp pads n_ctx to 256 cells

    def _create_state(self, n_cells: int):
        ffi, lib = self._ffi, self._lib
        info = self.model.info
        cfg = ffi.new("pme_config *")
        for k, v in self.policy.native_fields().items():
            setattr(cfg, k, getattr(lib, v) if isinstance(v, str) else v)
        cfg.budget = self.kv_budget
        cfg.protect_recent = max(self.policy.protected_recent, info.n_swa)
        cfg.n_cells = n_cells
        cfg.n_head, cfg.n_head_kv, cfg.n_layer = info.n_head, info.n_head_kv, info.n_layer
        cfg.max_ubatch = self.config.n_ubatch
        err = ffi.new("char[256]")
        st = lib.pme_create(cfg, err, 256)
        if st == ffi.NULL:
            raise ValueError(ffi.string(err).decode())
        return st

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            raise RuntimeError(f"{what}: {self._ffi.string(self._lib.pme_last_error(self._state)).decode()}")

    @property
    def bounded(self) -> bool:
        return self._state is not None

    def reset(self) -> None:
        """Forget every token: a new sequence starts at position 0."""
        C.llama_memory_clear(self.mem, True)
        if self.bounded:
            self._lib.pme_reset(self._state)
        self.next_pos = 0
        self.n_past = 0
        self.tokens_decoded = 0
        self._full_peak = 0
        self._shift_evicted = 0
        self.history.clear()
        self.consistent = True

    @property
    def _pos_shift(self) -> int:
        """Sequence index minus cache position, for every token of the live tail."""
        return self.n_past - self.next_pos

    def truncate(self, from_index: int) -> None:
        """Drop tokens >= from_index of the sequence, so it continues from there (a diverging chat turn)."""
        if not 0 < from_index <= self.n_past or from_index < self.live_from():
            raise ValueError(
                f"cannot truncate to token {from_index}: the cache holds tokens [{self.live_from()}, "
                f"{self.n_past}) whole"
            )
        from_pos = from_index - self._pos_shift
        if self.bounded:
            self._check(
                self._lib.pme_truncate(self._state, self._ffi.cast("void *", self.mem), SEQ, from_pos), "truncate"
            )
        elif not C.llama_memory_seq_rm(self.mem, SEQ, from_pos, -1):
            raise RuntimeError(f"llama_memory_seq_rm failed truncating to position {from_pos}")
        self.history.truncate(from_index)
        self.n_past = from_index
        self.next_pos = from_pos

    def live_from(self) -> int:
        """Smallest sequence index i such that every token in [i, n_past) is still in the cache."""
        if self.bounded:
            return int(self._lib.pme_min_live_tail(self._state, self.next_pos)) + self._pos_shift
        if self.shifting and self._pos_shift > 0:
            return self.policy.protected_recent + self._pos_shift  # context shift dropped what followed n_keep
        return 0

    def decode(
        self, tokens: Sequence[int], logits_last: bool = True, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Run tokens through the model in ubatch chunks, evicting down to the budget after each.

        progress(done, total) is called after each chunk (used for prefill progress bars)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("decode needs at least one token")
        n_vocab = self.model.info.n_vocab
        bad = [t for t in tokens if not 0 <= int(t) < n_vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside the vocabulary [0, {n_vocab})")
        if not self.bounded and not self.shifting and self.next_pos + n > self.n_ctx:
            raise ValueError(
                f"{self.next_pos + n} tokens exceed the full cache's n_ctx={self.n_ctx}; "
                "pass a larger n_ctx or set kv_budget to bound the cache"
            )
        if self.bounded and self.policy.grows and self.stats.cells_in_use + n > self.n_ctx:
            raise ValueError(
                f"{self.stats.cells_in_use + n} cells needed but {self.policy.name} has n_ctx={self.n_ctx}: "
                "it compresses only the prompt and must hold the whole prompt first; raise its n_ctx"
            )
        b = self.batch
        self.consistent = False  # set back once every chunk is decoded and accounted for
        for start in range(0, n, self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            m = len(chunk)
            last_chunk = start + m == n
            if self.compacts and self.next_pos + m > self.max_span:
                self.compact()
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = self.next_pos + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = SEQ
                b.logits[i] = 1 if (logits_last and last_chunk and i == m - 1) else 0
            b.n_tokens = m
            if self.shifting:
                self._shift_for(m)
                for i in range(m):
                    b.pos[i] = self.next_pos + i
            if self.bounded:
                self._begin(m, last_chunk)
            rc = C.llama_decode(self.ctx, b)
            if rc != 0:
                if self.bounded:
                    self._lib.pme_reset(self._state)
                raise RuntimeError(
                    f"llama_decode returned {rc} at position {self.next_pos} "
                    f"({m} tokens, n_ctx={self.n_ctx}); the cache state was reset"
                )
            self.next_pos += m
            self.n_past += m
            self.tokens_decoded += m
            self.history.extend(chunk)
            if self.bounded:
                self._check(self._lib.pme_end_ubatch(self._state), "scoring")
                self._check(
                    self._lib.pme_evict(self._state, self._ffi.cast("void *", self.mem), SEQ, self.next_pos), "eviction"
                )
            else:
                self._full_peak = max(self._full_peak, self.next_pos)
            if progress is not None:
                progress(start + m, n)
        self.consistent = True

    def _begin(self, m: int, last_chunk: bool) -> None:
        for i in range(m):
            self._pos_buf[i] = self.next_pos + i
        lib = self._lib
        flags = (lib.PME_UB_PREFILL if m > 1 else 0) | (lib.PME_UB_LAST if last_chunk else 0)
        self._check(self._lib.pme_begin_ubatch(self._state, self._pos_buf, m, flags), "begin ubatch")

    def compact(self) -> None:
        """Renumber the live positions 0..n_live-1 (see native/pme_compact.c); the sequence indices stay."""
        if not self.compacts:
            raise RuntimeError("this cache cannot be compacted: it has no native scorer, or llama.cpp cannot shift it")
        shift = self._lib.pme_compact(self._state, self._ffi.cast("void *", self.mem), SEQ, self.next_pos)
        self._check(shift, "compaction")
        logger.debug("compacted positions: next_pos %d -> %d", self.next_pos, self.next_pos - shift)
        self.next_pos -= shift

    def _shift_for(self, m: int) -> None:
        """llama.cpp's context shift: keep n_keep, drop the older half of the rest, slide positions down."""
        n_keep = self.policy.protected_recent
        while self.next_pos + m > self.kv_budget:  # the budget, not n_ctx: llama.cpp pads n_ctx up to 256 cells
            n_discard = (self.next_pos - n_keep) // 2
            if n_discard <= 0:
                raise RuntimeError(
                    f"context shift cannot make room for {m} tokens (kv_budget {self.kv_budget}, n_keep {n_keep})"
                )
            C.llama_memory_seq_rm(self.mem, SEQ, n_keep, n_keep + n_discard)
            C.llama_memory_seq_add(self.mem, SEQ, n_keep + n_discard, self.next_pos, -n_discard)
            self.next_pos -= n_discard
            self._shift_evicted += n_discard

    def cell_positions(self) -> list[int]:
        """Position held by each cell of the scored cache (-1 when free), as the native map knows it."""
        if not self.bounded:
            raise RuntimeError("the full cache keeps no cell map")
        out = self._ffi.new("int32_t[]", self.n_ctx)
        n = self._lib.pme_cell_positions(self._state, out, self.n_ctx)
        return list(out[0:n])

    @property
    def stats(self) -> KVStats:
        if self.bounded:
            s = self._ffi.new("pme_stats *")
            self._lib.pme_get_stats(self._state, s)
            used, peak, evicted = int(s.cells_in_use), int(s.peak_cells), int(s.tokens_evicted)
            compactions = int(s.compactions)
        else:
            used, peak, evicted, compactions = self.next_pos, self._full_peak, self._shift_evicted, 0
        return KVStats(
            budget=self.kv_budget,
            n_ctx=self.n_ctx,
            cells_in_use=used,
            peak_cells=peak,
            tokens_evicted=evicted,
            kv_bytes=self.kv_bytes,
            tokens_decoded=self.tokens_decoded,
            next_pos=self.next_pos,
            compactions=compactions,
        )

    def _free_state(self) -> None:
        if self._state is not None:
            self._lib.pme_free(self._state)
            self._state = None

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            C.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            C.llama_free(self.ctx)
            self.ctx = None
        self._free_state()
