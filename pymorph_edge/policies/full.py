"""The full cache: no eviction. The reference every bounded policy is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from pymorph_edge.policies.base import KVPolicy


@dataclass
class FullCache(KVPolicy):
    """Keeps every token; the cache grows with the text and is limited by n_ctx."""

    name = "full"
    evicts = False

    def native_fields(self) -> dict[str, int | float | str]:
        return {}
