"""Recall: bring evicted text back into the cache when new text arrives that needs it, within the same ceiling.

When a request extends the cached sequence (a chat turn, continue_chat, a completion that continues the
cached text), the evicted sentences most relevant to the new text (recall_select.py) are decoded again as one
block just before it: recomputed from their token ids in the log (evicted_log.py), so nothing but ids is kept
off the cache. The block sits at the next positions, so the position span stays what compaction guarantees,
and it takes no index in the token sequence: the history, prefix reuse and sessions see the text the user sent.
It is pinned while the new text is decoded, whose attention then tells the policy whether to keep it; after
that the policy keeps or evicts it like any other token. The block is evicted down to the budget at once, so
the cache never holds more than kv_budget + n_ubatch cells.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pymorph_edge.engine.recall_fragments import drop_kept_fragments
from pymorph_edge.engine.recall_keys import attention_mass, rank_by_attention
from pymorph_edge.engine.recall_select import (
    HeldCover,
    Span,
    adds_a_word,
    asked_digits,
    choose,
    gaps,
    has_digits,
    held_runs,
    is_rival,
    last_sentence,
    last_sentence_text,
    on_cue,
    query_weights,
    rank,
    sentences,
    whole_sentences,
    with_next,
)

if TYPE_CHECKING:
    from pymorph_edge.engine.kv_engine import KVEngine

logger = logging.getLogger(__name__)

# Recalled cells take logical positions from here up: apart from every sequence index, and from each other
BLOCK_LPOS = 1 << 40
MAX_SPAN_TOKENS = 48  # a sentence longer than this is cut, so one long sentence cannot fill the recall budget
# "both" asks the model's attention only when the words find nothing on the cue. True restores stop 32's way
# (attention's best sentence joins BM25's picks, a query probe every request), kept for the A/B (recall_bench's
# "+eager"): on 7 dialogue sets SmolLM2 answered 34 of 56 without it and 30 with it, and attention's extra sentence
# was story prose that made a short turn's block 3x as long (docs/recall.md, "The words first")
ATTENTION_BESIDE_WORDS = False
# True: a recomputed block rides in the new text's first ubatch (KVEngine.decode(block=...)), one ubatch and one
# eviction pass fewer. Off: on 5 SmolLM2 dialogue sets it answered 18 of 40 against 22 decoded apart (not traced: the
# question then also reads the cells the block's own eviction pass would drop; docs/recall.md, "A shorter block")
FUSED_BLOCK = False
# True: attention's pick comes back with the evicted sentence after it (recall_select.with_next). Off: on 7 SmolLM2
# dialogue sets it answered 32 of 56 against 35 without (tuning 4 against 7), and on Gemma 3 at budget 544 recall
# may bring back 16 tokens, too few for a pair (docs/recall.md, "A shorter block"; recall_bench's "+next")
ATTENTION_NEXT = False
# True: a restored block's wrap rides in the head's and the new text's first ubatches (_restore_riding), so the
# restore adds no ubatch of its own. Off: the label and the text after the runs are decoded in ubatches of their own
RIDE_RESTORED_WRAP = True
# True: once a recalled sentence's whole copy is in the cache, the cells its kept fragments hold where it first stood
# are removed (recall_fragments.py): a half-evicted sentence can read as another fact, and its cells count twice.
# Off: on the held-out sets, one run each, it answered SmolLM2's dialogues as often (13 of 16 both ways), Gemma 3's
# "last" one fewer (3 of 8 against 4) and copied 4 fewer of SmolLM2's continuation digits on "last" (26 of 40
# against 30); docs/recall.md, "Kept fragments of a recalled sentence" (recall_bench "+drop")
DROP_KEPT_FRAGMENTS = False
QUERY_TOKENS = 512  # only the end of a long new text is read as the query (see recall_select.query_weights)

# turns recalled text into the block to decode: the chat front end wraps it as a message of the model's
# template; None means it cannot be placed well-formed, and nothing is recalled
Wrap = Callable[[list[int]], "list[int] | None"]
# the wrap's own tokens before and after the recalled raw ids, for a block restored from saved KV (None: the wrap
# cannot say them, and the block is recomputed whole)
Around = Callable[[], "tuple[list[int], list[int]] | None"]


@dataclass
class RecallCounters:
    recalls: int = 0  # requests that brought text back
    recalled_spans: int = 0  # evicted sentences brought back
    recalled_tokens: int = 0  # tokens decoded again for them (recomputed, wrapper included)
    recall_s: float = 0.0  # all of recall's time, requests that brought nothing back included
    recall_checks: int = 0  # requests that looked for evicted text to bring back
    recall_probe_s: float = 0.0  # of recall_s: the query probes ("attention", or "both" when no word is on the cue)
    recall_block_s: float = 0.0  # of recall_s: decoding the recalled blocks; the rest is choosing
    restored_tokens: int = 0  # recalled tokens whose saved KV was restored rather than recomputed
    recall_dropped_tokens: int = 0  # kept fragments of recalled sentences removed where they first stood
    generation_recalls: int = 0  # of recalls: those fired inside a generation (generation/generation_recall.py)
    generation_recall_s: float = 0.0  # their time: looks that found nothing, blocks, and the sentence decoded again
    generation_recall_tokens: int = 0  # tokens they decoded: the blocks, and the sentences decoded again after them


@dataclass
class RecallState:
    """What the engine keeps about recall between requests (it goes into snapshots and session files)."""

    barrier: int = 0  # the sequence cannot be rolled back below this index: a block sits behind it
    next_lpos: int = BLOCK_LPOS
    blocks: list[list[Any]] = field(default_factory=list)  # [lpos_lo, lpos_hi, [[lo, hi], ...]] of live blocks
    counters: RecallCounters = field(default_factory=RecallCounters)

    def to_json(self) -> dict[str, Any]:
        return {"barrier": self.barrier, "next_lpos": self.next_lpos, "blocks": self.blocks, **asdict(self.counters)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RecallState:
        try:
            # the time split and the checks came later: a session file saved before them has none
            later = {
                "recall_checks",
                "recall_probe_s",
                "recall_block_s",
                "restored_tokens",
                "recall_dropped_tokens",
                "generation_recalls",
                "generation_recall_s",
                "generation_recall_tokens",
            }
            counters = RecallCounters(
                **{k: d[k] for k in RecallCounters.__dataclass_fields__ if k not in later or k in d}
            )
            return cls(int(d["barrier"]), int(d["next_lpos"]), [list(b) for b in d["blocks"]], counters)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed recall state: {exc!r}") from None


def default_recall_tokens(kv_budget: int, protected: int, n_keep: int) -> int:
    """Tokens one request may bring back: a few sentences, never more than half the evictable cells."""
    return max(0, min(96, (kv_budget - protected - n_keep) // 2))


def recalled_live(engine: KVEngine, lpos: Sequence[int] | None = None) -> set[int]:
    """Sequence indices whose recalled copy is still in the cache, token by token: a block's text is evicted like
    any other, and a fact whose cells went while a word of its block stayed is evicted again, not held. Blocks with
    no live cell are dropped from the state."""
    if lpos is None:
        lpos = engine.scorer.cell_lpos() if engine.scorer is not None else []
    block_live = {p for p in lpos if p >= BLOCK_LPOS}
    state = engine.recall_state
    state.blocks = [b for b in state.blocks if any(b[0] <= p < b[1] for p in block_live)]
    held: set[int] = set()
    for _, _, spans in state.blocks:
        for span in spans:
            lo, hi = span[0], span[1]
            at = span[2] if len(span) > 2 else None  # where the span's first token sits in the block
            if at is None or at < 0:  # unknown: a block saved before stop 32, or a span not found in its block
                held.update(range(lo, hi))
                continue
            held.update(lo + p - at for p in block_live if at <= p < at + hi - lo)
    return held


def evicted_runs(engine: KVEngine) -> list[tuple[int, int]]:
    """Runs [lo, hi) of logged sequence indices that no live cell holds, a live recalled copy included."""
    lpos = engine.scorer.cell_lpos() if engine.scorer is not None else []
    live = {p for p in lpos if 0 <= p < BLOCK_LPOS} | recalled_live(engine, lpos)
    lo, end = engine.log.start, min(engine.log.end, engine.n_past)
    return gaps(sorted(p for p in live if lo <= p < end), lo, end)


def evicted_spans(engine: KVEngine, runs: Sequence[tuple[int, int]], piece: Callable[[int], str]) -> list[Span]:
    """recall_select.sentences(runs) from the engine's span index: a long conversation is not cut again per request."""
    return engine.span_index.sync(engine.log).spans(runs, engine.log.tokens, piece, MAX_SPAN_TOKENS)


