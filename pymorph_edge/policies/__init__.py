"""KV-cache policies. Each is a small dataclass that validates its parameters and configures the native scorer."""

from __future__ import annotations

from pymorph_edge.policies.base import KVPolicy
from pymorph_edge.policies.context_shift import ContextShift
from pymorph_edge.policies.full import FullCache
from pymorph_edge.policies.h2o import H2O
from pymorph_edge.policies.morphkv import MorphKV
from pymorph_edge.policies.snapkv import SnapKV
from pymorph_edge.policies.streaming import StreamingLLM
from pymorph_edge.policies.tova import TOVA

# name -> class, from each class's own `name`: adding a policy means adding it to this tuple
POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls for cls in (MorphKV, FullCache, H2O, TOVA, SnapKV, StreamingLLM, ContextShift)
}


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


__all__ = [
    "KVPolicy",
    "FullCache",
    "MorphKV",
    "H2O",
    "TOVA",
    "SnapKV",
    "StreamingLLM",
    "ContextShift",
    "POLICIES",
    "make_policy",
]
