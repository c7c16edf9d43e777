"""SnapKV: Li et al., NeurIPS 2024, https://arxiv.org/abs/2404.14469.

Compresses the prompt once, after its last chunk, to `kv_budget` tokens: the `window` last prompt
tokens (the observation window) plus the tokens they attend to most, max-pooled over
`pool_radius` neighbouring positions (kernel 7). It never evicts during generation, as in the
MorphKV paper's comparison, so the cache grows again with the answer: the context holds `n_ctx`
cells (the whole prompt must fit before it is compressed), and its peak memory is reported as is.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymorph_edge.policies.base import AttentionWindowPolicy, check_positive_int


@dataclass
class SnapKV(AttentionWindowPolicy):
    """SnapKV: compresses the prompt once, by its last `window` tokens' attention; the answer then grows the cache.

    Parameters
    ----------
    window : int, default 32
        The observation window: the prompt's last tokens, whose attention chooses what is kept.
    aggregate : {"mean", "max"}, default "mean"
        How KV heads and layers combine into one score per cell.
    pool_radius : int, default 3
        Max-pooling radius over neighbouring positions (kernel 7).
    n_ctx : int, default 8192
        Cells of the context: the whole prompt is held before it is compressed.
    """

    pool_radius: int = 3
    n_ctx: int = 8192

    name = "snapkv"
    native_kind = "PME_POLICY_SNAPKV"
    grows = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("n_ctx", self.n_ctx)
        if isinstance(self.pool_radius, bool) or not isinstance(self.pool_radius, int) or self.pool_radius < 0:
            raise ValueError(f"pool_radius must be an int >= 0, got {self.pool_radius!r}")

    def cells_needed(self, kv_budget: int, n_ubatch: int) -> int:
        if self.n_ctx < kv_budget + n_ubatch:
            raise ValueError(
                f"snapkv n_ctx={self.n_ctx} must be at least kv_budget + n_ubatch = {kv_budget + n_ubatch}"
            )
        return self.n_ctx  # the whole prompt is held before it is compressed, and the answer grows past it

    def native_fields(self) -> dict[str, int | float | str]:
        return {**super().native_fields(), "pool_radius": self.pool_radius}
