"""H2O, heavy-hitter oracle: Zhang et al., NeurIPS 2023, https://arxiv.org/abs/2306.14048.

Keeps the `window` most recent tokens plus the tokens with the largest attention received so far,
summed over every query (prompt and generated) since the cache was reset.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import AGGREGATES, KVPolicy, check_aggregate, check_positive_int


@dataclass
class H2O(KVPolicy):
    window: int = 32
    aggregate: str = "mean"

    name = "h2o"

    def __post_init__(self) -> None:
        check_positive_int("window", self.window)
        check_aggregate(self.aggregate)

    @property
    def protected_recent(self) -> int:
        return self.window

    def native_fields(self) -> dict[str, int | float]:
        return {"policy": 1, "window": self.window, "aggregate": AGGREGATES[self.aggregate]}
