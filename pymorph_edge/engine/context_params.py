"""llama.cpp context parameters for a KV engine: the cells a budget needs, one ubatch per llama_decode, and the
cache settings the native scorer depends on (flash attention decided, the sliding-window cache kept bounded)."""

from __future__ import annotations

import os

import llama_cpp.llama_cpp as C

from pymorph_edge.engine.engine_config import (
    EngineConfig,
    _apart_from_swa_cache,
    resolve_flash_attn,
    resolve_kv_store_bytes,
    sequences,
)
from pymorph_edge.engine.kv_cache_types import check_head_size, ggml_type
from pymorph_edge.model.model_file import LoadedModel
from pymorph_edge.policies import KVPolicy


def context_params(
    model: LoadedModel, kv_budget: int | None, policy: KVPolicy, config: EngineConfig
) -> tuple[C.llama_context_params, bool, bool, int]:
    """(params, whether the native scorer evicts, whether flash attention is on, the bytes of evicted K/V kept for
    recall); a ValueError names a setting that cannot hold under a scored budget."""
    cp = C.llama_context_default_params()
    cp.n_ctx = (config.n_ctx or 4096) if kv_budget is None else policy.cells_needed(kv_budget, config.n_ubatch)
    # one ubatch per llama_decode, so the callback knows each token's position
    cp.n_batch = config.n_ubatch if kv_budget is not None else max(config.n_ubatch, 512)
    cp.n_ubatch = config.n_ubatch
    native_scored = kv_budget is not None and not policy.shifts
    recalls = native_scored and bool(policy.recalls if config.recall is None else config.recall)
    kv_store = resolve_kv_store_bytes(config, recalls, model.info.n_swa, not model.offloaded) if native_scored else 0
    cp.n_seq_max, cp.kv_unified = sequences(kv_store, bool(cp.kv_unified))
    cp.n_threads = threads = config.n_threads or os.cpu_count() or 1
    cp.n_threads_batch = config.n_threads_batch or threads
    cp.rope_freq_base, cp.rope_freq_scale = config.rope_freq_base, config.rope_freq_scale
    if native_scored and model.info.n_swa > 0:
        span = model.info.n_swa * (cp.n_seq_max if cp.kv_unified else 1)  # sized per sequence when unified
        cp.n_ctx = _apart_from_swa_cache(cp.n_ctx, span, config.n_ubatch)
    # scoring reads kq_soft_max with flash attention off, and recomputes the rows from the flash attention
    # node's sources with it on (native/pme_fattn.c); never "auto", so the scorer knows which it gets
    flash_attn = resolve_flash_attn(config, native_scored)
    cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    check_head_size("type_k", config.type_k, model.info.n_embd_k_gqa // model.info.n_head_kv)
    check_head_size("type_v", config.type_v, model.info.n_embd_v_gqa // model.info.n_head_kv)
    cp.type_k, cp.type_v = ggml_type(config.type_k), ggml_type(config.type_v)
    if native_scored:
        if config.swa_full:
            raise ValueError(
                f"swa_full=True would grow the sliding-window cache to all {cp.n_ctx} cells; a scored budget "
                "keeps it bounded (swa_full applies to kv_budget=None and context_shift)"
            )
        cp.swa_full = False  # otherwise the sliding-window cache grows to n_ctx
    else:
        # swa_full as llama_cpp.Llama; context shift needs it too: llama.cpp shifts an iSWA cache only when its
        # sliding-window cache is as large as the base one (llama_kv_cache_iswa::get_can_shift), which at
        # n_ctx = kv_budget costs little
        cp.swa_full = True if config.swa_full is None else config.swa_full
    return cp, native_scored, flash_attn, kv_store
