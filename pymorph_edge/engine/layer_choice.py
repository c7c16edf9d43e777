"""Which layers' attention the native policies read when EngineConfig(score_layers=k) caps them.

Every layer read splits llama.cpp's graph (on a GPU or over RPC, a synchronisation) and costs a fold, or with flash
attention on a recompute of its attention rows, so reading all 30 of SmolLM2's layers at each decode step is most of
what scoring costs. The k layers are spread evenly from the first to the last: decode steps take a plain mean over
the heads read, and layers next to each other attend much alike. One refinement: prompt chunks weigh each (layer, KV
head) by how much it copies (head_calibration.py), and on a standard model a few induction heads carry most of that
weight, so the layer holding the most head weight is always read (the spread layer nearest to it moves onto it).

Measured on SmolLM2 at budget 512 (docs/scoring.md, "Layers read"): 8 evenly spaced layers kept passkey (20/21) and
ppl (11.27 against 11.29 reading all 30); taking half of the 8 among the layers of most head weight instead kept
passkey but raised the decode KL to the full cache (3.1e-3 against 2.3e-3), as clustering the layers read would.
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
    spread = evenly_spaced(layers, k)
    if head_weights is None:
        return spread
    top = max(layers, key=lambda il: (sum(head_weights[il * n_head_kv : (il + 1) * n_head_kv]), -il))
    if top not in spread:
        spread.remove(min(spread, key=lambda il: (abs(il - top), il)))
        spread.append(top)
    return sorted(spread)
