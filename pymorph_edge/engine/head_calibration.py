"""Which heads retrieve: a measurement at load that weights each (layer, KV head) in MorphKV's score.

llama.cpp keeps one cell per token for every layer and head, so their opinions must fold into one
keep-set. On a standard model (SmolLM2: 30 global layers x 3 KV heads) most heads attend to the
first token or to their neighbours; a plain mean over all 90 rates every token by that local
attention and forgets a fact as fast as StreamingLLM does. The heads that recall earlier content
are induction heads (Olsson et al., 2022): on a repeated sequence they attend to the token that
followed the current one last time. They are found by measuring exactly that, on the model itself:

    BOS, r_1 .. r_L, r_1 .. r_L     (L random ordinary tokens, seeded)

For each query r_i in the second copy, the head's attention on r_{i+1} in the first copy is its
induction score. A head's weight is its score over the best head's, so the measurement needs no
model name and no threshold. Where no head copies at all (random synthetic models) the weights
stay uniform. See benchmarks/results/scoring-smollm2/ for the measurements that chose this.
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING

import llama_cpp.llama_cpp as C

from pymorph_edge.engine.layer_choice import layers_to_read

if TYPE_CHECKING:
    from pymorph_edge.engine.kv_engine import KVEngine

logger = logging.getLogger(__name__)

SEED = 0
MAX_SPAN = 100  # tokens per copy; enough rows for a stable mean, small enough to cost 0.56 s (SmolLM2) at load


def copy_sequence(engine: KVEngine) -> tuple[list[int], list[int]]:
    """The calibration prompt and, per row, the position it should copy from (-1: none)."""
    vocab = engine.model.vocab
    n_vocab = engine.model.info.n_vocab
    span = min(MAX_SPAN, (engine.n_batch - 1) // 2)  # one ubatch: the calibration covers exactly one
    rng = random.Random(SEED)
    picks: list[int] = []
    for t in rng.sample(range(n_vocab), min(n_vocab, 50 * span)):
        if C.llama_vocab_get_attr(vocab, t) == C.LLAMA_TOKEN_ATTR_NORMAL:
            picks.append(t)
            if len(picks) == span:
                break
    bos = C.llama_vocab_bos(vocab)
    head = [bos] if bos >= 0 else []
    tokens = head + picks + picks
    o = len(head)
    targets = [-1] * len(tokens)
    for i in range(len(picks) - 1):
        targets[o + len(picks) + i] = o + i + 1  # r_i of the second copy -> r_{i+1} of the first
    return tokens, targets


def induction_scores(engine: KVEngine) -> list[float]:
    """Mean attention of each (layer, KV head) on its copy target; 0 for heads the scorer never reads."""
    scorer = engine.scorer
    if scorer is None:
        raise RuntimeError("induction scores need a natively scored cache")
    info = engine.model.info
    tokens, targets = copy_sequence(engine)
    scorer.set_head_weights(None)
    engine.reset()
    try:
        scorer.calibrate(targets)
        engine.decode(tokens, logits_last=False)
        return scorer.calibration_scores(info.n_layer * info.n_head_kv)
    finally:
        engine.reset()


def calibrate_head_weights(engine: KVEngine) -> list[float] | None:
    """Measure, set and return the head weights; None (uniform) when no head copies."""
    scorer = engine.scorer
    if scorer is None:
        raise RuntimeError("head weights need a natively scored cache")
    scores = induction_scores(engine)
    best = max(scores, default=0.0)
    if not math.isfinite(best) or best < 0.05:  # no induction head: weighting would only add noise
        logger.info("no induction heads found (best score %.3f): heads weigh the same", best)
        return None
    weights = [max(s, 0.0) / best for s in scores]
    scorer.set_head_weights(weights)
    # with a cap on the layers read, the ones holding the copying heads are among them (layer_choice.py)
    read = layers_to_read(scorer.cache_layers(), scorer.read_cap, weights, engine.model.info.n_head_kv)
    scorer.read_layers(read)
    # the calibration's own decode chose the key log's layers among the old ones: choose again at the next ubatch
    engine.keys = None
    scorer.keylog_layers(None)
    logger.info("layers read: %s", read)
    top = sorted(range(len(scores)), key=lambda i: -scores[i])[:5]
    n_kv = engine.model.info.n_head_kv
    logger.info(
        "induction heads (layer, kv head: score): %s",
        ", ".join(f"{i // n_kv}.{i % n_kv}: {scores[i]:.2f}" for i in top),
    )
    return weights
