"""pymorph_edge: GGUF models through llama.cpp with a KV cache that never grows (MorphKV)."""
from .kv_engine import EngineConfig
from .llama import Llama, Timings
from .policies import FullCache, KVPolicy, MorphKV
from .stats import KVStats

__all__ = ["Llama", "EngineConfig", "KVStats", "Timings", "KVPolicy", "MorphKV", "FullCache"]
__version__ = "0.1.0"