def span_places(block: Sequence[int], ids: Sequence[Sequence[int]]) -> list[int]:
    """Where each span's tokens start in the block (-1: not found). A wrap renders the recalled text into the chat
    template and tokenizes it again, so a span's first token may change (a leading space dropped); its other tokens
    are found as they are, in order."""
    out, cursor = [], 0
    for t in ids:
        key, back = (list(t[1:]), 1) if len(t) > 1 else (list(t), 0)
        at = -1
        for k in range(cursor, len(block) - len(key) + 1):
            if list(block[k : k + len(key)]) == key:
                at, cursor = k - back, k + len(key)
                break
        out.append(at)
    return out


def select(
    engine: KVEngine,
    new_tokens: Sequence[int],
    piece: Callable[[int], str],
    max_tokens: int,
    best_last: bool = False,
    must: str | None = None,
    before: int | None = None,
) -> list[Span]:
    """The evicted sentences the new text needs, in sequence order; best_last: in rank order with the best last, for
    a block that sits right before what asked for it (a completion's cue), where a model copies what is nearest.
    must: only sentences with this word, chosen by the words alone (recall inside a generation: the word that asked).
    before: only text before this sequence index (recall inside a generation: not the sentence in progress)."""
    runs = evicted_runs(engine)
    if before is not None:
        runs = [(lo, min(hi, before)) for lo, hi in runs if lo < before]
    if not runs:
        return []
    bounds = (engine.log.start, min(engine.log.end, engine.n_past if before is None else min(engine.n_past, before)))
    evicted = runs
    runs = whole_sentences(runs, bounds, engine.log.tokens, piece, MAX_SPAN_TOKENS)
    spans = evicted_spans(engine, runs, piece)
    by = engine.config.recall_by
    chosen: list[Span] = []
    text = "".join(piece(t) for t in new_tokens[-QUERY_TOKENS:])
    cue = last_sentence(text)  # what the request asks (the question of a chat turn, the cue a completion ends on)
    lengths = asked_digits(last_sentence_text(text))  # "which 5-digit number ...": only spans with one
    if by in ("bm25", "both") or must is not None:  # a word asked: the words answer, whatever recall_by says
        query = query_weights(text)
        held = sentences(held_runs(evicted, bounds), engine.log.tokens, piece, MAX_SPAN_TOKENS)
        cover = HeldCover(held, cue)

        def admit(s: Span) -> bool:
            return (
                on_cue(s, cue)
                and adds_a_word(s, query.keys())
                and not is_rival(s, cue)
                and (must is None or must in s.words)
                and not cover.covers(s)
                and has_digits(s, lengths)
            )

        chosen = choose(rank(spans, query), max_tokens, admit, best_last)
    if must is not None:
        return chosen
    # both: the words find what the new text names, and then no query probe runs; the model's attention decides
    # only when no sentence is on the cue (a question in other words)
    if by == "bm25" or (chosen and not ATTENTION_BESIDE_WORDS):
        return chosen
    by_attention = _by_attention(engine, new_tokens, spans, piece)
    if by == "attention" or not chosen:
        picked = choose(by_attention, max_tokens, lambda s: not is_rival(s, cue), best_last)
        return with_next(picked, spans, max_tokens, lambda s: not is_rival(s, cue)) if ATTENTION_NEXT else picked
    # (the A/B's old way) attention's best span joins BM25's picks when it fits, placed first: the text nearest the
    # question is what the question named (a story sentence after "My locker number is 90517." made SmolLM2 go on
    # with the story)
    used, have = sum(s.n_tokens for s in chosen), {s.lo for s in chosen}
    best = next((s for _, s in by_attention if not is_rival(s, cue)), None)
    if best is not None and best.lo not in have and used + best.n_tokens <= max_tokens:
        chosen = [best, *chosen]
    return chosen


