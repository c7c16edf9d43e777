"""Prompt processing under a budget against a raw llama.cpp C-API loop, interleaved over rounds.

usage: python benchmarks/prefill_vs_raw.py [--rounds 2] [--prompt 1536] [--budget 1024] [--fewer 8|c8] [--out DIR]
SmolLM2, a `prompt`-token prompt in 512-token ubatches. The raw loop is llama-cpp-python's low-level API only:
one context of `prompt` cells with no eval callback, llama_decode over the chunks. pymorph_edge decodes the same
tokens into a `budget`-cell cache with MorphKV (scoring every chunk, evicting before the next; recall off, so the
comparison is of the scorer alone), and again reading fewer layers (--fewer: "8", EngineConfig(score_layers=8);
"c8", 8 a decode step in turn and 8 chosen ones for long prompt chunks, rotate_layers="chunks"). Flash attention
off with an f16 cache, and on with q8_0. Reports tok/s per
round and pymorph_edge / raw; writes results.json, results.md and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import llama_cpp.llama_cpp as C

from pymorph_edge import Llama
from pymorph_edge.engine.engine_config import EngineConfig
from pymorph_edge.model.default_model import resolve_model

TEXT = "The lighthouse keeper wrote in his log every night about the ships, the weather and the sea. "
N_UBATCH = 512
FEWER = {
    "8": "8 (EngineConfig(score_layers=8))",
    "c8": '8 a decode step in turn, and the 8 chosen ones for prompt chunks (score_layers=8, rotate_layers="chunks")',
}
CASES = [("off", False, "f16"), ("on", True, "q8_0")]
TYPES = {"f16": C.GGML_TYPE_F16, "q8_0": C.GGML_TYPE_Q8_0}


def raw(path: str, tokens: list[int], flash_attn: bool, kv_type: str, n_threads: int) -> float:
    """tok/s of a plain llama_decode loop over the prompt's chunks."""
    mp = C.llama_model_default_params()
    model = C.llama_model_load_from_file(path.encode(), mp)
    cp = C.llama_context_default_params()
    cp.n_ctx = len(tokens)
    cp.n_batch = cp.n_ubatch = N_UBATCH
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.type_k = cp.type_v = TYPES[kv_type]
    ctx = C.llama_init_from_model(model, cp)
    batch = C.llama_batch_init(N_UBATCH, 0, 1)
    try:
        t0 = time.perf_counter()
        for start in range(0, len(tokens), N_UBATCH):
            chunk = tokens[start : start + N_UBATCH]
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(chunk) - 1
            if C.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        C.llama_synchronize(ctx)
        return len(tokens) / (time.perf_counter() - t0)
    finally:
        C.llama_batch_free(batch)
        C.llama_free(ctx)
        C.llama_model_free(model)


def bounded(
    path: str, tokens: list[int], flash_attn: bool, kv_type: str, budget: int, n_threads: int, layers: int | str | None
) -> dict:
    rotate = "chunks" if isinstance(layers, str) and layers.startswith("c") else False
    layers = int(layers.lstrip("c")) if isinstance(layers, str) else layers
    cfg = EngineConfig(
        n_ubatch=N_UBATCH,
        flash_attn=flash_attn,
        type_k=kv_type,
        type_v=kv_type,
        score_layers=layers,
        rotate_layers=rotate,
    )
    with Llama(path, kv_budget=budget, config=cfg, recall=False, n_threads=n_threads) as llm:
        t0 = time.perf_counter()
        llm.engine.decode(tokens)
        dt = time.perf_counter() - t0
        return {"tok_s": len(tokens) / dt, "evicted": llm.stats.tokens_evicted, "peak": llm.stats.peak_cells}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=1536)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument(
        "--fewer", default="8", help='the last columns: "8" (score_layers=8) or "c8" (rotate_layers="chunks")'
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    path = str(resolve_model("smollm2-135m"))
    n_threads = os.cpu_count() or 1
    with Llama(path, kv_budget=None, n_ctx=256) as llm:
        tokens = llm.tokenize((TEXT * (args.prompt // 10)).encode())[: args.prompt]
    rows = []
    for r in range(args.rounds):
        for label, fa, kv in CASES:
            a = raw(path, tokens, fa, kv, n_threads)
            b = bounded(path, tokens, fa, kv, args.budget, n_threads, None)
            c = bounded(path, tokens, fa, kv, args.budget, n_threads, args.fewer)
            rows.append(
                {"round": r + 1, "flash_attn": label, "kv_type": kv, "raw_tok_s": a, "morphkv": b, "eight_layers": c}
            )
            print(
                f"round {r + 1} FA {label} {kv}: raw {a:.1f} tok/s, MorphKV {args.budget} {b['tok_s']:.1f} tok/s "
                f"({b['tok_s'] / a:.2f}x), evicted {b['evicted']}; reading {args.fewer} {c['tok_s']:.1f} tok/s "
                f"({c['tok_s'] / a:.2f}x)",
                flush=True,
            )
    for label, _, kv in CASES:
        for key in ("morphkv", "eight_layers"):
            ratios = [x[key]["tok_s"] / x["raw_tok_s"] for x in rows if x["flash_attn"] == label]
            print(f"FA {label} {kv}: {key} / raw, median of {len(ratios)}: {statistics.median(ratios):.2f}x")
    if args.out is not None:
        write(args, rows)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/prefill_vs_raw.py " + " ".join(sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    lines = [
        f"# Prompt processing: MorphKV at budget {args.budget} against a raw llama.cpp loop (SmolLM2)",
        "",
        f"`{command}`",
        "",
        f"{args.prompt}-token prompt in {N_UBATCH}-token ubatches, {os.cpu_count()} threads, rounds interleaved.",
        "",
        "MorphKV reads every layer (the default for prompt chunks); the last columns read fewer: "
        + FEWER.get(args.fewer, args.fewer)
        + ".",
        "",
        "| round | flash attention | KV type | raw loop (tok/s) | MorphKV (tok/s) | MorphKV / raw | evicted "
        f"| {args.fewer} (tok/s) | {args.fewer} / raw |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in rows:
        m, c = x["morphkv"], x["eight_layers"]
        lines.append(
            f"| {x['round']} | {x['flash_attn']} | {x['kv_type']} | {x['raw_tok_s']:.1f} | {m['tok_s']:.1f} | "
            f"{m['tok_s'] / x['raw_tok_s']:.2f}x | {m['evicted']} | {c['tok_s']:.1f} | {c['tok_s'] / x['raw_tok_s']:.2f}x |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = [f"r{x['round']} FA {x['flash_attn']}\n{x['kv_type']}" for x in rows]
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [x["morphkv"]["tok_s"] / x["raw_tok_s"] for x in rows], 0.4, label="MorphKV")
    ax.bar([i + 0.2 for i in xs], [x["eight_layers"]["tok_s"] / x["raw_tok_s"] for x in rows], 0.4, label=args.fewer)
    ax.axhline(0.9, color="tab:red", linestyle="--", label="0.9x")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("MorphKV prefill / raw llama.cpp")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "prefill_vs_raw.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
