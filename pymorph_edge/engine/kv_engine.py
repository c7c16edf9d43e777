"""The decode loop under a KV budget: llama.cpp context + native scorer + eviction after every ubatch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import llama_cpp.llama_cpp as C

from pymorph_edge.engine.context_params import context_params
from pymorph_edge.engine.context_shifter import ContextShifter
from pymorph_edge.engine.engine_config import (
    EngineConfig,
    _padded,
    can_compact,
    default_max_span,
    resolve_score_layers,
    validate_budget,
)
from pymorph_edge.engine.evicted_log import EvictedLog
from pymorph_edge.engine.head_calibration import calibrate_head_weights
from pymorph_edge.engine.key_log import KeyLog
from pymorph_edge.engine.kv_cache_types import row_bytes
from pymorph_edge.engine.native_scorer import NativeScorer
from pymorph_edge.engine.prefix_reuse import reusable_prefix
from pymorph_edge.engine.recall import PendingBlock, RecallState, default_recall_tokens
from pymorph_edge.engine.recall_decoding import SEQ, RecallDecoding
from pymorph_edge.engine.span_index import SpanIndex
from pymorph_edge.engine.stats import KVStats
from pymorph_edge.engine.token_history import TokenHistory
from pymorph_edge.model.llama_log import KVSizeCapture
from pymorph_edge.model.model_file import LoadedModel
from pymorph_edge.policies import FullCache, KVPolicy

logger = logging.getLogger(__name__)

__all__ = ["SEQ", "KVEngine"]


class KVEngine(RecallDecoding):
    """One llama.cpp context whose KV cache never holds more than kv_budget + n_ubatch cells.

    Three modes: the full cache (kv_budget None), a native scorer that evicts after every ubatch
    (`scorer`), or llama.cpp's context shift (`shifter`)."""

    def __init__(self, model: LoadedModel, kv_budget: int | None, policy: KVPolicy, config: EngineConfig) -> None:
        if kv_budget is not None and not policy.evicts:
            raise ValueError(f"policy {policy.name!r} does not evict; use kv_budget=None with it")
        policy = FullCache() if kv_budget is None else policy.for_budget(kv_budget)
        validate_budget(kv_budget, policy, model.info.n_swa)
        self.model, self.kv_budget, self.policy, self.config = model, kv_budget, policy, config
        self.scorer: NativeScorer | None = None
        self.shifter: ContextShifter | None = None

        cp, native_scored, self.flash_attn, self.kv_store_bytes = context_params(model, kv_budget, policy, config)
        with KVSizeCapture() as cap:
            if native_scored:
                # the native state must exist first: its pointer is the callback's user data
                assert kv_budget is not None  # native_scored implies it
                layers, rotate = resolve_score_layers(
                    config, policy, model.info.n_layer, model.offloaded, self.flash_attn
                )
                self.scorer = NativeScorer(
                    policy, model.info, kv_budget, _padded(cp.n_ctx), config.n_ubatch, layers, rotate
                )
                self.scorer.attach(cp)
                if self.kv_store_bytes:
                    self.scorer.kvstore_enable(self.kv_store_bytes)
            self.ctx = C.llama_init_from_model(model.ptr, cp)
        if not self.ctx:
            self._free_scorer()
            raise RuntimeError(f"llama.cpp could not create a context with n_ctx={cp.n_ctx} for {str(model.path)!r}")
        try:
            model.attach_lora(self.ctx)
        except BaseException:
            self.close()
            raise
        k_row, v_row = (
            row_bytes(config.type_k, model.info.n_embd_k_gqa),
            row_bytes(config.type_v, model.info.n_embd_v_gqa),
        )
        self.kv_bytes = cap.total_bytes(k_row, v_row)
        self.n_ctx = C.llama_n_ctx(self.ctx)
        # one cell of every layer in the cache's types: what each token costs a cache that never evicts
        self.bytes_per_token = model.info.n_layer * (k_row + v_row)
        if self.scorer is not None and self.n_ctx != self.scorer.n_cells:
            self.close()
            raise RuntimeError(f"llama.cpp allocated {self.n_ctx} cells, expected {_padded(cp.n_ctx)}")
        self.mem = C.llama_get_memory(self.ctx)
        if policy.shifts and kv_budget is not None:
            if not C.llama_memory_can_shift(self.mem):
                self.close()
                raise ValueError(
                    f"policy 'context_shift': llama.cpp cannot shift this model's KV cache ({str(model.path)!r})"
                )
            self.shifter = ContextShifter(kv_budget, policy.protected_recent)  # context shift keeps its first n_keep
        self.max_span = config.max_span or default_max_span(model.info.n_ctx_train, self.n_ctx)
        self.compacts = self.scorer is not None and can_compact(self.mem, model)
        if self.scorer is not None and not self.compacts:
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
        self.next_pos = 0  # llama.cpp position of the next token; compaction and context shift lower it
        self.n_past = 0  # tokens in the sequence since the reset; never renumbered
        self.tokens_decoded = 0
        self._full_peak = 0
        # history[i] is token i of the sequence; only a cache's worth of tail is stored (see TokenHistory)
        self.history = TokenHistory(keep=self.n_ctx + config.n_ubatch)
        self.consistent = True  # False if a decode was interrupted: the cache must be reset
        self.head_weights: list[float] | None = None
        self.log = EvictedLog(config.recall_log_bytes)  # every token id, for recall (engine/recall.py)
        self.span_index = SpanIndex()  # the log's sentences, cut once (engine/span_index.py)
        self.recall_state = RecallState()
        self.recall_enabled = (
            bool(policy.recalls if config.recall is None else config.recall) and self.scorer is not None
        )
        if config.recall_in_generation and kv_budget is not None and not self.recall_enabled:
            why = "keeps no cell map to recall into" if self.scorer is None else "has recall=False: pass recall=True"
            self.close()  # asked for explicitly, so an error rather than a watcher that never runs
            raise ValueError(f"recall_in_generation=True needs recall, and policy {policy.name!r} {why}")
        self.n_keep = 0
        self.recall_tokens = 0
        # recall by attention logs every token's keys at a few layers (key_log.py), chosen at the first ubatch
        self.keys: KeyLog | None = None
        self._logs_keys = self.recall_enabled and config.recall_by in ("attention", "both")
        try:
            if self._logs_keys:
                assert self.scorer is not None  # recall_enabled implies it
                self.scorer.enable_keylog(model.info.n_embd_k_gqa // model.info.n_head_kv)
            if self.scorer is not None:
                self.set_keep(config.n_keep)
            if self.scorer is not None and policy.calibrates_heads:
                self.head_weights = calibrate_head_weights(self)
        except BaseException:
            self.close()
            raise
        logger.debug("context: n_ctx=%d kv_bytes=%d budget=%s policy=%s", self.n_ctx, self.kv_bytes, kv_budget, policy)

    def set_keep(self, n_keep: int) -> None:
        """Pin the first n_keep tokens (llama.cpp's n_keep; a system prompt): never evicted, by any policy.
        They count inside the budget, so the budget must still leave the policy room to evict."""
        if isinstance(n_keep, bool) or not isinstance(n_keep, int) or n_keep < 0:
            raise ValueError(f"keep must be a non-negative int, got {n_keep!r}")
        if self.scorer is None:
            if n_keep and self.kv_budget is not None:
                raise ValueError(f"keep={n_keep} needs a natively scored policy; {self.policy.name!r} pins nothing")
            return
        assert self.kv_budget is not None  # a scorer implies a budget
        room = self.kv_budget - self.scorer.protected
        if n_keep >= room:
            raise ValueError(
                f"keep={n_keep} leaves nothing to evict: kv_budget {self.kv_budget} minus the "
                f"{self.scorer.protected} recent tokens the policy protects is {room}; keep must be below that"
            )
        self.scorer.set_pins(n_keep, 0, 0)
        self.n_keep = n_keep
        self.recall_tokens = (
            self.config.recall_tokens
            if self.config.recall_tokens is not None
            else default_recall_tokens(self.kv_budget, self.scorer.protected, n_keep)
        )
        self.recall_tokens = min(self.recall_tokens, max(0, room - n_keep - 1))

    @property
    def full(self) -> bool:
        """The full cache: no eviction, so it fills up at n_ctx."""
        return self.kv_budget is None

    @property
    def bounded(self) -> bool:
        """The cache holds its ceiling however long the text (SnapKV compresses the prompt but then grows)."""
        return self.kv_budget is not None and not self.policy.grows

    def reset(self) -> None:
        """Forget every token: a new sequence starts at position 0."""
        C.llama_memory_clear(self.mem, True)
        if self.scorer is not None:
            self.scorer.reset()
        if self.shifter is not None:
            self.shifter.evicted = 0
        self.next_pos = 0
        self.n_past = 0
        self.tokens_decoded = 0
        self._full_peak = 0
        self.history.clear()
        self.log.clear()
        if self.keys is not None:
            self.keys.clear()
        self.recall_state = RecallState()
        self.consistent = True

    @property
    def _pos_shift(self) -> int:
        """Sequence index minus cache position, for every token of the live tail."""
        return self.n_past - self.next_pos

    def reuse_prefix(self, tokens: Sequence[int]) -> int:
        """Keep the longest cached prefix of tokens that can be continued from, drop the rest of the cache,
        and return its length: the caller decodes only tokens[returned:]."""
        keep = reusable_prefix(self.history, tokens, self.live_from()) if self.consistent else 0
        if 0 < keep < len(self.history) and self.scorer is not None:
            # llama.cpp takes a batch only right after the newest cached position, so the token before keep
            # must still be cached (a 1-token window, TOVA's, may have evicted it)
            if keep - 1 - self._pos_shift not in set(self.scorer.cell_positions()):
                keep = 0
        if keep == 0:
            self.reset()
        elif keep < len(self.history):
            self.truncate(keep)
        return keep

    def truncate(self, from_index: int) -> None:
        """Drop tokens >= from_index of the sequence, so it continues from there (a diverging chat turn)."""
        if not 0 < from_index <= self.n_past or from_index < self.live_from():
            raise ValueError(
                f"cannot truncate to token {from_index}: the cache holds tokens [{self.live_from()}, "
                f"{self.n_past}) whole"
            )
        from_pos = from_index - self._pos_shift
        if self.scorer is not None:
            self.scorer.truncate(self.mem, SEQ, from_pos)
        elif not C.llama_memory_seq_rm(self.mem, SEQ, from_pos, -1):
            raise RuntimeError(f"llama_memory_seq_rm failed truncating to position {from_pos}")
        self.history.truncate(from_index)
        self.log.truncate(from_index)
        if self.keys is not None:
            self.keys.truncate(from_index)
        self.n_past = from_index
        self.next_pos = from_pos

    def live_from(self) -> int:
        """Smallest sequence index i such that every token in [i, n_past) is still in the cache."""
        if self.scorer is not None:
            # a recalled block sits behind the barrier, and indices before it do not map to positions by one shift
            return max(self.scorer.min_live_tail(self.next_pos) + self._pos_shift, self.recall_state.barrier)
        if self.shifter is not None and self._pos_shift > 0:
            return self.shifter.n_keep + self._pos_shift  # context shift dropped what followed n_keep
        return 0

    def decode(
        self,
        tokens: Sequence[int],
        logits_last: bool = True,
        progress: Callable[[int, int], None] | None = None,
        on_logits: Callable[[int, int], None] | None = None,
        block: PendingBlock | None = None,
        then: Sequence[int] = (),
    ) -> None:
        """Run tokens through the model in ubatch chunks, evicting down to the budget after each.

        block: a recalled block (engine/recall.py), decoded inside the first chunk after its first block.at tokens.
        then: the rest of the request, decoded by a later call (a recalled block goes between): the chunks are sized
        and probed as the whole request's would be, its last tokens (the question) scoring each chunk that evicts.

        progress(done, total) is called after each chunk (used for prefill progress bars).
        on_logits(start, m): every token gets logits, and this reads them (llama_get_logits_ith(ctx, 0..m-1) for
        tokens[start:start+m]) right after its chunk, before eviction or a probe replaces them. So a prompt of any
        length is scored in chunks, never needing more than one chunk's logits (echo with logprobs)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("decode needs at least one token")
        n_vocab = self.model.info.n_vocab
        bad = [t for t in tokens if not 0 <= int(t) < n_vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside the vocabulary [0, {n_vocab})")
        if self.full and self.next_pos + n > self.n_ctx:
            raise ValueError(
                f"{self.next_pos + n} tokens exceed the full cache's n_ctx={self.n_ctx}; "
                "pass a larger n_ctx or set kv_budget to bound the cache"
            )
        if self.scorer is not None and self.policy.grows and self.stats.cells_in_use + n > self.n_ctx:
            raise ValueError(
                f"{self.stats.cells_in_use + n} cells needed but {self.policy.name} has n_ctx={self.n_ctx}: "
                "it compresses only the prompt and must hold the whole prompt first; raise its n_ctx"
            )
        scorer, shifter = self.scorer, self.shifter
        whole = n + len(then)
        probe = [*tokens[-self.policy.protected_recent :], *then][-self.policy.protected_recent :]
        probe = probe if self._probes(whole) else None
        step = self.chunk_tokens(whole)
        inserted = self._check_block(block, n, step, on_logits)
        self.consistent = False  # set back once every chunk is decoded and accounted for
        start = 0
        while start < n:
            chunk = tokens[start : start + step - inserted]
            m = len(chunk)
            last_chunk = start + m == n
            if self.compacts and self.next_pos + m + inserted > self.max_span:
                self.compact()
            if shifter is not None:
                self.next_pos = shifter.make_room(self.mem, SEQ, self.next_pos, m)
            # decided before the chunk: its last rows go unread (a backend need not send them) when a probe's rows
            # replace them, or when no eviction follows and the next chunk refills the whole window
            w = self.policy.protected_recent
            evicts = scorer is not None and scorer.live_cells() + m + inserted > (self.kv_budget or 0)
            probes_now = bool(probe) and (not last_chunk or bool(then)) and evicts
            refilled = not last_chunk and not evicts and min(step, n - start - m) >= w
            superseded = (probes_now and len(probe or ()) >= w) or refilled
            logits = logits_last and last_chunk
            if inserted:
                assert block is not None
                self._decode_with_block(chunk, block, logits, last_chunk, superseded)  # moves next_pos past it
                inserted = 0
            else:
                self._decode_ubatch(
                    chunk, self.next_pos, logits, last_chunk, all_logits=bool(on_logits), superseded=superseded
                )
                if on_logits is not None:
                    on_logits(start, m)
                if self._logs_keys:
                    self._log_keys(self.n_past, m)
            self.next_pos += m
            self.n_past += m
            self.tokens_decoded += m
            self.history.extend(chunk)
            self.log.extend(chunk)
            if scorer is not None:
                if probes_now:
                    # the prompt's own last tokens (its question) score what to keep, then leave no trace
                    self._decode_ubatch(probe, self.next_pos, False, False, probe=True)
                    scorer.truncate(self.mem, SEQ, self.next_pos)
                scorer.evict(self.mem, SEQ, self.next_pos)
            else:
                self._full_peak = max(self._full_peak, self.next_pos)
            if progress is not None:
                # every chunk so far is in the cache and the history, so a hook that raises (a cancelled
                # request) leaves a cache the next request can reuse up to here
                self.consistent = True
                progress(start + m, n)
                self.consistent = False
            start += m
        self.consistent = True

    def chunk_tokens(self, n: int) -> int:
        """Tokens per chunk when decode() takes n tokens (fewer than a ubatch when a probe follows each chunk)."""
        return self.n_batch - self.policy.protected_recent if self._probes(n) else self.n_batch

    def _probes(self, n: int) -> bool:
        """Whether this prompt's chunks are scored by a probe of its last tokens (see MorphKV.prefill_probe).
        Only a prompt of several chunks needs one: a single chunk holds its question already."""
        return (
            self.scorer is not None
            and self.policy.probes_prefill
            and n > self.n_batch
            and 0 < self.policy.protected_recent < self.n_batch
        )

    def _decode_ubatch(
        self,
        chunk: Sequence[int],
        pos0: int,
        want_logits: bool,
        last_chunk: bool,
        probe: bool = False,
        all_logits: bool = False,
        query: bool = False,
        superseded: bool = False,
        restore: bool = False,  # saved rows written on the second sequence (engine/recall_decoding.py restore_run)
    ) -> None:
        b = self.batch
        m = len(chunk)
        for i, tok in enumerate(chunk):
            b.token[i] = tok
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = SEQ + restore
            b.logits[i] = 1 if all_logits or (want_logits and i == m - 1) else 0
        b.n_tokens = m
        if self.scorer is not None:
            self.scorer.begin(pos0, m, last_chunk, probe, query, superseded, restore)
        rc = C.llama_decode(self.ctx, b)
        if rc != 0:
            if self.scorer is not None:
                self.scorer.reset()
            raise RuntimeError(
                f"llama_decode returned {rc} at position {pos0} ({m} tokens, n_ctx={self.n_ctx}); the cache state was reset"
            )
        if self.scorer is not None:
            self.scorer.end()

    def compact(self) -> None:
        """Renumber the live positions 0..n_live-1 (see native/pme_compact.c); the sequence indices stay."""
        if not self.compacts or self.scorer is None:
            raise RuntimeError("this cache cannot be compacted: it has no native scorer, or llama.cpp cannot shift it")
        shift = self.scorer.compact(self.mem, SEQ, self.next_pos)
        logger.debug("compacted positions: next_pos %d -> %d", self.next_pos, self.next_pos - shift)
        self.next_pos -= shift

    def cell_positions(self) -> list[int]:
        """Position held by each cell of the scored cache (-1 when free), as the native map knows it."""
        if self.scorer is None:
            raise RuntimeError("only a natively scored cache keeps a cell map")
        return self.scorer.cell_positions()

    @property
    def stats(self) -> KVStats:
        if self.scorer is not None:
            s = self.scorer.stats()
            used, peak, evicted = s["cells_in_use"], s["peak_cells"], s["tokens_evicted"]
            skip = ("cells_in_use", "peak_cells", "tokens_evicted")
            extra = {k: s[k] for k in KVStats.__dataclass_fields__ if k in s and k not in skip}
        else:
            used, peak = self.next_pos, self._full_peak
            evicted = self.shifter.evicted if self.shifter is not None else 0
            extra = {}
        return KVStats(
            budget=self.kv_budget,
            n_ctx=self.n_ctx,
            cells_in_use=used,
            peak_cells=peak,
            tokens_evicted=evicted,
            kv_bytes=self.kv_bytes,
            tokens_decoded=self.tokens_decoded,
            next_pos=self.next_pos,
            full_cache_bytes=self.n_past * self.bytes_per_token,
            recall_log_bytes=self.log.nbytes,
            recall_key_bytes=self.keys.nbytes if self.keys is not None else 0,
            recall_kv_bytes=self.scorer.kvstore_bytes() if self.scorer is not None else 0,
            **self.recall_state.counters.__dict__,
            **extra,
        )

    def _free_scorer(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            C.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            C.llama_free(self.ctx)
            self.ctx = None
        self._free_scorer()
