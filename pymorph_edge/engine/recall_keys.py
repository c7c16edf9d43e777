"""Which evicted text a new request needs, judged by the model's own attention (the Quest / ArkVale idea, with
every token's key kept rather than a digest of each page).

The new text's last tokens are decoded once as a probe (then removed) to read their queries at the key log's
layers (key_log.py). Each query row attends over the keys of the whole logged history, kept and evicted alike,
as the full cache would; an evicted sentence's relevance is the attention mass it gets. So a question finds
the sentence it needs by what the model looks for, not by the words it shares with it: "which number did I
give you?" finds "My locker code is 48213." Positions come from the keys as written: after a compaction the
older keys are rotated for positions that are now taken by newer tokens, which blurs their distance, not their
content.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import ThreadpoolController

from pymorph_edge.engine.recall_select import Span

QUERY_TOKENS = 32  # the new text's last tokens whose queries are read (its question, or a completion's cue)
KEY_LAYERS = 4  # layers whose keys are logged
LIFT = 2.0  # a span is recalled only if it draws this many times the attention of an average logged token

# numpy's OpenBLAS keeps its worker threads spinning for a while after a product, on the cores llama.cpp's
# threads need next: the recalled block decoded right after the probe took 0.21 s instead of 0.125 s on 2 cores
# (SmolLM2, 31 tokens). One BLAS thread for the probe's products leaves the cores to llama.cpp.
_BLAS = ThreadpoolController()


def key_layers(scored: list[int], n: int = KEY_LAYERS) -> list[int]:
    """The n scored layers whose keys are logged, spread over the upper two thirds of the depth: the first layers
    attend mostly by position and to the sink. (Taking the layers of the strongest induction heads instead, and
    weighting heads by their induction score, ranked the fact lower: those heads match repeated strings, so a
    question found the earlier turns worded like it. Measured on four dialogues, docs/recall.md.)"""
    upper = scored[len(scored) // 3 :] or scored
    if len(upper) <= n:
        return upper
    return [upper[round(i * (len(upper) - 1) / (n - 1))] for i in range(n)] if n > 1 else [upper[-1]]


def attention_mass(
    q: np.ndarray, scales: np.ndarray, keys: np.ndarray, head_weights: np.ndarray | None = None
) -> np.ndarray:
    """q (layers, rows, n_head, d), keys (n, layers, n_head_kv, d): per logged token, the attention weight the
    query rows give it, softmax over the whole log per (layer, head, row), averaged with each KV head's weight
    (head_weights (layers, n_head_kv); None: alike), so it sums to 1."""
    n_layers, n_rows, n_head, d = q.shape
    n, _, n_head_kv, _ = keys.shape
    group = n_head // n_head_kv
    hw = np.ones((n_layers, n_head_kv)) if head_weights is None else np.asarray(head_weights, np.float64)
    mass = np.zeros(n, np.float64)
    if n == 0 or hw.sum() <= 0:
        return mass
    with _BLAS.limit(limits=1, user_api="blas"):
        _accumulate(mass, q, scales, keys, hw, group)
    return mass / (hw.sum() * group * n_rows)


def _accumulate(
    mass: np.ndarray, q: np.ndarray, scales: np.ndarray, keys: np.ndarray, hw: np.ndarray, group: int
) -> None:
    n_layers, _, _, d = q.shape
    n_head_kv = keys.shape[2]
    for li in range(n_layers):
        for j in range(n_head_kv):
            k = keys[:, li, j].astype(np.float32)  # (n, d)
            qj = q[li, :, j * group : (j + 1) * group].reshape(-1, d)  # (rows * group, d)
            logits = (qj @ k.T) * scales[li]
            logits -= logits.max(axis=1, keepdims=True)
            w = np.exp(logits)
            w /= w.sum(axis=1, keepdims=True)
            mass += hw[li, j] * w.sum(axis=0)  # (the max over heads ranked template turns first: worse)


def rank_by_attention(spans: list[Span], mass: np.ndarray, start: int) -> list[tuple[float, Span]]:
    """Spans by the attention mass they draw (best first); [] when none draws LIFT times an average token's
    share per token of its own."""
    if not spans or len(mass) == 0:
        return []
    average = 1.0 / len(mass)
    scored = []
    for s in spans:
        lo, hi = max(s.lo - start, 0), min(s.hi - start, len(mass))
        if hi <= lo:
            continue
        m = float(mass[lo:hi].sum())
        scored.append((m, s, m / (hi - lo)))
    scored.sort(key=lambda x: (-x[0], x[1].lo))
    if not scored or max(x[2] for x in scored) < LIFT * average:
        return []
    return [(m, s) for m, s, per_token in scored if per_token >= LIFT * average]
