"""The span index (engine/span_index.py) gives exactly what cutting the runs again gives, after any mix of growth,
rollback and dropped history, and a later request reads only what no earlier one cut."""

import math
import random

from pymorph_edge.engine.evicted_log import EvictedLog
from pymorph_edge.engine.recall import MAX_SPAN_TOKENS
from pymorph_edge.engine.recall_select import K1, MIN_IDF, B, gaps, query_weights, rank, sentences, whole_sentences
from pymorph_edge.engine.span_index import SpanIndex

# a toy vocabulary: words, numbers, sentence ends inside and at the end of a piece, newlines, pieces with no words
VOCAB = [" the", " locker", " number", " is", " 482", "13", ".", " Dana", " Porto", "!\n", "?", ",", " (", ")", "\n"]
VOCAB += [f" w{i}" for i in range(40)] + [" end. Then", " 7.5", "...", " "]


def piece(t: int) -> str:
    return VOCAB[t]


def random_runs(rng: random.Random, lo: int, hi: int) -> list[tuple[int, int]]:
    """Sorted disjoint runs in [lo, hi), as the cell map leaves them: kept cells split the evicted text."""
    cuts = sorted(rng.sample(range(lo, hi), min(hi - lo, rng.randrange(2, 40))))
    runs = [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if a < b]
    return runs


def cut_again(log: EvictedLog, runs, bounds, max_span=MAX_SPAN_TOKENS):
    widened = whole_sentences(runs, bounds, log.tokens, piece, max_span)
    return widened, sentences(widened, log.tokens, piece, max_span)


def index_spans(index: SpanIndex, log: EvictedLog, runs, max_span=MAX_SPAN_TOKENS):
    at = log.take_rewind("spans")
    if at is not None:
        index.forget_from(at)
    index.forget_before(log.start)
    return index.spans(runs, log.tokens, piece, max_span)


def test_the_index_cuts_what_sentences_cuts_through_growth_rollback_and_drops():
    rng = random.Random(7)
    for max_span in (MAX_SPAN_TOKENS, 5):
        # a small bound, so that the log drops its oldest tokens too
        log, index = EvictedLog(max_bytes=4 * 3000), SpanIndex()
        for step in range(300):
            r = rng.random()
            if r < 0.15 and log.end - log.start > 10:
                log.truncate(rng.randrange(max(log.start, log.end - 60), log.end))  # a diverging request
            else:
                log.extend(rng.randrange(len(VOCAB)) for _ in range(rng.randrange(1, 120)))
            if log.end - log.start < 2:
                continue
            bounds = (log.start, log.end if step % 3 else rng.randrange(log.start + 1, log.end + 1))
            runs = random_runs(rng, *bounds)
            widened, expected = cut_again(log, runs, bounds, max_span)
            assert index_spans(index, log, widened, max_span) == expected, (step, widened)
        assert len(index) > 0


def test_a_later_request_reads_only_what_no_earlier_one_cut():
    rng = random.Random(3)
    log, index = EvictedLog(), SpanIndex()
    log.extend(rng.randrange(len(VOCAB)) for _ in range(20000))
    read = []

    def counting(t: int) -> str:
        read.append(t)
        return piece(t)

    runs = [(0, 19000), (19100, 20000)]
    first = index.spans(runs, log.tokens, counting, MAX_SPAN_TOKENS)
    assert len(read) >= 19900
    read.clear()
    again = index.spans(runs, log.tokens, counting, MAX_SPAN_TOKENS)
    assert again == first == sentences(runs, log.tokens, piece, MAX_SPAN_TOKENS)
    # only the runs' unfinished last sentences are read again: each shorter than a span
    assert len(read) < 2 * MAX_SPAN_TOKENS
    read.clear()
    log.extend(rng.randrange(len(VOCAB)) for _ in range(500))
    index.spans([(0, 19000), (19100, 20500)], log.tokens, counting, MAX_SPAN_TOKENS)
    assert len(read) < 500 + 2 * MAX_SPAN_TOKENS  # the new text, and the old run's unfinished ends


def rank_visiting_every_span(spans, query):
    """BM25 as rank() defined it before it skipped spans without a query word: every span scored, zeros dropped."""
    n = len(spans)
    where = {w: {i for i, s in enumerate(spans) if w in s.words} for w in query}
    idf = {w: math.log(1 + (n - len(ix) + 0.5) / (len(ix) + 0.5)) for w, ix in where.items() if ix}
    groups = {}
    for w in idf:
        groups.setdefault(frozenset(where[w]), []).append(w)
    avg_len = sum(sum(s.words.values()) for s in spans) / n
    scored = []
    for s in spans:
        norm = K1 * (1 - B + B * sum(s.words.values()) / avg_len)
        score = sum(
            max(
                (query[w] * idf[w] * s.words[w] * (K1 + 1) / (s.words[w] + norm) for w in ws if s.words.get(w)),
                default=0.0,
            )
            for ws in groups.values()
        )
        if score > 0:
            scored.append((score, s))
    scored.sort(key=lambda x: (-x[0], x[1].lo))
    if not scored or max((idf[w] for w in scored[0][1].words if w in idf), default=0.0) < MIN_IDF:
        return []
    return scored


def test_ranking_only_the_spans_with_a_query_word_ranks_as_scoring_them_all():
    rng = random.Random(11)
    log = EvictedLog()
    log.extend(rng.randrange(len(VOCAB)) for _ in range(6000))
    spans = sentences([(0, 6000)], log.tokens, piece, MAX_SPAN_TOKENS)
    nonempty = 0
    for _ in range(200):
        question = "".join(piece(rng.randrange(len(VOCAB))) for _ in range(rng.randrange(1, 12)))
        query = query_weights(question + rng.choice(["", " What is my number?", " the locker"]))
        expected = rank_visiting_every_span(spans, query)
        assert rank(spans, query) == expected
        nonempty += bool(expected)
    assert nonempty > 50  # the comparison covered real rankings, not only empty ones


def test_the_evicted_runs_are_the_gaps_between_held_indices():
    assert gaps([0, 3, 4, 9], 0, 10) == [(1, 3), (5, 9)]
    assert gaps([], 5, 8) == [(5, 8)]
    assert gaps([2, 6, 12], 4, 10) == [(4, 6), (7, 10)]  # held indices outside [lo, end) cut nothing
