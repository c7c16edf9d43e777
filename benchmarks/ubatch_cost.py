"""What one ubatch costs on a bounded cache, by its size: scored (the callback reads every layer's attention, as
every prompt chunk and recalled block is) against the same ubatch with the scorer idle (llama.cpp alone).

usage: python benchmarks/ubatch_cost.py [--model smollm2-135m] [--budget 512] [--repeats 5]
                                        [--sizes 1,4,8,17,23,32,64] [--out benchmarks/results/ubatch-cost-smollm2]
A 3K-token text fills the cache down to the budget, and the state is saved. Each timing loads that state and
decodes one ubatch of the given size at the next positions; the median of --repeats is reported. The idle run
leaves cells the scorer never saw, which the next load_state discards. A recalled block costs its tokens' share of
such a ubatch (docs/recall.md), so this is the floor under recall's time: recomputing n tokens costs what n more
tokens of a ubatch cost. Writes results.json, results.md and a plot when --out is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import llama_cpp.llama_cpp as C

sys.path.insert(0, "benchmarks")
from recall_bench import filler  # noqa: E402

from pymorph_edge import Llama  # noqa: E402
from pymorph_edge.model.default_model import resolve_model  # noqa: E402


def timed_ubatch(llm: Llama, tokens: list[int], scored: bool) -> float:
    e = llm.engine
    b, n = e.batch, len(tokens)
    for i, t in enumerate(tokens):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, e.next_pos + i, 1, int(i == n - 1)
        b.seq_id[i][0] = 0
    b.n_tokens = n
    t0 = time.perf_counter()
    if scored:
        e.scorer.begin(e.next_pos, n, True, False, False, False, False)
    rc = C.llama_decode(e.ctx, b)
    if scored:
        e.scorer.end()
    dt = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc} for a {n}-token ubatch")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="1,4,8,17,23,32,64")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    llm = Llama(resolve_model(args.model), kv_budget=args.budget, recall=False)
    text = " ".join(filler("held-out", 300, 7))
    llm.engine.decode(llm.tokenize(text.encode())[:3000])
    cells = llm.stats.cells_in_use
    state = llm.save_state()
    pool = llm.tokenize(" ".join(filler("tuning", 20, 3)).encode(), add_bos=False)
    rows = []
    for n in sizes:
        times: dict[str, list[float]] = {"scored": [], "idle": []}
        for _ in range(args.repeats):
            for mode in ("scored", "idle"):  # interleaved, so drift hits both
                llm.load_state(state)
                times[mode].append(timed_ubatch(llm, pool[:n], mode == "scored"))
        s, r = statistics.median(times["scored"]), statistics.median(times["idle"])
        rows.append({"tokens": n, "scored_s": s, "idle_s": r, "each": times})
        print(f"{n:4d} tokens: scored {s * 1000:7.1f} ms, scorer idle {r * 1000:7.1f} ms, {s / r:.2f}x", flush=True)
    llm.close()
    if args.out is not None:
        write(args, rows, cells)


def write(args: argparse.Namespace, rows: list[dict], cells: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/ubatch_cost.py " + " ".join(sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps({"command": command, "cells": cells, "rows": rows}, indent=1))
    lines = [
        f"# One ubatch's cost by size, {args.model}, budget {args.budget} ({cells} cells in use)",
        "",
        f"`{command}`",
        "",
        "| tokens | scored (ms) | scorer idle (ms) | scored / idle | scored ms a token |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        s, i = r["scored_s"] * 1000, r["idle_s"] * 1000
        lines.append(f"| {r['tokens']} | {s:.1f} | {i:.1f} | {s / i:.2f} | {s / r['tokens']:.2f} |")
    lines += ["", f"Medians of {args.repeats} timings each, scored and idle interleaved, from one saved state."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    xs = [r["tokens"] for r in rows]
    ax.plot(xs, [r["scored_s"] * 1000 for r in rows], "o-", label="scored")
    ax.plot(xs, [r["idle_s"] * 1000 for r in rows], "s--", label="scorer idle (llama.cpp alone)")
    ax.set_xlabel("tokens in the ubatch")
    ax.set_ylabel("ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "ubatch_cost.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
