"""Fidelity to the full cache over a long answer.

The full cache generates N tokens (end of sequence banned) once and keeps, per step, its top-256
log-probabilities. Each policy is then teacher-forced through the same tokens; per segment we
report top-1 agreement and the KL divergence from the full cache restricted to its top-256 tokens.
The reference samples (temperature 0.7, the config's seed) rather than decoding greedily: greedy
output of a small base model falls into a loop within a few hundred tokens, and a loop is predicted
perfectly from the recent tokens alone, which made every policy score 100% (measured, first run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pymorph_edge.bench.common import last_logprobs, open_llm
from pymorph_edge.bench.config import BenchConfig, policy_label

TOP = 256
PROMPT = (
    "The lighthouse keeper's journal, kept through the winter of 1887.\n\n"
    "November 3. The supply boat came at dawn with coal, flour and a letter from my sister."
)
TEMPERATURE = 0.7


def reference(cfg: BenchConfig, model: str, tick: Callable[[int], None]) -> dict[str, Any]:
    llm = open_llm(
        model, {"name": "full", "n_gpu_layers": cfg.n_gpu_layers}, cfg.budget, cfg.n_ubatch, cfg.fidelity_tokens + 512
    )
    try:
        prompt = llm.tokenize(PROMPT)
        llm.engine.decode(prompt)
        eos = llm.token_eos()
        rng = np.random.default_rng(cfg.seed)
        tokens, top_ids, top_lp = [], [], []
        for _ in range(cfg.fidelity_tokens):
            lp = last_logprobs(llm)
            lp[eos] = -np.inf
            ids = np.argpartition(-lp, TOP)[:TOP]
            p = np.exp((lp[ids] - lp[ids].max()) / TEMPERATURE)
            tokens.append(int(rng.choice(ids, p=p / p.sum())))
            top_ids.append(ids.astype(np.int32))
            top_lp.append(lp[ids].astype(np.float32))
            llm.engine.decode([tokens[-1]])
            tick(1)
    finally:
        llm.close()
    return {"prompt": prompt, "tokens": tokens, "top_ids": np.stack(top_ids), "top_lp": np.stack(top_lp)}


def run(
    cfg: BenchConfig, model: str, spec: dict[str, Any], ref: dict[str, Any], tick: Callable[[int], None]
) -> dict[str, Any]:
    llm = open_llm(model, spec, cfg.budget, cfg.n_ubatch, cfg.fidelity_tokens + 512)
    agree, kl, cells, decode_s = [], [], [], []
    try:
        llm.engine.decode(ref["prompt"])
        eos = llm.token_eos()
        for step, tok in enumerate(ref["tokens"]):
            lp = last_logprobs(llm)
            lp[eos] = -np.inf
            agree.append(int(np.argmax(lp)) == int(ref["top_ids"][step][np.argmax(ref["top_lp"][step])]))
            ids, p_lp = ref["top_ids"][step], ref["top_lp"][step].astype(np.float64)
            p = np.exp(p_lp)
            kl.append(float(np.sum(p * (p_lp - lp[ids]))))
            t0 = time.perf_counter()
            llm.decode_step(tok)  # as generation decodes: recall inside it included
            decode_s.append(time.perf_counter() - t0)
            cells.append(llm.stats.cells_in_use)
            tick(1)
        stats = llm.stats.as_dict()
    finally:
        llm.close()
    seg = cfg.fidelity_segment
    segments = []
    for s in range(0, len(agree), seg):
        segments.append(
            {
                "start": s,
                "end": min(s + seg, len(agree)),
                "top1_agreement": float(np.mean(agree[s : s + seg])),
                "mean_kl": float(np.mean(kl[s : s + seg])),
                "decode_tok_s": len(decode_s[s : s + seg]) / sum(decode_s[s : s + seg]),
                "cells_in_use": cells[min(s + seg, len(cells)) - 1],
            }
        )
    return {
        "policy": policy_label(spec),
        "top1_agreement": float(np.mean(agree)),
        "mean_kl": float(np.mean(kl)),
        "decode_tok_s": len(decode_s) / sum(decode_s),
        "segments": segments,
        "stats": stats,
    }
