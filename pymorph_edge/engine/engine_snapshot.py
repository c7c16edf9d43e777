"""The whole state of one sequence in a KVEngine as bytes and numbers, and putting it back.

A bounded cache makes this cheap: llama.cpp writes only the live cells (llama_state_seq_get_data), the
native scorer writes their positions and scores, and the token history keeps a cache's worth of ids
plus a hash. So a snapshot's size is set by the budget, not by how long the sequence has run. Used by
saved sessions (session_file.py) and by the server's kept conversations.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as C

from pymorph_edge.engine.key_log import KeyLog
from pymorph_edge.engine.kv_engine import SEQ, KVEngine
from pymorph_edge.engine.recall import RecallState
from pymorph_edge.engine.span_index import SpanIndex
from pymorph_edge.engine.token_history import TokenHistory


@dataclass
class EngineSnapshot:
    counters: dict[str, int]  # next_pos, n_past, tokens_decoded, full_peak, shift_evicted, n_ctx
    history: dict[str, Any]  # TokenHistory.state()
    llama_state: bytes  # llama_state_seq_get_data of the sequence
    scorer_state: bytes | None  # NativeScorer.save_state(), None without a native scorer
    recall: dict[str, Any] | None = None  # the recall log and state (engine/recall.py); None in older files
    # the key log (engine/key_log.py) for the server's kept conversations: held in memory, never written to a
    # session file (it grows with the conversation, 1.5 KB a token on SmolLM2, where the rest is set by the budget)
    keys: KeyLog | None = None
    # the log's sentence cuts (engine/span_index.py), in memory only like the keys: a conversation put back (the
    # server's switch, a benchmark's repeat) chooses from them instead of cutting its whole log again; a session
    # file carries none, and its first request cuts the log
    spans: SpanIndex | None = None

    @property
    def nbytes(self) -> int:
        log = len((self.recall or {}).get("log", {}).get("ids", "")) * 3 // 4  # base64
        keys = self.keys.nbytes if self.keys is not None else 0
        spans = self.spans.table_bytes if self.spans is not None else 0
        return (
            len(self.llama_state)
            + len(self.scorer_state or b"")
            + 8 * len(self.history.get("tail", ()))
            + log
            + keys
            + spans
        )


def capture(engine: KVEngine) -> EngineSnapshot:
    """Snapshot the engine's sequence. The engine must be consistent (no interrupted decode)."""
    if not engine.consistent:
        raise ValueError("the cache is in an interrupted state (a decode was stopped midway); nothing to save")
    n = C.llama_state_seq_get_size(engine.ctx, SEQ)
    buf = (ctypes.c_uint8 * max(n, 1))()
    got = C.llama_state_seq_get_data(engine.ctx, buf, n, SEQ)
    if got != n:
        raise RuntimeError(f"llama_state_seq_get_data wrote {got} of {n} bytes")
    return EngineSnapshot(
        counters={
            "next_pos": engine.next_pos,
            "n_past": engine.n_past,
            "tokens_decoded": engine.tokens_decoded,
            "full_peak": engine._full_peak,
            "shift_evicted": engine.shifter.evicted if engine.shifter is not None else 0,
            "n_ctx": engine.n_ctx,
        },
        history=engine.history.state(),
        llama_state=bytes(buf)[:n],
        scorer_state=engine.scorer.save_state() if engine.scorer is not None else None,
        recall={"log": engine.log.state(), "state": engine.recall_state.to_json(), "n_keep": engine.n_keep},
        keys=engine.keys.copy() if engine.keys is not None else None,
        spans=engine.span_index.sync(engine.log).copy(),
    )


def restore(engine: KVEngine, snap: EngineSnapshot) -> None:
    """Replace the engine's sequence with snap. On any failure the engine is put back as it was and a
    ValueError says why."""
    c = snap.counters
    if c.get("n_ctx") != engine.n_ctx:
        raise ValueError(f"the saved state is for a cache of {c.get('n_ctx')} cells; this one has {engine.n_ctx}")
    if (snap.scorer_state is None) != (engine.scorer is None):
        raise ValueError("the saved state and this model differ in whether the cache is natively scored")
    history = TokenHistory.from_state(snap.history)
    if history.keep != engine.history.keep:
        raise ValueError(f"the saved history keeps {history.keep} tokens; this engine keeps {engine.history.keep}")
    backup = capture(engine) if engine.consistent and engine.n_past > 0 else None
    try:
        _apply(engine, snap, history)
    except (ValueError, RuntimeError) as exc:
        engine.reset()
        if backup is not None:
            _apply(engine, backup, TokenHistory.from_state(backup.history))
        raise ValueError(f"could not restore the saved state: {exc}") from None


def _apply(engine: KVEngine, snap: EngineSnapshot, history: TokenHistory) -> None:
    c = snap.counters
    C.llama_memory_clear(engine.mem, True)
    data = snap.llama_state
    src = (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")
    if C.llama_state_seq_set_data(engine.ctx, src, len(data), SEQ) == 0:
        raise ValueError("llama.cpp refused the saved KV state (another model, or a damaged file)")
    if engine.scorer is not None:
        assert snap.scorer_state is not None  # checked by restore
        engine.scorer.load_state(snap.scorer_state)
    engine.next_pos, engine.n_past = int(c["next_pos"]), int(c["n_past"])
    engine.tokens_decoded, engine._full_peak = int(c["tokens_decoded"]), int(c["full_peak"])
    if engine.shifter is not None:
        engine.shifter.evicted = int(c["shift_evicted"])
    engine.history = history
    if snap.recall is not None:
        engine.log.load_state(snap.recall["log"])
        engine.recall_state = RecallState.from_json(snap.recall["state"])
        engine.set_keep(int(snap.recall.get("n_keep", engine.n_keep)))  # keep="system" pinned it per chat
    else:  # saved before recall: nothing of the sequence is logged, so nothing can be recalled
        engine.log.clear()
        engine.log.start = engine.n_past
        engine.recall_state = RecallState()
    if snap.spans is not None and snap.recall is not None:
        engine.span_index = snap.spans.copy()  # true to the log just loaded: its reload is no rewind for it
        engine.log.take_rewind("spans")
    if snap.keys is not None and engine._logs_keys and (engine.keys is None or snap.keys.layers == engine.keys.layers):
        engine.keys = snap.keys.copy()
    elif engine.keys is not None:
        # a session file carries no keys: attention can rank only what is decoded from here on (BM25 reads the
        # restored id log as before)
        engine.keys.clear()
        engine.keys.start = engine.n_past
    engine.consistent = True
    newest = C.llama_memory_seq_pos_max(engine.mem, SEQ)
    if len(history) != engine.n_past or newest != engine.next_pos - 1:
        raise ValueError(
            f"the saved state does not hold together: newest position {newest}, expected {engine.next_pos - 1}; "
            f"history {len(history)} tokens, expected {engine.n_past}"
        )
