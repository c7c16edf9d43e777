"""KV-cache statistics reported by `Llama.stats`."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class KVStats:
    budget: int | None  # kv_budget (None: full cache, no eviction)
    n_ctx: int  # cells llama.cpp allocated for the (non-SWA) cache
    cells_in_use: int  # cells holding a token now
    peak_cells: int  # most cells in use at any point since the last reset
    tokens_evicted: int  # tokens removed by the policy since the last reset
    kv_bytes: int  # bytes llama.cpp allocated for all KV caches (fixed for the context's life)
    tokens_decoded: int  # tokens run through the model since the last reset (prompt + generated)
    next_pos: int  # cache position the next token gets; compaction renumbers positions down
    compactions: int = 0  # times the live positions were renumbered to keep the span trained-for
    evict_calls: int = 0  # llama_memory_seq_rm calls (one per run of consecutive evicted positions)
    ubatches: int = 0  # ubatches the native scorer observed
    layers_scored: int = 0  # attention softmax nodes read in the last ubatch (0 when no attention is read)
    full_cache_bytes: int = 0  # KV bytes an unbounded cache would hold for every token decoded since the reset
    recall_log_bytes: int = 0  # bytes of token ids kept off the cache for recall (engine/evicted_log.py)
    recall_key_bytes: int = 0  # bytes of keys kept on the host for recall_by="attention" (engine/key_log.py)
    recalls: int = 0  # requests that brought evicted text back (engine/recall.py)
    recalled_spans: int = 0  # evicted sentences brought back
    recalled_tokens: int = 0  # tokens decoded again for them
    recall_s: float = 0.0  # time spent choosing and decoding them

    def as_dict(self) -> dict[str, int | float | None]:
        return asdict(self)
