"""Which evicted text a new request needs: lexical relevance (BM25) of evicted sentences to the new text.

Attention-guided eviction cannot keep what nothing attends to for a thousand tokens, so the decision to bring
text back is made from the text itself when new text arrives. The evicted indices are cut into sentences
(split after ., !, ?, a newline, or every `max_span` tokens), and each is scored by Okapi BM25 against the
words of the new text. Words near the end of the new text weigh more: a request usually ends with what it
asks (the question of a chat turn, the cue a completion stops on), and a long request's earlier words match
much of any prose. So the last sentence of the new text is the query, and the rest barely counts. Two tests on
that last sentence decide which ranked sentences may come back: one must share a word with it (on_cue), and none
may say it about something else (is_rival).
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass, field
from itertools import pairwise

WORD = re.compile(r"[a-z0-9]+")
# English function words (the usual IR list: pronouns, auxiliaries and modals, prepositions, conjunctions) and
# chat-template words. A modal left in matched "Can you remind me of the number ..." to every story sentence
# with "can" in it, and those crowded out what the question meant
STOPWORDS = frozenset(
    "a about above after again against all am an and any are as at be because been before being below between "
    "both but by can could did do does doing down during each few for from further had has have having he her "
    "here hers herself him himself his how i if in into is it its itself just me might more most must my myself "
    "no nor not now of off on once only or other our ours ourselves out over own same shall she should so some "
    "such than that the their theirs them themselves then there these they this those through to too under "
    "until up us very was we were what when where which while who whom why will with would you your yours "
    "yourself yourselves im start end user assistant system turn model".split()
)
# A question may name what it asks for by its kind, not by the fact's words: "which 5-digit number did I give you
# earlier?" after "My customer ID is 22004." shares no word with it, and SmolLM2's attention then found the fact in
# 1 of 4 such dialogues, Gemma 3's in none. So a word that asks for a number is also a word of its own, NUMERAL,
# which every numeral in an evicted sentence is too (stop 35). WORD never yields "#": no text word collides.
NUMBER_WORDS = frozenset("number numbers digit digits numeral numerals".split())
NUMERAL = "#numeral"
TYPED_NUMBERS = True  # False: the words alone, as before stop 35 (recall_bench's "+untyped")
K1, B = 1.2, 0.75  # BM25's usual constants
SENTENCE_END = re.compile(r"[.!?\n]+")
NEAR = 0.3  # weight of the words of the sentence before the last one
FLOOR = 0.05  # and of every earlier word: a long request's prose matches much of any evicted prose
NEXT_GAP = 2  # tokens without words that may lie between a pick and the sentence with_next adds
RELATIVE_CUTOFF = 0.5  # spans scoring under this fraction of the best one are not worth their cells
MIN_IDF = 1.0  # the best span must match a word rarer than this in the evicted text, or nothing is recalled
# a span whose every word the request already says cannot hold what it asks (adds_a_word); False: the way before stop 43
# (recall_bench's "+echoes")
ECHOES_OUT = True
# a span is passed over when the cache holds a sentence matching all it matches and more (HeldCover); False: the way
# before stop 43 (recall_bench's "+covered")
COVERED_OUT = True


@dataclass(slots=True)
class Span:
    lo: int  # sequence index of the first token
    hi: int  # one past the last
    words: Counter[str]
    sequence: tuple[str, ...] = ()  # the words in order (is_rival aligns them with the request's)
    length: int = field(init=False, compare=False)  # BM25's document length: the counted words

    def __post_init__(self) -> None:
        self.length = sum(self.words.values())

    @property
    def n_tokens(self) -> int:
        return self.hi - self.lo


def words(text: str) -> list[str]:
    return [w for w in WORD.findall(text.lower()) if w not in STOPWORDS]


# "a 5-digit number", "four digits": a count of digits says what the number looks like, not which one it is. As a word
# it matched any sentence with that numeral: past n_ctx_train, "which 5-digit number did I give you earlier?" brought
# back "Here is part 5 of my notes:" instead of "My customer ID is 22004." (SmolLM2, 9K tokens of chat, stop 45)
DIGIT_COUNT = re.compile(
    r"\b([0-9]+|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve)[- ]digits?\b", re.IGNORECASE
)
# False: a count of digits is a word like any other, as before stop 45 (recall_bench's "+uncounted")
COUNTED_DIGITS = True
_COUNTS = {w: i + 1 for i, w in enumerate("one two three four five six seven eight nine ten eleven twelve".split())}


def asked_digits(sentence: str) -> set[int]:
    """The numbers of digits a sentence asks for ("a 5-digit code", "the four digits"): empty when it names none."""
    if not COUNTED_DIGITS:
        return set()
    return {int(n) if n.isdigit() else _COUNTS[n.lower()] for n in DIGIT_COUNT.findall(sentence)}


def has_digits(span: Span, lengths: Set[int]) -> bool:
    """Whether a span holds a numeral of at least the fewest digits asked: where the request asks for a 5-digit
    number, a sentence whose numbers are all shorter does not hold it ("part 5"). Longer ones may: "the last 4
    digits of my card" asks for part of a longer number."""
    return not lengths or any(w.isdigit() and len(w) >= min(lengths) for w in span.sequence)


