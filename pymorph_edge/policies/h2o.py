"""H2O, heavy-hitter oracle: Zhang et al., NeurIPS 2023, https://arxiv.org/abs/2306.14048.

Keeps the `window` most recent tokens plus the tokens with the largest attention received so far,
summed over every query (prompt and generated) since the cache was reset.

The paper splits the cache evenly between heavy hitters and recent tokens (its 20% budget is 10% heavy
plus 10% recent), so the default window is half the budget. With the 32-token window of the other
policies H2O's cumulative sums keep stale tokens: on SmolLM2 (budget 1024, teacher-forced) it was 1.08x
context_shift's ppl in the first 2K tokens and 2.2x later (benchmarks/results/smollm2-longrun/).

Even with half the budget recent, a plain sum lets tokens that have collected attention for thousands of steps
outrank any newcomer, so over a long answer the heavy set freezes. `forget` fades the sum per token (A2SF,
Jo & Shin 2024, https://arxiv.org/abs/2407.20485): on SmolLM2's 24.6K-token run the worst segment against
context_shift went from 1.067x (plain sum) to 1.017x (0.999).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pymorph_edge.policies.base import AttentionWindowPolicy, check_aggregate


@dataclass
class H2O(AttentionWindowPolicy):
    """H2O: the recent `window` plus the heavy hitters, the tokens with the most attention received so far.

    Parameters
    ----------
    window : int or None, default None
        Recent tokens always kept; None is half the budget, as in the paper.
    aggregate : {"mean", "max"}, default "mean"
        How KV heads and layers combine into one score per cell.
    forget : float in (0, 1], default 0.999
        Per-token fade of the cumulative score (A2SF); 1.0 is the paper's plain sum.
    """

    name = "h2o"
    native_kind = "PME_POLICY_H2O"
    window: int | None = None  # type: ignore[assignment]  # None: half the budget, as in the paper
    # per-token fade of the cumulative score (A2SF); 1.0 is the paper's plain sum. 0.999 chosen on SmolLM2's
    # long run (benchmarks/results/smollm2-longrun-h2o-forget), checked on Gemma 3's
    forget: float = 0.999

    def __post_init__(self) -> None:
        if self.window is not None:
            super().__post_init__()
        else:
            check_aggregate(self.aggregate)
        if isinstance(self.forget, bool) or not isinstance(self.forget, (int, float)) or not 0.0 < self.forget <= 1.0:
            raise ValueError(f"forget must be a number in (0, 1], got {self.forget!r}")

    def for_budget(self, kv_budget: int) -> H2O:
        return self if self.window is not None else replace(self, window=max(1, kv_budget // 2))

    @property
    def protected_recent(self) -> int:
        if self.window is None:
            raise RuntimeError("H2O's window is half the budget: call for_budget(kv_budget) first")
        return self.window

    def native_fields(self) -> dict[str, int | float | str]:
        return {**super().native_fields(), "forget": float(self.forget)}
