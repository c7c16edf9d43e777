"""Which layers' attention the native policies read when EngineConfig(score_layers=k) caps them.

Every layer read splits llama.cpp's graph (on a GPU or over RPC, a synchronisation) and costs a fold, or with flash
attention on a recompute of its attention rows, so reading all 30 of SmolLM2's layers at each decode step is most of
what scoring costs. Two things decide which k to read:
- Prompt chunks weigh each (layer, KV head) by how much it copies (head_calibration.py), and on a standard model a
  few induction heads carry most of that weight (SmolLM2: two heads of 90 score 0.68 and 0.49, the median 0.004).
  A layer that holds them must be read, or the weighted mean loses what it is for.
- Decode steps take a plain mean over the heads read, which a spread over the depth approximates best: layers next
  to each other attend much alike.
So half the layers (rounded up) are those holding the most head weight, and the rest are filled in farthest first
from those already chosen. Without head weights, native/pme_state.c's evenly spaced choice stands.
"""

from __future__ import annotations

from collections.abc import Sequence


def evenly_spaced(layers: Sequence[int], k: int) -> list[int]:
    """k of layers from the first to the last (all of them when there are no more); as native/pme_state.c."""
    n = len(layers)
    if n <= k:
        return list(layers)
    if k == 1:
        return [layers[-1]]
    return sorted({layers[(2 * i * (n - 1) + (k - 1)) // (2 * (k - 1))] for i in range(k)})


def layers_to_read(
    layers: Sequence[int], k: int | None, head_weights: Sequence[float] | None, n_head_kv: int
) -> list[int]:
    """The layers (of `layers`, the scored cache's) to read; head_weights: (n_layer * n_head_kv) or None."""
    if k is None or len(layers) <= k:
        return list(layers)
    if head_weights is None:
        return evenly_spaced(layers, k)
    mass = {il: sum(head_weights[il * n_head_kv : (il + 1) * n_head_kv]) for il in layers}
    chosen = sorted(layers, key=lambda il: (-mass[il], il))[: (k + 1) // 2]
    while len(chosen) < k:
        # the layer farthest from every one chosen (the lower one on a tie), so the read layers span the depth
        chosen.append(
            max((il for il in layers if il not in chosen), key=lambda il: (min(abs(il - c) for c in chosen), -il))
        )
    return sorted(chosen)