def _around(engine: KVEngine, wrap: Wrap | None, around: Around | None) -> tuple[list[int], list[int]] | None:
    """The wrap's tokens before and after the recalled text (none for a completion's raw block) when the engine
    keeps saved KV and the wrap can say them; None: the block is recomputed whole. A completion's raw block is
    restored only with recall_restore="all": there restored rows copied fewer digits than recomputed ones
    (docs/recall.md, "Why it is not the default"), while a chat turn's answered as often."""
    if not engine.kv_store_bytes:
        return None
    if wrap is None:
        return ([], []) if engine.config.recall_restore == "all" else None
    return around() if around is not None else None


def _by_attention(
    engine: KVEngine, new_tokens: Sequence[int], spans: list[Span], piece: Callable[[int], str]
) -> list[tuple[float, Span]]:
    t0 = time.perf_counter()
    probe = engine.query_probe(new_tokens)
    engine.recall_state.counters.recall_probe_s += time.perf_counter() - t0
    if probe is None or engine.keys is None:
        return []
    mass = attention_mass(probe[0], probe[1], engine.keys.keys())
    ranked = rank_by_attention(spans, mass, engine.keys.start)
    if logger.isEnabledFor(logging.DEBUG):
        for m, sp in ranked[:5]:
            text = "".join(piece(t) for t in engine.log.tokens(sp.lo, sp.hi))
            logger.debug("attention %.4f (%.1fx avg/token): %r", m, m / sp.n_tokens * len(mass), text)
    return ranked


