"""H2O, heavy-hitter oracle: Zhang et al., NeurIPS 2023, https://arxiv.org/abs/2306.14048.

Keeps the `window` most recent tokens plus the tokens with the largest attention received so far,
summed over every query (prompt and generated) since the cache was reset.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import AttentionWindowPolicy


@dataclass
class H2O(AttentionWindowPolicy):
    name = "h2o"
    native_kind = "PME_POLICY_H2O"