def query_words(text: str) -> list[str]:
    """A request's words, and NUMERAL when one of them asks for a number. A count of digits is not a word of it."""
    ws = words(DIGIT_COUNT.sub(" digits ", text) if COUNTED_DIGITS else text)
    return ws + [NUMERAL] if TYPED_NUMBERS and any(w in NUMBER_WORDS for w in ws) else ws


def span_words(ws: list[str]) -> Counter[str]:
    """An evicted sentence's words for the ranking: each numeral counts as NUMERAL too."""
    return Counter(ws + [NUMERAL for w in ws if w.isdigit()])


def _ends_sentence(p: str) -> bool:
    return SENTENCE_END.search(p) is not None  # a regex, not a scan per character: it runs on every evicted token


def whole_sentences(
    runs: Sequence[tuple[int, int]],
    bounds: tuple[int, int],
    tokens_of: Callable[[int, int], list[int]],
    piece: Callable[[int], str],
    max_span: int,
) -> list[tuple[int, int]]:
    """Each evicted run widened to the sentences it touches (up to max_span tokens each way), merged. A fact is
    often half kept: pooling keeps a number's digits and evicts the words that say what it is; recalling the
    evicted half alone would bring back a cue without its value."""
    lo_all, hi_all = bounds
    out: list[tuple[int, int]] = []
    for lo, hi in runs:
        before = tokens_of(max(lo_all, lo - max_span), lo)
        k = len(before)
        while k > 0 and not _ends_sentence(piece(before[k - 1])):
            k -= 1
        lo2 = lo - (len(before) - k) if k > 0 or lo - len(before) == lo_all else lo
        after = tokens_of(hi, min(hi_all, hi + max_span))
        j = 0
        if hi > lo and not _ends_sentence(piece(tokens_of(hi - 1, hi)[0])):
            while j < len(after) and not _ends_sentence(piece(after[j])):
                j += 1
            j = min(j + 1, len(after))
        hi2 = hi + j
        if out and lo2 <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi2))
        else:
            out.append((lo2, hi2))
    return out


def sentences(
    runs: Sequence[tuple[int, int]],
    tokens_of: Callable[[int, int], list[int]],
    piece: Callable[[int], str],
    max_span: int,
) -> list[Span]:
    """Cut each run [lo, hi) into sentence spans with their words."""
    out: list[Span] = []
    for lo, hi in runs:
        ids = tokens_of(lo, hi)
        start, parts = 0, []
        for i, tok in enumerate(ids):
            p = piece(tok)
            parts.append(p)
            if i + 1 - start >= max_span or _ends_sentence(p) or i + 1 == len(ids):
                ws = words("".join(parts))
                if ws:
                    out.append(Span(lo + start, lo + i + 1, span_words(ws), tuple(ws)))
                start, parts = i + 1, []
    return out


def query_weights(new_text: str) -> dict[str, float]:
    """Each distinct word of the new text, weighted by its sentence: the last sentence that has words (the
    question of a chat turn, the cue a completion stops on) at 1, the one before at NEAR, the rest at FLOOR."""
    parts = [query_words(p) for p in SENTENCE_END.split(new_text)]
    parts = [p for p in parts if p]
    weights: dict[str, float] = {}
    for back, ws in enumerate(reversed(parts)):
        weight = 1.0 if back == 0 else NEAR if back == 1 else FLOOR
        for w in ws:
            weights[w] = max(weights.get(w, 0.0), weight)
    return weights


