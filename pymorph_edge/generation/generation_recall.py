"""Recall inside one generation: a word the text has just completed, whose earlier mentions the cache no longer
holds, brings back the evicted sentences that contain it, just before the sentence in progress.

Request recall (engine/recall.py) looks once, at a request's new text. A long answer, or a long text decoded token by
token, has no such boundary: a fact stated once at the start is evicted long before the text comes back to it. So
the generation loop calls `after_token` once per decoded token, and it must cost next to nothing when nothing is
asked. It keeps an index of the log's words (recall_select.words: no stopwords), each with the sequence indices it
was mentioned at, fed token by token. When a token completes a word (a non-word character follows it):
- the word was mentioned before the sentence in progress, at most MAX_MENTIONS times: a fact is stated once or twice,
  while a story's hero comes up in every paragraph and what the policy keeps of her is enough;
- none of those mentions is in the cache any more, as itself or as a recalled copy (recall.evicted_runs);
- they are not the same ones a look at this word already found nothing for.
Then recall chooses among the evicted sentences before the sentence in progress that contain the word, ranked by
BM25 against that sentence and with its rival test (recall.select(must=..., before=...)). What it chooses is brought
back where a completion's block goes (recall_placement.BEFORE_LAST_SENTENCE): the sentence in progress is rolled
back (at most one ubatch of it, none of it that is evicted), the block decoded and pinned, and the rest decoded again
after it, so the next token's logits read the block right before the cue. The text the caller sees does not change;
the block sits in the cache only (docs/recall.md, "Inside one generation"). The index is not saved with a session:
a reloaded log (a truncation, a reset) is read again, from the last token boundary no word runs across.
"""

from __future__ import annotations

import logging
import re
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable

from pymorph_edge.engine.kv_engine import KVEngine
from pymorph_edge.engine.recall import MAX_SPAN_TOKENS, evicted_runs, recall_before, select
from pymorph_edge.engine.recall_select import SENTENCE_END, STOPWORDS

logger = logging.getLogger(__name__)

# off by default (EngineConfig(recall_in_generation=None)): it copies facts from far back on the teacher-forced fact
# stream as well as the full cache or better, but raises perplexity on real text, where rare words recur far apart
# and the blocks they bring back are not what the next tokens need: SmolLM2 11.39 against 11.29 at budget 512, Gemma 3
# 8.25 against 8.17 at 1024 (docs/recall.md, "Inside one generation")
RECALL_IN_GENERATION = False
MAX_MENTIONS = 2  # earlier mentions a word may have and still ask for what it named (see the module docstring)
# True (since stop 40): a mention counts as held only while the rest of its sentence is live too, so a half-kept fact
# ("Maria" kept, her code evicted, as MorphKV does on the fact stream) asks as well. Counting the mention alone, the
# first reminder of each stream, ~600 tokens in, was lost (recall_stream's "+sentence" was the A/B)
WHOLE_SENTENCE_HELD = True
# recall inside a generation decodes at most one token in SPEND of those the generation decoded (a block and the
# sentence decoded again after it), so text full of rare words (code, identifiers, a model writing noise) cannot
# make it cost more than that; the teacher-forced stream spends about one in twenty (docs/recall.md)
SPEND = 8
# True (since stop 40): the block goes before the last BACK tokens, so the recent window the text is being written
# from stays whole after it, instead of before the sentence in progress, which could cut into that window. Alone it
# copied less on the stream; with WHOLE_SENTENCE_HELD it keeps most of that gain and cut the perplexity cost on real
# text by three quarters on SmolLM2 (recall_stream's "+back"; docs/recall.md)
BEFORE_WINDOW = True
BACK = 32  # MorphKV's default window
# a word mentioned this often is common: its mentions are no longer stored (it never asks again), so the index of a
# long conversation holds the rare words' mentions only
COMMON = 16
_WORD_CHARS = re.compile(r"[a-z0-9]+")
_LEADING = re.compile(r"[a-z0-9]*")
_TRAILING = re.compile(r"[a-z0-9]*\Z")

Piece = Callable[[int], str]


