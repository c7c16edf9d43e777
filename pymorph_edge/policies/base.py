"""What every policy provides to the engine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KVPolicy:
    """Base of all policies. `evicts` is False for the full cache, which needs no eval callback."""

    name = "base"
    evicts = True
    grows = False    # compresses the prompt only, then lets the cache grow (SnapKV)
    shifts = False   # handled by llama.cpp's context shift instead of the native scorer

    @property
    def protected_recent(self) -> int:
        """Most recent tokens the policy never evicts."""
        return 0

    def native_fields(self) -> dict[str, int | float]:
        """Fields of the native pme_config this policy sets."""
        raise NotImplementedError


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


AGGREGATES = {"mean": 0, "max": 1}  # how KV heads and layers combine into one score per cell


def check_aggregate(value: object) -> int:
    if value not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {sorted(AGGREGATES)}, got {value!r}")
    return AGGREGATES[value]  # type: ignore[index]
