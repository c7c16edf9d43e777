"""Long generation under a KV budget vs the full cache: memory stays flat, speed stays up.

usage: python benchmarks/long_generation.py [--tokens 4096] [--budget 1024] [--model PATH] [--out benchmarks/results]
Writes long_generation.json, long_generation.md and long_generation.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pymorph_edge import Llama
from pymorph_edge.model.default_model import default_model_path

PROMPT = "Write a very long story about a lighthouse."


def run(model: str, budget: int | None, n_tokens: int, n_ctx: int) -> dict:
    llm = Llama(model, kv_budget=budget, n_ctx=n_ctx if budget is None else None)
    prompt = llm.tokenize(PROMPT)
    trace, t0 = [], time.perf_counter()
    ban = {llm.token_eos(): -1e9}  # stress run: the answer must not end early
    with tqdm(total=n_tokens, desc=f"budget={budget}", unit="tok", file=sys.stderr) as bar:
        for i, _ in enumerate(llm.generate(prompt, temp=0, logit_bias=ban)):
            bar.update(1)
            if (i + 1) % 256 == 0:
                trace.append(
                    {"generated": i + 1, "cells_in_use": llm.stats.cells_in_use, "seconds": time.perf_counter() - t0}
                )
            if i + 1 >= n_tokens:
                break
    t = llm.last_timings
    row = {
        "policy": llm.policy.name,
        "budget": budget,
        **llm.stats.as_dict(),
        "decode_tok_s": t.decode_tok_s,
        "seconds": time.perf_counter() - t0,
        "trace": trace,
    }
    llm.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    model = a.model or str(default_model_path())
    rows = [run(model, None, a.tokens, a.tokens + 64), run(model, a.budget, a.tokens, 0)]
    rows[0]["peak_rss_mb"] = None  # one process runs both; RSS peak is reported for the process as a whole
    result = {
        "command": " ".join(["python"] + sys.argv),
        "model": Path(model).name,
        "tokens": a.tokens,
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}, python {platform.python_version()}",
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "long_generation.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"`{result['command']}` on {result['machine']}, model {result['model']}, {a.tokens} generated tokens (EOS banned)",
        "",
        "| cache | kv_budget | cells allocated | peak cells | cells at end | tokens evicted | KV bytes | decode tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['budget']} | {r['n_ctx']} | {r['peak_cells']} | {r['cells_in_use']} | "
            f"{r['tokens_evicted']} | {r['kv_bytes'] / 2**20:.1f} MiB | {r['decode_tok_s']:.1f} |"
        )
    (a.out / "long_generation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        xs = [p["generated"] for p in r["trace"]]
        ax[0].plot(xs, [p["cells_in_use"] for p in r["trace"]], label=f"{r['policy']} (budget {r['budget']})")
        secs = [p["seconds"] for p in r["trace"]]
        ax[1].plot(xs[1:], [256 / (b - a_) for a_, b in zip(secs, secs[1:], strict=False)], label=r["policy"])
    ax[0].set(xlabel="generated tokens", ylabel="KV cells in use", title="KV cache size")
    ax[1].set(xlabel="generated tokens", ylabel="tok/s (per 256-token span)", title="decode speed")
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out / "long_generation.png", dpi=110)


if __name__ == "__main__":
    main()
