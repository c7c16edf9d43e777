"""llama_cpp.Llama's constructor keywords, translated: what each means under a KV budget, and a ValueError
naming any that pymorph_edge cannot honour. None is silently ignored (the porting guide in README.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import llama_cpp.llama_cpp as C

# llama_cpp.Llama keywords accepted only at their llama_cpp default, each with why another value is refused
REFUSED_UNLESS_DEFAULT: dict[str, tuple[Any, str]] = {
    "vocab_only": (False, "a vocabulary-only model cannot decode, and the engine needs a context"),
    "kv_overrides": (None, "metadata overrides are not wired through; edit the GGUF with the gguf package instead"),
    "rope_scaling_type": (C.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED, "RoPE scaling would change what compaction assumes"),
    "attention_type": (C.LLAMA_ATTENTION_TYPE_UNSPECIFIED, "scoring reads causal attention"),
    "yarn_ext_factor": (-1.0, "YaRN scaling would change what compaction assumes"),
    "yarn_attn_factor": (1.0, "YaRN scaling would change what compaction assumes"),
    "yarn_beta_fast": (32.0, "YaRN scaling would change what compaction assumes"),
    "yarn_beta_slow": (1.0, "YaRN scaling would change what compaction assumes"),
    "yarn_orig_ctx": (0, "YaRN scaling would change what compaction assumes"),
    "offload_kqv": (True, "the scorer reads attention where llama.cpp puts it by default"),
    "op_offload": (None, "the scorer reads attention where llama.cpp puts it by default"),
    "no_perf": (False, "llama.cpp's perf counters are not used here"),
    "numa": (False, "NUMA placement is not wired through"),
    "draft_model": (None, "speculative decoding would decode tokens the scorer never sees"),
    "tokenizer": (None, "the GGUF's own tokenizer is the only one the recall log and chat turns understand"),
    "spm_infill": (False, "fill-in-the-middle prompts are not supported"),
    "lora_base": (None, "llama.cpp applies LoRA adapters to the loaded model; a separate base is not used"),
}

LLAMA_DEFAULT_SEED = C.LLAMA_DEFAULT_SEED  # llama_cpp's "no seed given"; its requests then derive one from it
DEFAULT_KV_BUDGET = 1024  # cells kept when neither kv_budget nor n_ctx is given


def refuse_unsupported(extra: Mapping[str, Any]) -> None:
    """ValueError for a llama_cpp keyword set to a value pymorph_edge cannot honour; TypeError for a keyword
    llama_cpp.Llama does not have either."""
    for key, value in extra.items():
        if key not in REFUSED_UNLESS_DEFAULT:
            raise TypeError(f"Llama() got an unexpected keyword argument {key!r}")
        default, why = REFUSED_UNLESS_DEFAULT[key]
        if value != default:
            raise ValueError(f"{key}={value!r} is not supported by pymorph_edge: {why} (only {default!r} is accepted)")


def resolve_budget(
    kv_budget: int | None, budget_given: bool, n_ctx: int | None, n_ubatch: int, n_ctx_train: int
) -> int | None:
    """The cells kept after every eviction, from kv_budget and llama_cpp's n_ctx.

    - kv_budget given: it wins; n_ctx, if given, must leave room for it (budget + n_ubatch cells), or the
      ceiling the app asked for would be broken.
    - only n_ctx given (a ported app): n_ctx is the most cells the cache may use, so the budget is
      n_ctx - n_ubatch (n_ctx=0 means the model's n_ctx_train, as in llama_cpp).
    - neither: DEFAULT_KV_BUDGET."""
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0):
        raise ValueError(f"n_ctx must be a non-negative int (0: the model's n_ctx_train), got {n_ctx!r}")
    ceiling = (n_ctx or n_ctx_train) if n_ctx is not None else None
    if budget_given:
        if kv_budget is not None and ceiling is not None and kv_budget + n_ubatch > ceiling:
            raise ValueError(
                f"kv_budget={kv_budget} needs kv_budget + n_ubatch = {kv_budget + n_ubatch} cells, more than "
                f"n_ctx={n_ctx}; raise n_ctx, lower n_ubatch, or leave n_ctx out"
            )
        return kv_budget
    if ceiling is None:
        return DEFAULT_KV_BUDGET
    budget = ceiling - n_ubatch
    if budget < 1:
        raise ValueError(
            f"n_ctx={n_ctx} leaves no room for a KV budget: the cache holds kv_budget + n_ubatch ({n_ubatch}) cells; "
            "raise n_ctx, lower n_ubatch (or n_batch), or pass kv_budget"
        )
    return budget


def effective_n_ubatch(n_ubatch: int | None, n_batch: int | None, default: int) -> int:
    """llama.cpp's rule: a ubatch is never larger than the batch."""
    for name, v in (("n_ubatch", n_ubatch), ("n_batch", n_batch)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    u = n_ubatch if n_ubatch is not None else default
    return min(u, n_batch) if n_batch is not None else u


def kv_type_name(setting: str, value: str | int | None) -> str | None:
    """A KV cache type as llama.cpp's name; llama_cpp passes GGML type numbers (e.g. 8 for q8_0)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        return value  # check_kv_type names it
    from pymorph_edge.engine.kv_cache_types import KV_TYPES

    for name in KV_TYPES:
        if getattr(C, "GGML_TYPE_" + name.upper(), None) == value:
            return name
    raise ValueError(f"{setting} must be one of {', '.join(KV_TYPES)} (or its GGML type number); got {value!r}")
