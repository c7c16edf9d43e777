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
pooling), so a multi-token fact, such as a number split into digit tokens, is kept whole. Pooling
applies when evicting after prompt chunks; `pool_decode=True` pools at every decode step as well,
which spends cells on neighbours of what the answer attends to (ppl 1.212x the full cache against
1.136x without, SmolLM2 at budget 256).
"""

from __future__ import annotations

from dataclasses import dataclass

from pymorph_edge.policies.base import AGGREGATES, KVPolicy, check_aggregate, check_positive_int

FUSIONS = {"sum": "PME_FUSION_SUM", "max": "PME_FUSION_MAX"}
HEAD_WEIGHTS = ("induction", "uniform")


@dataclass
class MorphKV(KVPolicy):
    """MorphKV: the `window` most recent tokens plus the older tokens they attend to most, re-decided every step.

    Parameters
    ----------
    window : int, default 32
        Recent tokens always kept; their attention rows choose the rest.
    fusion : {"sum", "max"}, default "sum"
        How the window's attention rows are fused into one score per token.
    aggregate : {"mean", "max"}, default "mean"
        How KV heads and layers combine into one score per cell (llama.cpp shares a cell across them).
    prefill_decay : float in [0, 1], default 1.0
        A token's prompt score persists across prompt chunks as max(prefill_decay * old, new).
    pool_radius : int, default 1
        Scores are max-pooled over this many neighbours, so a multi-token fact is kept whole.
    pool_after : int, default 6
        Prompt chunks whose pooled scores are carried forward.
    head_weights : {"induction", "uniform"}, default "induction"
        Weight heads by their measured induction score (at load), or a plain mean.
    prefill_probe : bool, default True
        Score each prompt chunk with a probe of the prompt's last `window` tokens (its question).
    pool_decode : bool, default False
        Pool at decode steps too, not only at prompt evictions.
    """

    window: int = 32
    fusion: str = "sum"
    aggregate: str = "mean"
    prefill_decay: float = 1.0  # chosen on the SmolLM2 tuning set (benchmarks/results/scoring-smollm2-decay)
    pool_radius: int = 1
    pool_after: int = 6
    head_weights: str = "induction"
    prefill_probe: bool = True
    pool_decode: bool = False

    name = "morphkv"
    recalls = True  # measured: benchmarks/results/recall-*

    def __post_init__(self) -> None:
        check_positive_int("window", self.window)
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {self.fusion!r}")
        check_aggregate(self.aggregate)
        for name in ("pool_radius", "pool_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.head_weights not in HEAD_WEIGHTS:
            raise ValueError(f"head_weights must be one of {HEAD_WEIGHTS}, got {self.head_weights!r}")
        for name in ("prefill_probe", "pool_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not (0.0 <= float(self.prefill_decay) <= 1.0):
            raise ValueError(f"prefill_decay must be in [0, 1], got {self.prefill_decay!r}")

    @property
    def protected_recent(self) -> int:
        return self.window

    @property
    def calibrates_heads(self) -> bool:
        return self.head_weights == "induction"

    @property
    def probes_prefill(self) -> bool:
        return self.prefill_probe

    def native_fields(self) -> dict[str, int | float | str]:
        return {
            "policy": "PME_POLICY_MORPHKV",
            "window": self.window,
            "fusion": FUSIONS[self.fusion],
            "aggregate": AGGREGATES[self.aggregate],
            "prefill_decay": float(self.prefill_decay),
            "pool_radius": self.pool_radius,
            "pool_after": self.pool_after,
            "prefill_probe": int(self.prefill_probe),
            "pool_prompt_only": int(not self.pool_decode),
        }
