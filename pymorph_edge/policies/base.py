"""What every policy provides to the engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KVPolicy:
    """Base of all policies. `evicts` is False for the full cache, which needs no eval callback."""

    name = "base"
    evicts = True
    grows = False  # compresses the prompt only, then lets the cache grow (SnapKV)
    shifts = False  # handled by llama.cpp's context shift instead of the native scorer
    recalls = False  # recall (engine/recall.py) on by default; every native policy can take it when asked
    # layers whose attention it reads by default (engine/layer_choice.py); None: all. Every policy reads all: 8 of
    # SmolLM2's 30 kept passkey and ppl but lost chat recall (docs/scoring.md, "Layers read"). Not a dataclass field
    read_layers = None

    @property
    def protected_recent(self) -> int:
        """Most recent tokens the policy never evicts."""
        return 0

    @property
    def calibrates_heads(self) -> bool:
        """Whether the engine measures induction heads at load to weight this policy's scores."""
        return False

    @property
    def probes_prefill(self) -> bool:
        """Whether prompt chunks are scored by a probe of the prompt's last `protected_recent` tokens."""
        return False

    def for_budget(self, kv_budget: int) -> KVPolicy:
        """The policy with settings that depend on the budget resolved (H2O's half-budget window)."""
        return self

    def cells_needed(self, kv_budget: int, n_ubatch: int) -> int:
        """Cells the context must hold under kv_budget: the budget plus one ubatch, decoded before eviction.
        Raises ValueError when kv_budget does not suit the policy."""
        return kv_budget + n_ubatch

    def native_fields(self) -> dict[str, int | float | str]:
        """Fields of the native pme_config this policy sets; a str value names a native/pme.h enum constant
        (the one source of those numbers), resolved when the native state is created."""
        raise NotImplementedError


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


AGGREGATES = {"mean": "PME_AGG_MEAN", "max": "PME_AGG_MAX"}  # how KV heads and layers combine into one score per cell


def check_aggregate(value: object) -> str:
    if value not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {sorted(AGGREGATES)}, got {value!r}")
    return AGGREGATES[value]  # type: ignore[index]


@dataclass
class AttentionWindowPolicy(KVPolicy):
    """A scoring policy with a protected recent `window` and a head/layer `aggregate` (H2O, TOVA, SnapKV)."""

    window: int = 32
    aggregate: str = "mean"

    native_kind = ""  # the native enum pme_policy_kind constant

    def __post_init__(self) -> None:
        check_positive_int("window", self.window)
        check_aggregate(self.aggregate)

    @property
    def protected_recent(self) -> int:
        return self.window

    def native_fields(self) -> dict[str, int | float | str]:
        return {"policy": self.native_kind, "window": self.window, "aggregate": AGGREGATES[self.aggregate]}
