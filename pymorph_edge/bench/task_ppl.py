"""Teacher-forced streaming perplexity: the first `budget` tokens go in as a prompt, then every
following token is decoded one at a time (so per-step policies evict as in generation) and scored."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pymorph_edge.bench.common import default_texts, last_logprobs, open_llm
from pymorph_edge.bench.config import BenchConfig, policy_label


def text_tokens(llm, path: Path, n: int) -> list[int]:
    toks = llm.tokenize(path.read_text(errors="replace"))
    return toks[:n]


def run(cfg: BenchConfig, model: str, spec: dict[str, Any], tick: Callable[[int], None]) -> dict[str, Any]:
    paths = [Path(p) for p in cfg.ppl_texts] or default_texts()
    llm = open_llm(model, spec, cfg.budget, cfg.n_ubatch, cfg.ppl_tokens + 64)
    per_text = []
    try:
        for path in paths:
            toks = text_tokens(llm, path, cfg.ppl_tokens)
            prefix = min(cfg.budget, len(toks) - 1)
            llm.reset()
            llm.engine.decode(toks[:prefix])
            nll, n, decode_s = 0.0, 0, 0.0
            for i in range(prefix, len(toks)):
                nll -= float(last_logprobs(llm)[toks[i]])
                n += 1
                if i + 1 < len(toks):
                    t0 = time.perf_counter()
                    llm.decode_step(toks[i])  # as generation decodes: recall inside it included
                    decode_s += time.perf_counter() - t0
                tick(1)
            per_text.append(
                {
                    "text": path.name,
                    "tokens": len(toks),
                    "scored": n,
                    "ppl": math.exp(nll / max(n, 1)),
                    "decode_tok_s": (n - 1) / decode_s if decode_s else 0.0,
                    "peak_cells": llm.stats.peak_cells,
                }
            )
    finally:
        llm.close()
    ppl = math.exp(sum(math.log(t["ppl"]) * t["scored"] for t in per_text) / sum(t["scored"] for t in per_text))
    return {"policy": policy_label(spec), "ppl": ppl, "texts": per_text}
