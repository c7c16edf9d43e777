"""Decode speed of several policies, interleaved over rounds so machine noise hits them alike.

usage: python benchmarks/decode_speed_interleaved.py [--rounds 3] [--tokens 256] [--budget 1024] POLICY [POLICY ...]
Each round, for each policy: prefill a budget-sized prompt, then time `tokens` decode steps.
Prints one line per measurement and the median tok/s per policy.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pymorph_edge import Llama
from pymorph_edge.model.default_model import default_model_path


def measure(model: str, policy: str, budget: int, tokens: int) -> float:
    kw = (
        {"kv_budget": None, "n_ctx": budget + tokens + 64}
        if policy == "full"
        else {"kv_budget": budget, "policy": policy}
    )
    with Llama(model, **kw) as llm:
        prompt = [llm.token_bos()] + [(1000 + (i * 37) % 5000) % llm.n_vocab() for i in range(budget - 1)]
        llm.engine.decode(prompt)
        t0, n = time.perf_counter(), 0
        for _ in llm.generate(prompt, temp=0, logit_bias={llm.token_eos(): -1e9}):
            n += 1
            if n >= tokens:
                break
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("policies", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--budget", type=int, default=1024)
    a = ap.parse_args()
    model = str(default_model_path())
    speeds: dict[str, list[float]] = {p: [] for p in a.policies}
    for r in range(a.rounds):
        for p in a.policies:
            speeds[p].append(measure(model, p, a.budget, a.tokens))
            print(f"round {r} {p} {speeds[p][-1]:.1f} tok/s", flush=True)
    for p, v in speeds.items():
        print(f"median {p}: {statistics.median(v):.1f} tok/s over {len(v)} rounds")


if __name__ == "__main__":
    main()