def _evidence(spans: list[Span], query: dict[str, float]) -> tuple[dict[str, float], list[list[str]], list[int]]:
    """IDF of each query word over the spans, the query words grouped by the spans they occur in (words that
    occur in exactly the same spans are one piece of evidence, usually a phrase the request repeats), and the
    spans with any query word: only those can score, and a long conversation has 10^5 spans."""
    n = len(spans)
    where: dict[str, set[int]] = {w: set() for w in query}
    keys = where.keys()
    for i, s in enumerate(spans):
        if not keys.isdisjoint(s.words):
            for w in s.words.keys() & keys:
                where[w].add(i)
    idf = {w: math.log(1 + (n - len(ix) + 0.5) / (len(ix) + 0.5)) for w, ix in where.items() if ix}
    groups: dict[frozenset[int], list[str]] = {}
    for w in idf:
        groups.setdefault(frozenset(where[w]), []).append(w)
    return idf, list(groups.values()), sorted(set().union(*where.values()))


def rank(spans: list[Span], query: dict[str, float]) -> list[tuple[float, Span]]:
    """BM25 scores of the spans (best first), with IDF over the spans themselves; [] when nothing matches a
    word rare enough to mean something.

    Query words that occur in exactly the same spans count once (the best of them): they are one piece of
    evidence, usually a phrase the request repeats. A cue "Earlier we noted that Camille's ticket number is" after
    earlier reminders "Earlier we noted that Helga's ticket number is 72135." otherwise scores those reminders
    twice for "earlier noted", above the fact "Camille's ticket number is 81333." that the name alone points at."""
    if not spans or not query:
        return []
    idf, groups, hits = _evidence(spans, query)
    avg_len = sum(s.length for s in spans) / len(spans)
    scored = []
    for s in (spans[i] for i in hits):
        norm = K1 * (1 - B + B * s.length / avg_len)
        score = 0.0
        for ws in groups:
            score += max(
                (query[w] * idf[w] * s.words[w] * (K1 + 1) / (s.words[w] + norm) for w in ws if s.words.get(w)),
                default=0.0,
            )
        if score > 0:
            scored.append((score, s))
    scored.sort(key=lambda x: (-x[0], x[1].lo))
    if not scored or max((idf[w] for w in scored[0][1].words if w in idf), default=0.0) < MIN_IDF:
        return []
    return scored


def last_sentence(new_text: str) -> list[str]:
    """The words of the new text's last sentence that has any (query_weights gives them the full weight)."""
    parts = [p for p in (query_words(x) for x in SENTENCE_END.split(new_text)) if p]
    return parts[-1] if parts else []


def last_sentence_text(new_text: str) -> str:
    """The text of the new text's last sentence that has any words."""
    parts = [x for x in SENTENCE_END.split(new_text) if query_words(x)]
    return parts[-1] if parts else ""


def on_cue(span: Span, cue: Sequence[str]) -> bool:
    """Whether a span shares a word with the request's last sentence. BM25 brings back only such spans: the
    sentences before the last one weigh in the ranking, but alone they match only prose like the request's own.
    With a continuation's fact still cached, its cue matched nothing evicted, and SmolLM2 got up to 7 sentences of
    prose back each time (the 'closing' set)."""
    return any(w in span.words for w in cue)


def adds_a_word(span: Span, asked: Set[str]) -> bool:
    """Whether a span says a word the request does not. One that only repeats the request's words holds nothing it
    asks for, yet BM25's length normalisation ranks such a fragment high: Gemma 3 270M's stories echo the user's
    first message, once cut by a newline after "The pickup code for", and those four words outranked the fact's
    whole sentence for "What is the code I need for the pickup?" (stop 42). A numeral is a word, so a fact with its
    value always adds one. No constant: the test is the two word sets."""
    return not ECHOES_OUT or any(w not in asked and w != NUMERAL for w in span.words)


def gaps(held: Iterable[int], lo: int, end: int) -> list[tuple[int, int]]:
    """The runs [a, b) within [lo, end) that no index of `held` (ascending) falls in: the evicted text, read off the
    sorted held indices rather than by a walk over the whole log."""
    runs, at = [], lo
    for i in held:
        if i >= end:
            break
        if i > at:
            runs.append((at, i))
        at = max(at, i + 1)
    if at < end:
        runs.append((at, end))
    return runs


def held_runs(evicted: Sequence[tuple[int, int]], bounds: tuple[int, int]) -> list[tuple[int, int]]:
    """The runs [lo, hi) within bounds that the evicted runs (sorted, disjoint) leave: the logged text still cached."""
    lo, end = bounds
    out = []
    for a, b in evicted:
        if a > lo:
            out.append((lo, min(a, end)))
        lo = max(lo, b)
    if lo < end:
        out.append((lo, end))
    return [(a, b) for a, b in out if a < b]


