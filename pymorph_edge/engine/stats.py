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
    recall_key_bytes: int = 0  # keys kept on the host for recall_by="both" or "attention" (engine/key_log.py)
    recall_kv_bytes: int = 0  # evicted tokens' K/V rows kept on the host for restoring (native/pme_kvstore.c)
    recalls: int = 0  # requests that brought evicted text back (engine/recall.py)
    recalled_spans: int = 0  # evicted sentences brought back
    recalled_tokens: int = 0  # tokens decoded again for them
    recall_s: float = 0.0  # all of recall's time: probes, choosing and blocks, requests that recalled nothing included
    recall_checks: int = 0  # requests that looked for evicted text to bring back
    recall_probe_s: float = 0.0  # of recall_s: the query probes' decodes
    recall_block_s: float = 0.0  # of recall_s: the recalled blocks' decodes (the rest is choosing)
    restored_tokens: int = 0  # of recalled_tokens: restored from saved KV (EngineConfig(recall_kv_bytes))
    recall_dropped_tokens: int = 0  # kept fragments of recalled sentences removed where they first stood
    generation_recalls: int = 0  # of recalls: fired inside a generation (generation/generation_recall.py)
    generation_recall_s: float = 0.0  # their time, looks that found nothing and the sentence decoded again included
    generation_recall_tokens: int = (
        0  # tokens they decoded: blocks, and the sentences decoded again (in tokens_decoded)
    )
    # What scoring costs a backend whose buffers are not host memory (CUDA, Metal, RPC), since the last reset:
    # device->host bytes the scorer copied and the graph nodes it asked for (each splits the graph and waits
    # for the backend), over one-token ubatches (decode steps) and multi-token ones (prompt chunks, probes,
    # recalled blocks). Host buffers are read in place, so the bytes are 0 on the CPU backend.
    decode_steps: int = 0
    decode_d2h_bytes: int = 0
    decode_syncs: int = 0
    prompt_chunks: int = 0
    prompt_d2h_bytes: int = 0
    prompt_syncs: int = 0

    @property
    def d2h_bytes_per_decode_step(self) -> float:
        return _mean(self.decode_d2h_bytes, self.decode_steps)

    @property
    def syncs_per_decode_step(self) -> float:
        return _mean(self.decode_syncs, self.decode_steps)

    @property
    def d2h_bytes_per_prompt_chunk(self) -> float:
        return _mean(self.prompt_d2h_bytes, self.prompt_chunks)

    @property
    def syncs_per_prompt_chunk(self) -> float:
        return _mean(self.prompt_syncs, self.prompt_chunks)

    def as_dict(self) -> dict[str, int | float | None]:
        return asdict(self)


def _mean(total: int, count: int) -> float:
    return total / count if count else 0.0
