"""Decode speed of two checkouts of pymorph_edge, interleaved per round (the drop-in work must not slow plain decoding).

usage: python benchmarks/decode_speed_versions.py --a . --b /tmp/old-checkout [--rounds 3] [--tokens 512]
       [--out benchmarks/results/NAME]

Each round runs one fresh process per checkout (A then B): SmolLM2 at kv_budget 512, a 64-token prompt, then
`--tokens` greedy tokens with the end of sequence banned, no grammar and no logprobs; the process prints its
decode tok/s (Llama.last_timings). The median of the per-round ratios A/B is what to quote.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
from pymorph_edge import Llama
from pymorph_edge.model.default_model import resolve_model
n = int(sys.argv[1])
with Llama(resolve_model("smollm2-135m"), kv_budget=512, n_threads=2) as llm:
    ban = {llm.token_eos(): -1e9}
    prompt = "Write a long story about a lighthouse keeper and the storms of one winter. " * 4
    llm.create_completion(prompt, max_tokens=n, temperature=0, logit_bias=ban)
    print(json.dumps({"decode_tok_s": llm.last_timings.decode_tok_s, "evicted": llm.stats.tokens_evicted}))
"""


def one(checkout: Path, tokens: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tokens)], cwd=checkout, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", type=Path, required=True)
    ap.add_argument("--b", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for r in range(args.rounds):
        a, b = one(args.a, args.tokens), one(args.b, args.tokens)
        rows.append(
            {
                "round": r,
                "a_tok_s": a["decode_tok_s"],
                "b_tok_s": b["decode_tok_s"],
                "ratio": a["decode_tok_s"] / b["decode_tok_s"],
                "evicted": a["evicted"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    summary = {
        "command": "python " + " ".join(sys.argv),
        "median_ratio_a_over_b": statistics.median(r["ratio"] for r in rows),
        "rounds": rows,
    }
    print(json.dumps(summary))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