@dataclass
class PendingBlock:
    """A recomputed block that decode() carries in a chunk (KVEngine.decode(block=...)): after the head, in the
    head's ubatch (the default), or inside the new text's first ubatch (FUSED_BLOCK). It then costs its tokens'
    share of that ubatch, not a ubatch of its own (docs/recall.md, "A shorter block")."""

    at: int  # tokens of the new text before it (the head: an answer's undecoded last token, a message's header)
    tokens: list[int]
    lpos: list[int]
    landed: Callable[[float], None]  # called with its share of the ubatch's seconds once it is in the cache
    pin_back: int = 0  # positions of the same block already in the cache just before it, pinned with it


@dataclass
class Recalled:
    """What recall_before did: a block already decoded (the head before it), or one left for decode to carry."""

    decoded: int = 0
    pending: PendingBlock | None = None

    def __bool__(self) -> bool:
        return bool(self.decoded or self.pending)


def recall_before(
    engine: KVEngine,
    new_tokens: Sequence[int],
    piece: Callable[[int], str],
    wrap: Wrap | None = None,
    head: Sequence[int] = (),
    around: Around | None = None,
    query: Sequence[int] | None = None,
    then: Sequence[int] = (),
    chosen: list[Span] | None = None,
) -> Recalled:
    """Bring the evicted text relevant to new_tokens back as a pinned block at the next positions. head: tokens
    that must precede the block (an answer's undecoded last token, the new user message's header). Head and block
    are decoded here, in one ubatch when they fit, and the caller decodes new_tokens next. With FUSED_BLOCK on, a
    recomputed block is returned as `pending` instead, for the caller to decode inside head + new_tokens
    (KVEngine.decode(block=...)), and so is the tail of a restored block whose wrap rides (RIDE_RESTORED_WRAP:
    head, label and runs are in the cache already). Either way the caller calls release_pin after new_tokens. query: the text that
    chooses what comes back, when it is not new_tokens (a block placed after the user's words has them in head). then:
    new_tokens, when head is the request's own text before them (a completion's block just before its last
    sentence): head is chunked and probed as the whole request would be (KVEngine.decode's `then`). chosen: the
    sentences to bring back, already selected (recall inside a generation looks before it rolls back)."""
    if engine.scorer is None or not engine.recall_enabled or engine.recall_tokens <= 0 or engine.n_past == 0:
        return Recalled()
    t0 = time.perf_counter()
    state = engine.recall_state
    c = state.counters
    c.recall_checks += 1
    if chosen is None:
        chosen = select(engine, new_tokens if query is None else query, piece, engine.recall_tokens, bool(then))
    raw = [t for s in chosen for t in engine.log.tokens(s.lo, s.hi)]
    block = (wrap(raw) if wrap is not None else raw) if chosen else []
    if chosen and (not block or len(block) > engine.n_batch):
        logger.debug("recall skipped: %s", "no well-formed place for it" if not block else "block too long")
        block = []
    if not block:
        c.recall_s += time.perf_counter() - t0  # a look that found nothing costs time too
        return Recalled()
    parts = _around(engine, wrap, around)  # with saved KV (recall_kv_bytes) the raw ids are restored, not recomputed
    runs = [(s.lo, s.hi) for s in chosen]
    restored = parts is not None and engine.restorable(runs)
    if restored:
        assert parts is not None
        block = [*parts[0], *raw, *parts[1]]
    lpos = list(range(state.next_lpos, state.next_lpos + len(block)))
    barrier = engine.n_past + len(head)  # the block sits in front of the new text's first token

    def landed(seconds: float) -> None:
        _record(engine, chosen, block, lpos, len(new_tokens), barrier, piece)
        c.recall_block_s += seconds
        c.recall_s += seconds

    pending = PendingBlock(len(head), list(block), lpos, landed)
    c.recall_s += time.perf_counter() - t0  # choosing; the block's decode is added as it lands
    if not restored and FUSED_BLOCK and len(head) + len(block) <= engine.chunk_tokens(len(head) + len(new_tokens)):
        return Recalled(pending=pending)
    if restored and RIDE_RESTORED_WRAP and head and parts is not None and parts[1]:
        return _restore_riding(engine, head, parts, runs, len(raw), lpos, landed, then)
    if restored:
        assert parts is not None
        if head:
            engine.decode(head, logits_last=False, then=then)  # the turn's own tokens, not recall's
        t_block = time.perf_counter()
        engine.restore_block(parts[0], runs, parts[1], lpos)
        c.restored_tokens += len(raw)
        landed(time.perf_counter() - t_block)
    elif head and len(head) + len(block) <= engine.chunk_tokens(len(head) + len(then)):
        # head and block in one ubatch, evicted down to the budget before the new text: recall costs the block's
        # tokens there, where a ubatch of the head's own cost SmolLM2 as much as 3 tokens of the block
        engine.decode(head, logits_last=False, block=pending, then=then)
    else:
        if head:
            engine.decode(head, logits_last=False, then=then)
        t_block = time.perf_counter()
        engine.decode_block(block, lpos)
        landed(time.perf_counter() - t_block)
    return Recalled(decoded=len(block))


