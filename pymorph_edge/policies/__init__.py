"""KV-cache policies. Each is a small dataclass that validates its parameters and configures the native scorer."""
from __future__ import annotations

from .base import KVPolicy
from .full import FullCache
from .morphkv import MorphKV

POLICIES: dict[str, type[KVPolicy]] = {"morphkv": MorphKV, "full": FullCache}


def make_policy(name: str, **params: object) -> KVPolicy:
    """Build a policy by name; unknown names and parameters raise ValueError."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    try:
        return cls(**params)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ValueError(f"bad parameters for policy {name!r}: {exc}") from None


__all__ = ["KVPolicy", "FullCache", "MorphKV", "POLICIES", "make_policy"]
