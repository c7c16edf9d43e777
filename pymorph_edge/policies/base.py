"""What every policy provides to the engine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KVPolicy:
    """Base of all policies. `evicts` is False for the full cache, which needs no eval callback."""

    name = "base"
    evicts = True

    @property
    def protected_recent(self) -> int:
        """Most recent tokens the policy never evicts."""
        return 0

    def native_fields(self) -> dict[str, int | float]:
        """Fields of the native pme_config this policy sets."""
        raise NotImplementedError
