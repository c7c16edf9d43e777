"""Teacher-forced perplexity far past the model's trained context, per segment.

A prefix goes in as a prompt, then every following token is decoded one at a time (so per-step
policies evict as in generation) and scored. The text is long and real: the licence texts shipped in
/usr/share/common-licenses, concatenated, then Python standard-library sources if more is needed.
A policy holds up when each segment's ppl stays close to context_shift's, whose cache never spans
more positions than the budget.
"""

from __future__ import annotations

import math
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pymorph_edge.bench.common import LICENSES, last_logprobs, open_llm
from pymorph_edge.bench.config import BenchConfig, policy_label


def long_text_files() -> list[Path]:
    """Each licence once (symlinks skipped), then standard-library modules, in a fixed order."""
    files = sorted(p for p in LICENSES.glob("*") if p.is_file() and not p.is_symlink()) if LICENSES.is_dir() else []
    std = Path(sysconfig.get_paths()["stdlib"])
    return files + sorted(std.glob("*.py"))


def long_text_tokens(llm, n: int) -> list[int]:
    toks: list[int] = []
    for path in long_text_files():
        toks += llm.tokenize(path.read_text(errors="replace"), add_bos=not toks)
        if len(toks) >= n:
            return toks[:n]
    raise ValueError(f"only {len(toks)} tokens of offline text found, {n} needed")


def run(cfg: BenchConfig, model: str, spec: dict[str, Any], tick: Callable[[int], None]) -> dict[str, Any]:
    total = cfg.longrun_prefix + cfg.longrun_tokens
    llm = open_llm(model, spec, cfg.budget, cfg.n_ubatch, total + 64)
    try:
        toks = long_text_tokens(llm, total)
        eng = llm.engine
        eng.decode(toks[: cfg.longrun_prefix])
        segments, nll, n, max_pos, decode_s = [], 0.0, 0, 0, 0.0
        seg_start = cfg.longrun_prefix
        for i in range(cfg.longrun_prefix, total):
            nll -= float(last_logprobs(llm)[toks[i]])
            n += 1
            if n == cfg.longrun_segment or i == total - 1:
                segments.append({"start": seg_start, "end": i + 1, "ppl": math.exp(nll / n)})
                seg_start, nll, n = i + 1, 0.0, 0
            if i + 1 < total:
                t0 = time.perf_counter()
                llm.decode_step(toks[i])  # as generation decodes: recall inside it included
                decode_s += time.perf_counter() - t0
                max_pos = max(max_pos, eng.next_pos)
            tick(1)
        s = llm.stats
        return {
            "policy": policy_label(spec),
            "segments": segments,
            "n_ctx_train": llm.n_ctx_train,
            "max_next_pos": max_pos,
            "compactions": s.compactions,
            "peak_cells": s.peak_cells,
            "decode_tok_s": (total - cfg.longrun_prefix - 1) / decode_s if decode_s else 0.0,
        }
    finally:
        llm.close()
