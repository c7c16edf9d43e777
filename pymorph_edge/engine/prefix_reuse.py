"""Decide how much of the cache a new prompt can reuse.

Token i of the sequence is history[i] (indices start at 0 after a reset and grow by one per token;
cache positions may be renumbered by compaction, indices never are), so a new prompt can continue on
the compressed cache when it starts with the history. When it diverges inside the tail the cache
still holds whole, the tail is rolled back instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from pymorph_edge.engine.token_history import TokenHistory


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable_prefix(history: Sequence[int] | TokenHistory, tokens: Sequence[int], live_from: int) -> int:
    """Number of leading prompt tokens already in the cache that can be kept (0: start over).

    live_from: the smallest index i such that every token >= i of the history is still in the cache
    (evicted tokens cannot be rolled back to).
    """
    keep = history.common_prefix(tokens) if isinstance(history, TokenHistory) else common_prefix(history, tokens)
    if keep == len(tokens):
        keep -= 1  # the last prompt token must be decoded again to produce fresh logits
    if keep <= 0:
        return 0
    if keep < len(history) and keep < live_from:
        return 0  # would need positions that were evicted
    return keep
