"""pymorph_edge: GGUF models through llama.cpp with a KV cache that never grows (MorphKV)."""

from .engine_config import EngineConfig
from .generation_record import GenerationCancelled
from .llama import Llama, Timings
from .policies import H2O, TOVA, ContextShift, FullCache, KVPolicy, MorphKV, SnapKV, StreamingLLM
from .stats import KVStats

__all__ = [
    "Llama",
    "EngineConfig",
    "KVStats",
    "Timings",
    "GenerationCancelled",
    "KVPolicy",
    "MorphKV",
    "FullCache",
    "H2O",
    "TOVA",
    "SnapKV",
    "StreamingLLM",
    "ContextShift",
]
__version__ = "0.1.0"