class GenerationRecall:
    """The word index and the trigger for one engine; `after_token` runs after each decoded token."""

    def __init__(self, engine: KVEngine, piece: Piece) -> None:
        self.engine, self.piece = engine, piece
        self.mentions: dict[str, list[int]] = {}  # word -> sequence indices of the tokens each mention started in
        self._common: set[str] = set()  # words with COMMON mentions: no more are stored
        # (completed at, started at, word) of the last cache's worth of tokens, in the order indexed: what a
        # truncation can take back (the engine truncates only within its live tail)
        self._entries: deque[tuple[int, int, str]] = deque()
        self._sentences: deque[int] = deque([0])  # sequence indices where a sentence starts, ascending
        self._horizon = 0  # entries completed before this were let go: a truncation below it rebuilds the index
        self._indexed = 0  # log indices below this are in the index
        self._word, self._word_at = "", 0  # a word whose end has not been seen yet, and where it started
        self._looked: dict[str, tuple[int, ...]] = {}  # word -> the mentions a look found nothing for
        self._steps = 0  # after_token calls: tokens the generations decoded
        self._spent = 0  # tokens recall decoded inside them (blocks, and sentences decoded again)

    def after_token(self) -> bool:
        """Index what the log gained, and recall what a word just completed asks for; True when the cache changed
        (the last token was decoded again: its logits are fresh)."""
        engine = self.engine
        if not engine.recall_enabled or engine.scorer is None or engine.recall_tokens <= 0:
            return False
        at = engine.log.take_rewind()
        if at is not None:
            self._rewind(at)
        completed = self._index(engine.log.start, min(engine.log.end, engine.n_past))
        self._let_go(engine.n_past - engine.n_ctx - engine.n_batch)
        self._steps += 1
        if self._spent * SPEND > self._steps:  # recall's share of the decoding is spent for now
            return False
        evicted: Callable[[int], bool] | None = None  # read off the cell map once, when a word may ask
        for word, sentence, at in completed:
            if at < engine.n_past - 1 or word in self._common:  # a prompt's words: request recall looked at them
                continue
            earlier = self._earlier(word, sentence)
            if not earlier or len(earlier) > MAX_MENTIONS or self._looked.get(word) == earlier:
                continue
            evicted = evicted or self._evicted()
            if not all(any(evicted(i) for i in self._held_with(m)) for m in earlier):
                continue
            self._looked[word] = earlier
            if self._recall(word, sentence):
                return True
        return False

    def _earlier(self, word: str, sentence: int) -> tuple[int, ...]:
        """The word's mentions before index `sentence`, up to MAX_MENTIONS + 1 of them (the newest)."""
        out: list[int] = []
        for m in reversed(self.mentions.get(word, ())):
            if m < sentence:
                out.append(m)
                if len(out) > MAX_MENTIONS:
                    break
        return tuple(reversed(out))

    def _let_go(self, below: int) -> None:
        """Drop the rollback record of what no truncation can reach any more."""
        while self._entries and self._entries[0][0] < below:
            self._entries.popleft()
            self._horizon = below
        while len(self._sentences) > 1 and self._sentences[1] < below:
            self._sentences.popleft()

    def _held_with(self, m: int) -> range:
        """The indices that must all be live for the mention at m to count as held (see WHOLE_SENTENCE_HELD)."""
        if not WHOLE_SENTENCE_HELD:
            return range(m, m + 1)
        end = m + 1
        for tok in self.engine.log.tokens(m, m + MAX_SPAN_TOKENS):
            if SENTENCE_END.search(self.piece(tok)) is not None:
                break
            end += 1
        return range(m, min(end, self.engine.n_past))

    def _evicted(self) -> Callable[[int], bool]:
        """Whether a sequence index is held by no live cell, its recalled copies included."""
        runs = evicted_runs(self.engine)
        starts = [lo for lo, _ in runs]

        def evicted(i: int) -> bool:
            k = bisect_right(starts, i) - 1
            return k >= 0 and runs[k][0] <= i < runs[k][1]

        return evicted

    def _index(self, start: int, end: int) -> list[tuple[str, int, int]]:
        """Feed log tokens [indexed, end) to the index; returns the content words they completed, each with where
        its sentence started and the index of the token that completed it."""
        if self._indexed < start:  # the log dropped its oldest tokens before they were indexed
            self._indexed, self._word = start, ""
        done: list[tuple[str, int, int]] = []
        ids = self.engine.log.tokens(self._indexed, end)
        for i, tok in enumerate(ids, self._indexed):
            text = self.piece(tok).lower()
            lead = _LEADING.match(text)
            n = lead.end() if lead is not None else 0
            if n == len(text):  # the word (if any) goes on
                if text and not self._word:
                    self._word_at = i
                self._word += text
                continue
            if n and not self._word:
                self._word_at = i
            words = [(self._word + text[:n], self._word_at)] if self._word or n else []
            tail = _TRAILING.search(text)
            cut = tail.start() if tail is not None else len(text)
            words += [(m.group(), i) for m in _WORD_CHARS.finditer(text, n, cut)]
            self._word, self._word_at = text[cut:], i
            sentence = self._sentences[-1]
            for w, s in words:
                if w not in STOPWORDS:  # a stopword never asks, and never counts as a mention
                    self._add(w, s, i)
                    done.append((w, sentence, i))
            if SENTENCE_END.search(text) is not None:
                self._sentences.append(i + 1)
        self._indexed = max(self._indexed, end)
        return done

    def _add(self, word: str, start: int, completed: int) -> None:
        if word in self._common:
            return
        ms = self.mentions.setdefault(word, [])
        if len(ms) >= COMMON:
            self._common.add(word)
            del self.mentions[word]
            return
        ms.append(start)
        self._entries.append((completed, start, word))

    def _rewind(self, n: int) -> None:
        """Forget what the index read at and after sequence index n (the log was truncated there). It is read again
        from the last token boundary at or before n where no word was running (the token before ends in a non-word
        character), so a word cut by the truncation is not half-kept."""
        log = self.engine.log
        b = min(n, self._indexed)
        if b < self._horizon or b <= log.start:  # a reset, a reload, or deeper than the record: read all again
            self.mentions, self._common, self._entries = {}, set(), deque()
            self._sentences, self._horizon = deque([0]), 0
            self._indexed, self._word = log.start, ""
            self._looked.clear()
            return
        while b > log.start:
            prev = log.tokens(b - 1, b)
            tail = _TRAILING.search(self.piece(prev[0]).lower()) if prev else None
            if tail is None or not tail.group():
                break
            b -= 1
        while self._entries and self._entries[-1][0] >= b:  # entries are in the order their words completed
            _, _, w = self._entries.pop()
            ms = self.mentions.get(w)
            if ms is None:  # it became common since: it stays common
                continue
            ms.pop()
            if not ms:
                del self.mentions[w]
        while len(self._sentences) > 1 and self._sentences[-1] > b:
            self._sentences.pop()
        self._indexed, self._word = b, ""
        self._looked.clear()

    def _recall(self, word: str, sentence: int) -> bool:
        """Bring back what `word` names, before the sentence in progress (from index `sentence`)."""
        engine = self.engine
        t0 = time.perf_counter()
        # at least the last token is decoded again, for the next token's logits, and at most one ubatch; none that
        # is evicted (truncate keeps what precedes its live tail)
        at = engine.n_past - BACK if BEFORE_WINDOW else sentence
        cut = min(max(at, engine.live_from(), engine.n_past - engine.n_batch), engine.n_past - 1)
        tail = engine.history.tail(engine.n_past - cut)
        before = min(sentence, cut)  # what the sentence in progress lost is not earlier text
        query = engine.log.tokens(sentence, engine.n_past)  # the sentence so far, though only its end is decoded again
        chosen = select(engine, query, self.piece, engine.recall_tokens, best_last=True, must=word, before=before)
        block = sum(s.n_tokens for s in chosen)
        if not chosen:
            engine.recall_state.counters.generation_recall_s += time.perf_counter() - t0
            return False
        logger.debug("recall inside the generation on %r: %d sentences, %d tokens", word, len(chosen), block)
        engine.truncate(cut)
        engine.log.take_rewind()  # the same tokens come back next: the index stays as it is
        engine.close_gap()  # under a 1-token window (TOVA) the token before the cut may be evicted
        recalled = recall_before(engine, tail, self.piece, chosen=chosen)
        try:
            engine.decode(tail)
        finally:
            if recalled:
                engine.release_pin()
        c = engine.recall_state.counters
        c.generation_recalls += bool(recalled)
        c.generation_recall_tokens += recalled.decoded + len(tail)
        c.generation_recall_s += time.perf_counter() - t0
        self._spent += recalled.decoded + len(tail)
        return True


def for_engine(engine: KVEngine, piece: Piece, enabled: bool | None) -> GenerationRecall | None:
    """The watcher a generation loop calls, or None where recall is off (enabled None: RECALL_IN_GENERATION)."""
    on = RECALL_IN_GENERATION if enabled is None else enabled
    return GenerationRecall(engine, piece) if on and engine.recall_enabled else None
