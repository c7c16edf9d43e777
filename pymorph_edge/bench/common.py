"""Shared pieces of the benchmark tasks: opening a model under a policy, log-probabilities, texts."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as C
import numpy as np

from pymorph_edge.engine.engine_config import EngineConfig
from pymorph_edge.llama import Llama
from pymorph_edge.policies import make_policy

LICENSES = Path("/usr/share/common-licenses")


def open_llm(model: str, spec: dict[str, Any], budget: int, n_ubatch: int, n_ctx_needed: int) -> Llama:
    """A Llama for one policy spec. The full cache and SnapKV get n_ctx_needed cells; raises ValueError
    (the reason is reported in the results) when the policy cannot run on this model."""
    # engine settings a spec may carry; the rest are the policy's own parameters. "budget" overrides the
    # config's for this spec (equal-bytes comparisons: a q8_0 cache at about twice the f16 budget), while
    # prompt lengths stay multiples of the config's budget so every spec answers the same prompts
    engine_keys = (
        "name",
        "label",
        "swa_full",
        "max_span",
        "flash_attn",
        "type_k",
        "type_v",
        "budget",
        "recall",
        "recall_by",
        "recall_in_generation",
        "n_gpu_layers",
        "force_copy",
        "score_layers",
        "rotate_layers",
    )
    params = {k: v for k, v in spec.items() if k not in engine_keys}
    kv = {k: spec[k] for k in ("flash_attn", "type_k", "type_v") if k in spec}
    # score_layers null (or absent): the engine's default (every layer on the CPU with flash attention off;
    # engine_config.resolve_score_layers)
    layers = {k: spec[k] for k in ("score_layers", "rotate_layers") if k in spec}
    budget = spec.get("budget", budget)
    name = spec["name"]
    ngl = spec.get("n_gpu_layers", 0)
    if name == "snapkv":
        params.setdefault("n_ctx", max(n_ctx_needed, budget + n_ubatch))
    policy = make_policy(name, **params)
    if name == "full":
        return Llama(
            model,
            kv_budget=None,
            policy=policy,
            n_gpu_layers=ngl,
            config=EngineConfig(n_ctx=n_ctx_needed, n_ubatch=n_ubatch, swa_full=spec.get("swa_full"), **kv),
        )
    llm = Llama(
        model,
        kv_budget=budget,
        policy=policy,
        recall=spec.get("recall"),
        n_gpu_layers=ngl,
        config=EngineConfig(
            n_ubatch=n_ubatch,
            max_span=spec.get("max_span"),
            recall_by=spec.get("recall_by", EngineConfig.recall_by),
            recall_in_generation=spec.get("recall_in_generation"),
            **kv,
            **layers,
        ),
    )
    if spec.get("force_copy") and llm.engine.scorer is not None:
        # read every tensor through the backend API as for a GPU's buffers: the counters then show what a
        # non-host backend would copy (engine/stats.py), measured on the CPU
        llm.engine.scorer.force_copy(True)
    return llm


def last_logprobs(llm: Llama) -> np.ndarray:
    """Log-softmax of the last decoded token's logits, float64 (n_vocab,)."""
    ptr = C.llama_get_logits_ith(llm.engine.ctx, -1)
    logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)
    m = logits.max()
    return logits - (m + np.log(np.exp(logits - m).sum()))


def default_texts() -> list[Path]:
    """Long real texts that exist offline: Python standard-library sources and the licence texts."""
    std = Path(sysconfig.get_paths()["stdlib"])
    picks = [std / "argparse.py", LICENSES / "GPL-3"]
    return [p for p in picks if p.is_file()] or [Path(os.__file__)]
