"""MorphKV: Ghadia, Kumar, Jain, Nair, Das, "Dialogue Without Limits: Constant-Sized KV Caches for
Extended Responses in LLMs", ICML 2025, https://arxiv.org/abs/2503.00979.

Keeps the `window` most recent tokens plus the older tokens those recent tokens attend to most.
The attention rows of the last `window` tokens are fused by `fusion` ("sum" or "max"); query heads
of a GQA group are summed. llama.cpp shares one cell across all layers and KV heads, so their
scores are combined by `aggregate` ("mean" or "max") into one keep-set per sequence.

Long prompts are prefilled in ubatch chunks. During prefill a token's score persists across
chunks as max(prefill_decay * old, new), where new is the highest attention any query of the
chunk gave it, so a fact stated early survives until the question that needs it arrives.
With `pool_radius` > 0 a token's score is the max over positions within that radius (SnapKV's
pooling), so a multi-token fact, such as a number split into digit tokens, is kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import AGGREGATES, KVPolicy, check_aggregate, check_positive_int

FUSIONS = {"sum": "PME_FUSION_SUM", "max": "PME_FUSION_MAX"}


@dataclass
class MorphKV(KVPolicy):
    window: int = 32
    fusion: str = "sum"
    aggregate: str = "mean"
    prefill_decay: float = 0.95
    pool_radius: int = 1

    name = "morphkv"

    def __post_init__(self) -> None:
        check_positive_int("window", self.window)
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {self.fusion!r}")
        check_aggregate(self.aggregate)
        if isinstance(self.pool_radius, bool) or not isinstance(self.pool_radius, int) or self.pool_radius < 0:
            raise ValueError(f"pool_radius must be an int >= 0, got {self.pool_radius!r}")
        if not (0.0 <= float(self.prefill_decay) <= 1.0):
            raise ValueError(f"prefill_decay must be in [0, 1], got {self.prefill_decay!r}")

    @property
    def protected_recent(self) -> int:
        return self.window

    def native_fields(self) -> dict[str, int | float | str]:
        return {
            "policy": "PME_POLICY_MORPHKV",
            "window": self.window,
            "fusion": FUSIONS[self.fusion],
            "aggregate": AGGREGATES[self.aggregate],
            "prefill_decay": float(self.prefill_decay),
            "pool_radius": self.pool_radius,
        }
