"""StreamingLLM: Xiao et al., ICLR 2024, https://arxiv.org/abs/2309.17453.

Keeps the first `n_sink` tokens (attention sinks) and the most recent ones; reads no attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymorph_edge.policies.base import KVPolicy, check_positive_int


@dataclass
class StreamingLLM(KVPolicy):
    """StreamingLLM: the first `n_sink` tokens (attention sinks) and the most recent ones; reads no attention.

    Parameters
    ----------
    n_sink : int, default 4
        First tokens always kept.
    window : int, default 32
        Most recent tokens kept besides the sinks; the rest of the budget holds the next most recent.
    """

    n_sink: int = 4
    window: int = 32

    name = "streaming"

    def __post_init__(self) -> None:
        check_positive_int("window", self.window)
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an int >= 0, got {self.n_sink!r}")

    @property
    def protected_recent(self) -> int:
        return self.window + self.n_sink

    def native_fields(self) -> dict[str, int | float | str]:
        return {"policy": "PME_POLICY_STREAMING", "window": self.window, "n_sink": self.n_sink}
