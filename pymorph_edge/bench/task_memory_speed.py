"""Memory against output length, and prefill/decode speed.

Memory: llama.cpp allocates the whole KV cache when a context is created, so the KV bytes a policy
needs to reach an output length L are those of the context it must create for L (the full cache
and SnapKV need L cells; bounded policies a fixed number). Peak process RSS is measured in a fresh
subprocess that creates that context, fills it with L tokens (as a prompt, which is much faster
than generating them and touches the same KV pages) and generates 32 more.
Speed: prefill a `budget`-token prompt, then decode `speed_decode_tokens` tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from pymorph_edge.bench.common import open_llm
from pymorph_edge.bench.config import BenchConfig, policy_label

_PROBE = r"""
import json, resource, sys
from pymorph_edge.bench.common import open_llm
model, spec, budget, ubatch, length = json.loads(sys.argv[1])
llm = open_llm(model, spec, budget, ubatch, length + 64)
tokens = [llm.token_bos()] + [(1000 + (i * 37) % 5000) % llm.n_vocab() for i in range(length - 1)]
out = llm.create_completion(tokens, max_tokens=32, temperature=0, logit_bias={llm.token_eos(): -1e9})
print(json.dumps({"kv_bytes": llm.stats.kv_bytes, "n_ctx": llm.stats.n_ctx,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def memory(cfg: BenchConfig, model: str, spec: dict[str, Any], tick: Callable[[int], None]) -> dict[str, Any]:
    rows = []
    for length in cfg.memory_lengths:
        arg = json.dumps([model, spec, cfg.budget, cfg.n_ubatch, length])
        r = subprocess.run([sys.executable, "-c", _PROBE, arg], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            rows.append(
                {"length": length, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
            )
        else:
            rows.append({"length": length, **json.loads(r.stdout.strip().splitlines()[-1])})
        tick(1)
    return {"policy": policy_label(spec), "lengths": rows}


def speed(cfg: BenchConfig, model: str, spec: dict[str, Any], tick: Callable[[int], None]) -> dict[str, Any]:
    llm = open_llm(model, spec, cfg.budget, cfg.n_ubatch, cfg.budget + cfg.speed_decode_tokens + 64)
    try:
        prompt = [llm.token_bos()] + [1000 + (i * 37) % 5000 for i in range(cfg.budget - 1)]
        prompt = [t % llm.n_vocab() for t in prompt]
        t0 = time.perf_counter()
        llm.engine.decode(prompt)
        prefill_s = time.perf_counter() - t0
        pre = llm.stats
        ban = {llm.token_eos(): -1e9}
        n = 0
        t1 = time.perf_counter()
        for _ in llm.generate(prompt, temp=0, logit_bias=ban):  # prompt is fully cached: only decode is timed
            n += 1
            if n >= cfg.speed_decode_tokens:
                break
        decode_s = time.perf_counter() - t1
        tick(1)
        s = llm.stats
        steps = s.decode_steps - pre.decode_steps
        return {
            "policy": policy_label(spec),
            "prefill_tok_s": len(prompt) / prefill_s,
            "decode_tok_s": n / decode_s,
            "cells_in_use": s.cells_in_use,
            # what scoring asked of the backend (engine/stats.py): the prompt's chunks, then per decode step
            "prompt_chunks": pre.prompt_chunks,
            "d2h_bytes_per_prompt_chunk": pre.d2h_bytes_per_prompt_chunk,
            "syncs_per_prompt_chunk": pre.syncs_per_prompt_chunk,
            "d2h_bytes_per_decode_step": (s.decode_d2h_bytes - pre.decode_d2h_bytes) / steps if steps else 0.0,
            "syncs_per_decode_step": (s.decode_syncs - pre.decode_syncs) / steps if steps else 0.0,
        }
    finally:
        llm.close()
