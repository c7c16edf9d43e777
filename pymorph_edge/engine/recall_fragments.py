"""A recalled sentence replaces what the policy kept of it where it first stood.

Eviction is token by token, so a sentence can be half kept: pooling keeps a name and drops the digits after it, and
"The alarm code for the office is 2977" with the last digit gone reads as another fact. When recall brings the whole
sentence back (engine/recall.py), the fragment is a second, wrong copy, and its cells count against the budget
twice. So the fragment's cells are removed once the block is in the cache, before the new text reads it; the
sentence is then held by the block alone, and when the policy evicts the block, the sentence is evicted whole and
can be recalled again. Off by default (recall.DROP_KEPT_FRAGMENTS): on the held-out sets it answered no more, and a
model that answers by repeating the first message lost an answer without the message's kept text (docs/recall.md,
"Kept fragments of a recalled sentence").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pymorph_edge.engine.recall_decoding import SEQ
from pymorph_edge.engine.recall_select import Span

if TYPE_CHECKING:
    from pymorph_edge.engine.kv_engine import KVEngine


def drop_kept_fragments(engine: KVEngine, chosen: Sequence[Span], piece: Callable[[int], str]) -> int:
    """Remove the cells that still hold the chosen sentences' text where they first stood, now that a recalled block
    holds each sentence whole; returns the cells removed. Only the text goes: a token with no text of its own (BOS,
    a chat template's role markers; the first is the attention sink) stays where it is, and so do the pinned prefix
    (keep) and the policy's recent window."""
    scorer = engine.scorer
    if scorer is None or not chosen:
        return 0
    lo_index, hi_index = engine.n_keep, engine.n_past - engine.policy.protected_recent
    text: set[int] = set()
    for s in chosen:
        lo, hi = max(s.lo, lo_index, engine.log.start), min(s.hi, hi_index, engine.log.end)
        if lo < hi:
            text.update(i for i, t in enumerate(engine.log.tokens(lo, hi), lo) if piece(t).strip())
    doomed = sorted(
        p for lp, p in zip(scorer.cell_lpos(), scorer.cell_positions(), strict=True) if p >= 0 and lp in text
    )
    return sum(scorer.drop_range(engine.mem, SEQ, p0, p1) for p0, p1 in consecutive_runs(doomed))


def consecutive_runs(sorted_positions: Sequence[int]) -> list[tuple[int, int]]:
    """Runs [lo, hi) of consecutive values in a sorted list."""
    runs: list[tuple[int, int]] = []
    for p in sorted_positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs
