"""The log's sentence spans, cut once and kept: a request's choice walks them instead of cutting the log again.

`recall_select.sentences` cuts a run left to right: a span ends after a sentence end, or after `max_span` tokens,
and the next one starts there. So where a span ends depends only on where it began and on the logged tokens,
which never change while they are logged. Every run that reaches a given start cuts the same span from it. The
index keeps each cut it has made (start -> end and the span's words), and a run follows them. Only text that no
earlier request cut is read again.

Before this, every request cut the whole evicted log again: about 1.5 us a token on two cores, so 0.6 s a chat
turn at 400K tokens of history, and about 3 s at the log's default bound of 2M tokens
(`benchmarks/recall_select_scale.py`). The spans are the same objects every time; callers must not change them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pymorph_edge.engine.recall_select import SENTENCE_END, Span, span_words, words

if TYPE_CHECKING:
    from pymorph_edge.engine.evicted_log import EvictedLog

# how often a start below the log's first index is looked for: the log drops its oldest tokens in steps of 1/16
# of its bound, so a sweep per drop is cheap against the cuts it frees
_SWEEP_EVERY = 4096
intern = sys.intern


class SpanIndex:
    """Cuts of one log: start -> (end, the span, or None when the text between has no words)."""

    def __init__(self) -> None:
        self._cuts: dict[int, tuple[int, Span | None]] = {}
        self._swept_at = 0

    def __len__(self) -> int:
        return len(self._cuts)

    @property
    def table_bytes(self) -> int:
        """The bytes of the index's own table: what a copy costs, as the spans are shared."""
        return sys.getsizeof(self._cuts)

    def copy(self) -> SpanIndex:
        """An index of the same cuts that changes apart from this one (a snapshot's: engine/engine_snapshot.py). The
        spans themselves are shared; nothing changes them."""
        twin = SpanIndex()
        twin._cuts, twin._swept_at = dict(self._cuts), self._swept_at
        return twin

    def sync(self, log: EvictedLog) -> SpanIndex:
        """Drop the cuts that the log's truncations, clears and reloads since the last sync made stale, and those
        below its first index; returns self, now true to the log."""
        at = log.take_rewind("spans")
        if at is not None:
            self.forget_from(at)
        self.forget_before(log.start)
        return self

    def forget_from(self, n: int) -> None:
        """The log was rolled back to index n (truncated, cleared or reloaded): cuts that read a token at n or past
        it read text that may not come back."""
        if n <= 0:
            self._cuts.clear()
            self._swept_at = 0
        else:
            self._cuts = {lo: cut for lo, cut in self._cuts.items() if cut[0] <= n}

    def forget_before(self, start: int) -> None:
        """The log dropped the tokens below `start`: no run starts there any more."""
        if start - self._swept_at >= _SWEEP_EVERY:
            self._cuts = {lo: cut for lo, cut in self._cuts.items() if lo >= start}
            self._swept_at = start

    def spans(
        self,
        runs: Sequence[tuple[int, int]],
        tokens_of: Callable[[int, int], list[int]],
        piece: Callable[[int], str],
        max_span: int,
    ) -> list[Span]:
        """What recall_select.sentences(runs, ...) gives, from the kept cuts where it can."""
        out: list[Span] = []
        cuts = self._cuts
        for lo, hi in runs:
            at = lo
            while at < hi:
                cut = cuts.get(at)
                if cut is None:
                    cut = self._cut(at, hi, tokens_of, piece, max_span)
                if cut[0] > hi:  # the run ends inside this sentence: that part is a span of this run only
                    ws = words("".join(piece(t) for t in tokens_of(at, hi)))
                    if ws:
                        out.append(Span(at, hi, span_words(ws), tuple(ws)))
                    break
                if cut[1] is not None:
                    out.append(cut[1])
                at = cut[0]
        return out

    def _cut(
        self,
        at: int,
        hi: int,
        tokens_of: Callable[[int, int], list[int]],
        piece: Callable[[int], str],
        max_span: int,
    ) -> tuple[int, Span | None]:
        """The span sentences() cuts from `at`, kept when it ends by hi; (hi + 1, None) when the run ends first."""
        parts = []
        for i, tok in enumerate(tokens_of(at, min(hi, at + max_span))):
            p = piece(tok)
            parts.append(p)
            if i + 1 >= max_span or SENTENCE_END.search(p) is not None:
                # kept for the log's lifetime, so each word is one shared string, not a copy per sentence (a third
                # of the index's memory on prose)
                ws = [intern(w) for w in words("".join(parts))]
                cut = (at + i + 1, Span(at, at + i + 1, span_words(ws), tuple(ws)) if ws else None)
                self._cuts[at] = cut
                return cut
        return (hi + 1, None)
