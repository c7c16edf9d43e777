"""Soak: one answer of 100K+ tokens under a KV budget, through the public streaming API.

usage: python benchmarks/soak.py [--model smollm2-135m] [--tokens 100000] [--budget 1024] [--out DIR]
Every 1K generated tokens it records the process RSS, the decode speed over that 1K, the cells in use,
the cache position and the compactions so far. Writes soak.json, soak.md and soak.png in --out.
The end of sequence is banned, so the answer cannot stop early.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pymorph_edge import Llama
from pymorph_edge.model.default_model import resolve_model

PROMPT = "Write a very long story about a lighthouse keeper and the ships she guides through the storms."
EVERY = 1000


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(model: str, budget: int, n_tokens: int) -> dict:
    llm = Llama(model, kv_budget=budget)
    ban = {llm.token_eos(): -1e9}
    trace, n, t_last = [], 0, time.perf_counter()
    stream = llm.create_completion(PROMPT, max_tokens=n_tokens, temperature=0.8, seed=0, logit_bias=ban, stream=True)
    with tqdm(total=n_tokens, desc=f"soak budget={budget}", unit="tok", file=sys.stderr) as bar:
        for _ in stream:
            done = llm.last_timings.completion_tokens
            bar.update(done - n)
            n = done
            if n // EVERY > len(trace):
                now, s = time.perf_counter(), llm.stats
                trace.append(
                    {
                        "generated": n,
                        "rss_mib": rss_mib(),
                        "tok_s": EVERY / (now - t_last),
                        "cells_in_use": s.cells_in_use,
                        "next_pos": s.next_pos,
                        "compactions": s.compactions,
                    }
                )
                t_last = now
    row = {
        "model": Path(model).name,
        "budget": budget,
        "generated": n,
        "n_ctx_train": llm.n_ctx_train,
        **llm.stats.as_dict(),
        "trace": trace,
    }
    llm.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="GGUF path or packaged model name")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"))
    a = ap.parse_args()
    row = soak(str(resolve_model(a.model)), a.budget, a.tokens)
    tr = row["trace"]
    at5k = next(p for p in tr if p["generated"] >= 5000)
    speeds = [p["tok_s"] for p in tr[1:]]
    summary = {
        "rss_mib_at_5k": at5k["rss_mib"],
        "rss_mib_at_end": tr[-1]["rss_mib"],
        "rss_growth_5k_to_end": tr[-1]["rss_mib"] / at5k["rss_mib"] - 1,
        "tok_s_first_10k": sum(speeds[:9]) / 9,
        "tok_s_last_10k": sum(speeds[-10:]) / 10,
        "max_cells_in_use": max(p["cells_in_use"] for p in tr),
        "max_next_pos": max(p["next_pos"] for p in tr),
    }
    result = {
        "command": " ".join(["python"] + sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "summary": summary,
        **row,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "soak.json").write_text(json.dumps(result, indent=1))
    md = [
        f"`{result['command']}` ({result['machine']}), {row['model']}, budget {a.budget}, n_ctx_train {row['n_ctx_train']}",
        "",
        "| generated | RSS MiB | tok/s (last 1K) | cells in use | cache position | compactions |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    md += [
        f"| {p['generated']} | {p['rss_mib']:.1f} | {p['tok_s']:.1f} | {p['cells_in_use']} | {p['next_pos']} | {p['compactions']} |"
        for p in tr
        if p["generated"] % 10_000 == 0 or p is at5k
    ]
    md += [
        "",
        f"RSS {summary['rss_mib_at_5k']:.1f} MiB at 5K -> {summary['rss_mib_at_end']:.1f} MiB at {row['generated']} "
        f"({summary['rss_growth_5k_to_end']:+.2%}); decode {summary['tok_s_first_10k']:.1f} tok/s over the first 10K, "
        f"{summary['tok_s_last_10k']:.1f} over the last 10K; at most {summary['max_cells_in_use']} cells, "
        f"cache positions never past {summary['max_next_pos']}.",
    ]
    (a.out / "soak.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    xs = [p["generated"] for p in tr]
    ax[0].plot(xs, [p["rss_mib"] for p in tr])
    ax[0].set(xlabel="generated tokens", ylabel="RSS MiB", title="process memory", ylim=(0, None))
    ax[1].plot(xs, [p["tok_s"] for p in tr])
    ax[1].set(xlabel="generated tokens", ylabel="tok/s (per 1K)", title="decode speed", ylim=(0, None))
    ax[2].plot(xs, [p["cells_in_use"] for p in tr], label="cells in use")
    ax[2].plot(xs, [p["next_pos"] for p in tr], label="cache position")
    ax[2].set(xlabel="generated tokens", title="cache", ylim=(0, None))
    ax[2].legend()
    for x in ax:
        x.grid(alpha=0.3)
    fig.suptitle(f"{row['model']}, kv_budget {a.budget}")
    fig.tight_layout()
    fig.savefig(a.out / "soak.png", dpi=110)


if __name__ == "__main__":
    main()
