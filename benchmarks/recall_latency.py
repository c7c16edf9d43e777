"""Per-turn latency with and without recall at a 4K-token history (SmolLM2, budget 512), interleaved rounds.

usage: python benchmarks/recall_latency.py [--rounds 2]
Each round builds the same 4K-token history in a fresh Llama (not timed), then times one request that extends it
by a short question and answers 16 greedy tokens.
"""

from __future__ import annotations

import argparse
import sys
import time

sys.path.insert(0, "benchmarks")
from recall_bench import FACTS_SET, filler  # noqa: E402

from pymorph_edge import Llama  # noqa: E402
from pymorph_edge.model.default_model import resolve_model  # noqa: E402


def turn_seconds(recall: bool) -> tuple[float, int]:
    llm = Llama(resolve_model("smollm2-135m"), kv_budget=512, recall=recall)
    text = "Records. " + " ".join(f"The code for {n} is {10000 + 7919 * i}." for i, n in enumerate(FACTS_SET)) + " "
    text += " ".join(filler("tuning", 220, 1))
    llm.create_completion(text, max_tokens=1, temperature=0.0)
    history = llm.engine.n_past
    t0 = time.perf_counter()
    llm.create_completion(text + " As recorded at the start, the code for Omar is", max_tokens=16, temperature=0.0)
    dt = time.perf_counter() - t0
    llm.close()
    return dt, history


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    on, off = [], []
    for _ in range(args.rounds):
        t, hist = turn_seconds(True)
        on.append(t)
        off.append(turn_seconds(False)[0])
        print(f"history {hist} tokens: recall on {t:.3f} s, off {off[-1]:.3f} s", flush=True)
    print(f"median on/off: {sorted(on)[len(on) // 2] / sorted(off)[len(off) // 2]:.3f}")


if __name__ == "__main__":
    main()
