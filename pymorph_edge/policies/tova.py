"""TOVA, token omission via attention: Oren et al., 2024, https://arxiv.org/abs/2401.06104.

At every step evicts the tokens that the current token attends to least. Only the newest token is
protected (`window`=1 by default); nothing is remembered between steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import AGGREGATES, KVPolicy, check_aggregate, check_positive_int


@dataclass
class TOVA(KVPolicy):
    window: int = 1
    aggregate: str = "mean"

    name = "tova"

    def __post_init__(self) -> None:
        check_positive_int("window", self.window)
        check_aggregate(self.aggregate)

    @property
    def protected_recent(self) -> int:
        return self.window

    def native_fields(self) -> dict[str, int | float]:
        return {"policy": 2, "window": self.window, "aggregate": AGGREGATES[self.aggregate]}
