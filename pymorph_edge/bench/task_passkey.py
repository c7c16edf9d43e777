"""Passkey accuracy per policy, prompt length (multiples of the budget) and key depth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pymorph_edge.bench.common import open_llm
from pymorph_edge.bench.config import BenchConfig, policy_label
from pymorph_edge.bench.passkey import answer, answer_chat, filler_repeats_for, make_case


def run(cfg: BenchConfig, model: str, spec: dict[str, Any], tick: Callable[[], None]) -> dict[str, Any]:
    trials = []
    longest = int(max(cfg.passkey_multipliers) * cfg.budget) + 256
    llm = open_llm(model, spec, cfg.budget, cfg.n_ubatch, longest)
    # instruction-tuned models (a GGUF chat template) are asked in a chat turn, base models by completion
    ask = answer_chat if llm.has_chat_template else answer
    try:
        for mult in cfg.passkey_multipliers:
            n_filler = filler_repeats_for(llm, int(mult * cfg.budget))
            for j, depth in enumerate(cfg.passkey_depths):
                case = make_case(n_filler, depth, cfg.seed * 1000 + int(mult * 10) + j)
                hit, text = ask(llm, case)
                trials.append(
                    {
                        "multiplier": mult,
                        "depth": depth,
                        "prompt_tokens": llm.last_timings.prompt_tokens,
                        "key": case.key,
                        "answer": text,
                        "correct": hit,
                        "peak_cells": llm.stats.peak_cells,
                    }
                )
                tick()
        kv_bytes, flash_attn = llm.stats.kv_bytes, llm.engine.flash_attn
    finally:
        llm.close()
    acc = sum(t["correct"] for t in trials) / len(trials)
    return {
        "policy": policy_label(spec),
        "accuracy": acc,
        "trials": trials,
        "kv_bytes": kv_bytes,
        "flash_attn": flash_attn,
    }