def _restore_riding(
    engine: KVEngine,
    head: Sequence[int],
    parts: tuple[list[int], list[int]],
    runs: list[tuple[int, int]],
    n_raw: int,
    lpos: list[int],
    landed: Callable[[float], None],
    then: Sequence[int],
) -> Recalled:
    """A restored block whose wrap rides in ubatches the turn decodes anyway: the label in the head's, the text after
    the restored runs in the new text's first. The runs are written between the two (no ubatch of their own, and no
    K shift where the scorer turns K: engine.restore_runs). Returns the tail as a pending block for the caller's
    decode."""
    prefix, suffix = parts
    spent = [0.0]

    def add(seconds: float) -> None:
        spent[0] += seconds

    if prefix:
        pending = PendingBlock(len(head), list(prefix), lpos[: len(prefix)], add)
        engine.decode(head, logits_last=False, block=pending, then=then)
    else:
        engine.decode(head, logits_last=False, then=then)
    t0 = time.perf_counter()
    engine.restore_runs(runs, lpos[len(prefix) : len(prefix) + n_raw], len(prefix))
    engine.recall_state.counters.restored_tokens += n_raw
    add(time.perf_counter() - t0)
    tail = PendingBlock(
        0, list(suffix), lpos[len(prefix) + n_raw :], lambda s: landed(spent[0] + s), len(lpos) - len(suffix)
    )
    return Recalled(decoded=len(prefix) + n_raw, pending=tail)


def _record(
    engine: KVEngine,
    chosen: list[Span],
    block: list[int],
    lpos: list[int],
    n_new: int,
    barrier: int,
    piece: Callable[[int], str],
) -> None:
    """A block is in the cache, in front of sequence index `barrier`: keep where its spans sit, and count it."""
    state = engine.recall_state
    c = state.counters
    places = span_places(block, [engine.log.tokens(s.lo, s.hi) for s in chosen])
    state.blocks.append(
        [
            lpos[0],
            lpos[-1] + 1,
            [[s.lo, s.hi, lpos[0] + k if k >= 0 else -1] for s, k in zip(chosen, places, strict=True)],
        ]
    )
    state.next_lpos = lpos[-1] + 1
    state.barrier = barrier
    if DROP_KEPT_FRAGMENTS:
        c.recall_dropped_tokens += drop_kept_fragments(engine, chosen, piece)
    c.recalls += 1
    c.recalled_spans += len(chosen)
    c.recalled_tokens += len(block)
    logger.debug(
        "recalled %d spans (%d tokens) before %d new tokens: %r",
        len(chosen),
        len(block),
        n_new,
        "".join(piece(t) for t in block),
    )