class HeldCover:
    """Whether the cache already answers what a span would: it holds a sentence that matches every word of the
    request's last sentence the span matches, and more (a numeral counts as a word either has). Such a span is at
    best a weaker copy, and where facts share a template it is another name's value for the same slot. SmolLM2's
    continuation showed it: "the code for Sofia is" with Sofia's fact still cached found no evicted sentence with
    "sofia", but "The code for Yuki is 32162." matches "code" and came back next to the cue, and SmolLM2 copied
    Yuki's code (stop 43, the held-out set: 23 of 40 digits). The rival test misses it, as the two share one word
    once stopwords are dropped. No constant: the test is the word sets."""

    def __init__(self, held: Sequence[Span], cue: Sequence[str]) -> None:
        self.asked = set(cue) | {NUMERAL}
        self.held = [m for m in (self._matched(s) for s in held) if m]

    def _matched(self, span: Span) -> frozenset[str]:
        return frozenset(w for w in span.words if w in self.asked)

    def covers(self, span: Span) -> bool:
        if not COVERED_OUT:
            return False
        m = self._matched(span)
        return any(m < h for h in self.held)


def _aligned(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int]]:
    """A longest common subsequence of two word lists, as (index in a, index in b) pairs in order."""
    n, m = len(a), len(b)
    dp = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            dp[i][j] = dp[i + 1][j + 1] + 1 if a[i] == b[j] else max(dp[i + 1][j], dp[i][j + 1])
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if a[i] == b[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif dp[i + 1][j] >= dp[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def is_rival(span: Span, query_sentence: Sequence[str]) -> bool:
    """Whether the span says what the request's last sentence says, about something else: aligned word by word,
    it puts other words where the request has its own, between words both share. A cue "To repeat what was
    written above, Amara was given the PIN" and the earlier reminder "To repeat what was written above, Kenji was
    given the PIN 49753." differ only in the name: the reminder offers another value for the same slot, worded
    like the cue itself, and a model copies it (Gemma 3 answered 49753 for Amara when it came back with Amara's
    fact). The fact "Amara was given the PIN 23522." only leaves words out, and "My locker number is 90517."
    against "What is my locker number?" has nothing between shared words that differs. No constant: the test is
    the alignment itself."""
    if len(span.words.keys() & set(query_sentence) - {NUMERAL}) < 2:  # a substitution needs a shared word each side
        return False
    pairs = _aligned(span.sequence, query_sentence)
    return any(i2 - i1 > 1 and j2 - j1 > 1 for (i1, j1), (i2, j2) in pairwise(pairs))


def choose(
    ranked: list[tuple[float, Span]],
    max_tokens: int,
    admit: Callable[[Span], bool] = lambda s: True,
    best_last: bool = False,
) -> list[Span]:
    """The best admitted spans that fit max_tokens, in sequence order (best_last: in rank order, the best last);
    the cutoff is relative to the best admitted one. admit is asked lazily, best first, so a costly test runs on
    the few spans that could be chosen."""
    chosen: list[Span] = []
    best, used = None, 0
    for score, s in ranked:
        if best is not None and score < RELATIVE_CUTOFF * best:
            break
        if not admit(s):
            continue
        best = score if best is None else best
        if used + s.n_tokens <= max_tokens:
            chosen.append(s)
            used += s.n_tokens
    return chosen[::-1] if best_last else sorted(chosen, key=lambda s: s.lo)


def with_next(
    chosen: list[Span], spans: list[Span], max_tokens: int, admit: Callable[[Span], bool] = lambda s: True
) -> list[Span]:
    """Each chosen span with the evicted sentence right after it, where it fits and is admitted: attention's peak
    often falls on the sentence that leads into the passage a question needs (Gemma 3 270M ranked the sentence
    before the fact first in every paraphrased question it missed), so its pick is read as the start of a passage,
    as Quest and InfLLM recall a page around what scores, not one sentence. Off by default (recall.ATTENTION_NEXT:
    on SmolLM2 the added sentence was often story prose, and cost answers)."""
    by_lo = sorted(spans, key=lambda s: s.lo)
    starts = [s.lo for s in by_lo]
    have, used, out = {s.lo for s in chosen}, sum(s.n_tokens for s in chosen), list(chosen)
    for s in chosen:
        k = bisect_left(starts, s.hi)
        if k == len(by_lo):
            continue
        after = by_lo[k]
        # the same passage: no kept text between them, only a few tokens without words ("\n\n")
        if (
            after.lo - s.hi <= NEXT_GAP
            and after.lo not in have
            and used + after.n_tokens <= max_tokens
            and admit(after)
        ):
            out.append(after)
            have.add(after.lo)
            used += after.n_tokens
    return sorted(out, key=lambda s: s.lo)
