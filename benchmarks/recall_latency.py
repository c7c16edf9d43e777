"""Per-turn latency with and without recall at a 4K-token history (SmolLM2, budget 512), interleaved rounds.

usage: python benchmarks/recall_latency.py [--rounds 2] [--out benchmarks/results/recall-latency-smollm2]
Each round builds the same 4K-token history in a fresh Llama (not timed), then times one request that extends it
by a question and answers `--answer` greedy tokens, with recall at its default and with recall off. Writes
results.json, results.md and a plot when --out is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
from recall_bench import FACTS_SET, filler  # noqa: E402

from pymorph_edge import Llama  # noqa: E402
from pymorph_edge.model.default_model import resolve_model  # noqa: E402


def turn(recall: bool, answer: int) -> dict:
    llm = Llama(resolve_model("smollm2-135m"), kv_budget=512, recall=recall)
    text = "Records. " + " ".join(f"The code for {n} is {10000 + 7919 * i}." for i, n in enumerate(FACTS_SET)) + " "
    text += " ".join(filler("tuning", 220, 1))
    llm.create_completion(text, max_tokens=1, temperature=0.0)
    history = llm.engine.n_past
    t0 = time.perf_counter()
    out = llm.create_completion(
        text + " As recorded at the start, the code for Omar is", max_tokens=answer, temperature=0.0
    )
    dt = time.perf_counter() - t0
    s = llm.stats
    llm.close()
    return {
        "seconds": dt,
        "history": history,
        "answer_tokens": out["usage"]["completion_tokens"],
        "recall_s": s.recall_s,
        "recalled_tokens": s.recalled_tokens,
        "recall_key_bytes": s.recall_key_bytes,
        "recall_log_bytes": s.recall_log_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--answer", type=int, default=64, help="greedy tokens answered per turn (default 64)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rounds = []
    for _ in range(args.rounds):
        on, off = turn(True, args.answer), turn(False, args.answer)
        rounds.append({"on": on, "off": off})
        print(
            f"history {on['history']} tokens: recall on {on['seconds']:.3f} s (recall {on['recall_s']:.3f} s, "
            f"{on['recalled_tokens']} tokens), off {off['seconds']:.3f} s",
            flush=True,
        )
    on_s = sorted(r["on"]["seconds"] for r in rounds)
    off_s = sorted(r["off"]["seconds"] for r in rounds)
    ratio = on_s[len(on_s) // 2] / off_s[len(off_s) // 2]
    print(f"median on/off: {ratio:.3f}")
    if args.out is not None:
        write(args, rounds, ratio)


def write(args: argparse.Namespace, rounds: list[dict], ratio: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/recall_latency.py " + " ".join(sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps({"command": command, "rounds": rounds, "ratio": ratio}, indent=1))
    lines = [
        "# Recall latency: one chat-style turn at a 4K-token history, SmolLM2, budget 512",
        "",
        f"`{command}`",
        "",
        "| round | recall on (s) | of which recall (s) | tokens recalled | recall off (s) | on / off |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(rounds):
        on, off = r["on"], r["off"]
        lines.append(
            f"| {i + 1} | {on['seconds']:.3f} | {on['recall_s']:.3f} | {on['recalled_tokens']} | {off['seconds']:.3f} "
            f"| {on['seconds'] / off['seconds']:.3f} |"
        )
    on0 = rounds[0]["on"]
    lines += [
        "",
        f"Median on / off: **{ratio:.3f}**. History {on0['history']} tokens; {on0['answer_tokens']} tokens answered; "
        f"host memory for recall: {on0['recall_log_bytes']} bytes of token ids, {on0['recall_key_bytes']} bytes of keys.",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3))
    x = range(len(rounds))
    ax.bar([i - 0.2 for i in x], [r["on"]["seconds"] for r in rounds], 0.4, label="recall on")
    ax.bar([i + 0.2 for i in x], [r["off"]["seconds"] for r in rounds], 0.4, label="recall off")
    ax.set_xticks(list(x), [f"round {i + 1}" for i in x])
    ax.set_ylabel("turn latency (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "latency.png", dpi=110)


if __name__ == "__main__":
    main()
