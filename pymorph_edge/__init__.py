"""pymorph_edge: GGUF models through llama.cpp with a KV cache that never grows (MorphKV)."""

from pymorph_edge.engine.engine_config import EngineConfig
from pymorph_edge.engine.stats import KVStats
from pymorph_edge.generation.generation_record import GenerationCancelled
from pymorph_edge.llama import Llama, Timings
from pymorph_edge.policies import H2O, TOVA, ContextShift, FullCache, KVPolicy, MorphKV, SnapKV, StreamingLLM

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
