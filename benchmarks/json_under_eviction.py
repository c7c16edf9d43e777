"""JSON mode under eviction: long constrained chat answers on SmolLM2 while the cache evicts during the answer.

usage: python benchmarks/json_under_eviction.py --out benchmarks/results/json-under-eviction [--budget 256]
       [--requests 20] [--max-tokens 1500]

Each request asks for a long JSON document (this project's own prompts, below), with response_format json_object
for the first half and a JSON schema with required keys for the second, sampled at temperature 0.7 with a seed per
request. Every answer is parsed; the table reports its length, whether it ended by itself or at max_tokens (a cut
answer is unfinished JSON under any cache), the cache's evictions during it and its peak cells. The full cache runs
the same requests as the reference. Writes results.json, results.md and json.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pymorph_edge import Llama
from pymorph_edge.model.default_model import resolve_model

TOPICS = [
    "the lighthouses of a stormy coast",
    "a family of river otters",
    "the planets of an imaginary solar system",
    "the stations of a mountain railway",
    "the rooms of an old museum",
    "the ships of a merchant fleet",
    "the instruments of a village orchestra",
    "the trees of an ancient forest",
    "the bakeries of a small town",
    "the moons of a gas giant",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "description": {"type": "string"}},
                "required": ["name", "description"],
            },
        },
    },
    "required": ["title", "items"],
}


def request(i: int) -> tuple[list[dict[str, str]], dict]:
    topic = TOPICS[i % len(TOPICS)]
    text = (
        f"Write a long JSON document about {topic}. Give it a title and a list of at least twelve items, each with a "
        "name and a detailed description of several sentences."
    )
    fmt = {"type": "json_object"} if i < 10 else {"type": "json_object", "schema": SCHEMA}
    return [{"role": "user", "content": text}], fmt


def run(budget: int | None, n: int, max_tokens: int) -> list[dict]:
    rows = []
    with Llama(resolve_model("smollm2-135m"), kv_budget=budget, n_ctx=4096 if budget is None else None) as llm:
        for i in tqdm(range(n), desc=f"budget {budget}"):
            msgs, fmt = request(i)
            before = llm.stats.tokens_evicted
            t0 = time.perf_counter()
            r = llm.create_chat_completion(
                msgs, response_format=fmt, temperature=0.7, seed=1000 + i, max_tokens=max_tokens, repeat_penalty=1.1
            )
            text = r["choices"][0]["message"]["content"]
            try:
                doc = json.loads(text)
                valid = True
                keys_ok = i < 10 or ({"title", "items"} <= set(doc))
            except json.JSONDecodeError:
                valid, keys_ok = False, False
            rows.append(
                {
                    "request": i,
                    "format": "schema" if i >= 10 else "json_object",
                    "tokens": r["usage"]["completion_tokens"],
                    "finish": r["choices"][0]["finish_reason"],
                    "valid_json": valid,
                    "required_keys": keys_ok,
                    "evicted_during": llm.stats.tokens_evicted - before,
                    "peak_cells": llm.stats.peak_cells,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
            llm.reset()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=1500)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"command": "python " + " ".join(sys.argv), "budget": args.budget, "runs": {}}
    for name, budget in ((f"morphkv-{args.budget}", args.budget), ("full", None)):
        results["runs"][name] = run(budget, args.requests, args.max_tokens)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"# JSON mode under eviction (SmolLM2-135M-Instruct, budget {args.budget})",
        "",
        f"`{results['command']}`",
        "",
    ]
    lines += [
        "| cache | answers | ended by themselves | valid JSON (of those) | 400+ tokens, ended, valid | evicting during the answer | peak cells |"
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in results["runs"].items():
        ended = [r for r in rows if r["finish"] == "stop"]
        long_ok = [r for r in ended if r["tokens"] >= 400 and r["valid_json"] and r["required_keys"]]
        lines.append(
            f"| {name} | {len(rows)} | {len(ended)} | {sum(r['valid_json'] and r['required_keys'] for r in ended)}/{len(ended)} "
            f"| {len(long_ok)} | {sum(r['evicted_during'] > 0 for r in rows)} | {max(r['peak_cells'] for r in rows)} |"
        )
    lines += ["", "Per request (tokens / finish / valid):", ""]
    for name, rows in results["runs"].items():
        lines.append(
            f"- {name}: " + ", ".join(f"{r['tokens']}/{r['finish']}/{'ok' if r['valid_json'] else 'cut'}" for r in rows)
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, rows in results["runs"].items():
        ax.scatter(
            [r["request"] for r in rows], [r["tokens"] for r in rows], label=name, marker="o" if "full" in name else "x"
        )
    ax.axhline(args.budget, color="gray", lw=0.8, ls="--", label="budget")
    ax.set_xlabel("request")
    ax.set_ylabel("answer tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "json.png", dpi=120)
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
