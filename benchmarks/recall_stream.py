"""Recall inside one generation: the continuation task's text decoded token by token, with no request boundary.

usage: python benchmarks/recall_stream.py --model smollm2-135m --budget 512 --sets tuning,fresh,last \
           --configs full,morphkv,morphkv-norecall --out benchmarks/results/recall-stream-smollm2

Issue 20's teacher-forced measure. Eight facts (a 5-digit code under a name) open a text; ~4.5K tokens of prose
follow, and every ~500 tokens a reminder restates one fact ("As recorded at the start, the code for Maria is
48213."). The whole text goes through the cache one token at a time, as a generation would write it, and after each
token the generation loop's recall watcher runs (generation/generation_recall.py), as it does in Llama's generation
loop. Each reminder's value is scored from the logits before its tokens: the summed NLL of its tokens and how many
were the model's first choice. "morphkv" has recall inside the generation (opt-in since stop 38's ppl run),
"morphkv-norecall" none;
"+nogen" keeps request recall on and turns the watcher off (in this stream the two are the same: no request
boundary falls inside); "+sentence" lets a mention whose sentence lost any token ask too (WHOLE_SENTENCE_HELD) and
"+back" puts the block before the last 32 tokens (BEFORE_WINDOW). Each config sets both settings, so a config
without them is the trigger before stop 40 and commands of earlier stops run as they did; the library's trigger
since stop 40 is "morphkv+sentence+back". The texts are benchmarks/recall_texts.py's; "last" was only ever reported, never tuned on.
Writes results.json, results.md and a plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from recall_texts import SETS, continuation_facts, filler

from pymorph_edge import Llama
from pymorph_edge.bench.common import last_logprobs
from pymorph_edge.engine.engine_config import EngineConfig
from pymorph_edge.generation import generation_recall
from pymorph_edge.model.default_model import resolve_model


def stream(llm: Llama, set_name: str, per: int = 28) -> tuple[list[int], list[dict]]:
    """The set's text as token ids (each part tokenized on its own, so each value's tokens are known), and where each
    reminder's value lies in it."""
    s = SETS[set_name]
    rng, facts, fact, cue = continuation_facts(set_name)
    ids = llm.tokenize(("Records of the archive. " + " ".join(fact.format(name=n, code=c) for n, c in facts)).encode())
    # per: sentences between reminders; 28 (~500 tokens) as in recall_bench's continuation task
    prose = filler(set_name, 8 * per, s["seed"])
    order = facts[:]
    rng.shuffle(order)
    values = []
    for r, (name, code) in enumerate(order):
        ids += llm.tokenize(
            ("\n\n" + " ".join(prose[r * per : (r + 1) * per]) + " " + cue.format(name=name)).encode(), add_bos=False
        )
        value = llm.tokenize(f" {code}".encode(), add_bos=False)
        values.append({"name": name, "code": code, "at": len(ids), "n": len(value)})
        ids += value + llm.tokenize(b".", add_bos=False)
    return ids, values


def run(llm: Llama, ids: list[int], values: list[dict]) -> tuple[list[dict], float, float]:
    """Decode ids one at a time, the recall watcher after each, and score each value from the logits before it;
    returns the scores, the seconds in all, and the seconds in the watcher (recalls included)."""
    eng, watcher = llm.engine, llm._generation_recall
    at = {v["at"] + k: (j, k) for j, v in enumerate(values) for k in range(v["n"])}
    out = [{**v, "nll": 0.0, "top1": 0, "distance": v["at"]} for v in values]
    t0, watch_s = time.perf_counter(), 0.0
    for i, t in enumerate(ids):
        if i in at:
            j, _ = at[i]
            row = last_logprobs(llm)
            out[j]["nll"] -= float(row[t])
            out[j]["top1"] += int(np.argmax(row) == t)
        eng.decode([t])
        if watcher is not None:  # what llm.decode_step does, timed apart
            t1 = time.perf_counter()
            watcher.after_token()
            watch_s += time.perf_counter() - t1
    return out, time.perf_counter() - t0, watch_s


def open_llm(path: Path, config: str, budget: int) -> Llama:
    config, *flags = config.split("+")
    # "+sentence": a mention whose sentence lost a token asks too (generation_recall.WHOLE_SENTENCE_HELD)
    generation_recall.WHOLE_SENTENCE_HELD = "sentence" in flags
    # "+back": the block goes before the last 32 tokens, not before the sentence in progress (BEFORE_WINDOW)
    generation_recall.BEFORE_WINDOW = "back" in flags
    if config == "full":
        return Llama(path, kv_budget=None, n_ctx=8192)
    policy, off, _ = config.partition("-norecall")
    # on unless "+nogen" or recall is off (it is off by default)
    cfg = EngineConfig(recall_in_generation="nogen" not in flags and not off)
    return Llama(path, kv_budget=budget, policy=policy, recall=not off, config=cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--sets", default="tuning,fresh,last")
    ap.add_argument("--configs", default="full,morphkv,morphkv-norecall")
    ap.add_argument(
        "--per",
        type=int,
        default=28,
        help="prose sentences between reminders (28: ~500 tokens; 60 takes SmolLM2 past its n_ctx_train)",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    path = resolve_model(args.model)
    results = []
    for config in args.configs.split(","):
        llm = open_llm(path, config, args.budget)
        for set_name in args.sets.split(","):
            llm.reset()
            ids, values = stream(llm, set_name, args.per)
            trials, seconds, watch_s = run(llm, ids, values)
            st = llm.stats
            row = {
                "config": config,
                "set": set_name,
                "tokens": len(ids),
                "seconds": seconds,
                "watcher_s": watch_s,  # after_token in all: indexing each token, the looks, and the recalls
                "trials": trials,
                "value_nll": sum(t["nll"] for t in trials) / len(trials),
                "value_top1": sum(t["top1"] for t in trials),
                "value_tokens": sum(t["n"] for t in trials),
                "peak_cells": st.peak_cells,
                "generation_recalls": st.generation_recalls,
                "recalled_tokens": st.recalled_tokens,
                "generation_recall_s": st.generation_recall_s,
            }
            results.append(row)
            write(args, results)
            print(
                f"{config:22s} {set_name:9s} top1 {row['value_top1']}/{row['value_tokens']}  nll {row['value_nll']:.2f}"
                f"  recalls {row['generation_recalls']} ({row['recalled_tokens']} tok, {row['generation_recall_s']:.1f} s)"
                f"  watcher {watch_s:.1f} s  peak {row['peak_cells']}  {seconds:.0f} s",
                flush=True,
            )
        llm.close()
    plot(args, results)


def write(args: argparse.Namespace, results: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/recall_stream.py " + " ".join(sys.argv[1:])
    (args.out / "results.json").write_text(
        json.dumps({"command": command, "budget": args.budget, "model": args.model, "results": results}, indent=1)
    )
    lines = [
        f"# Recall inside one generation: {args.model}, budget {args.budget}",
        "",
        f"`{command}`",
        "",
        "| config | set | value tokens first choice | mean value NLL (per reminder) | recalls inside | tokens recalled "
        "| their time | watcher in all | peak cells | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['set']} | {r['value_top1']}/{r['value_tokens']} | {r['value_nll']:.2f} | "
            f"{r['generation_recalls']} | {r['recalled_tokens']} | {r['generation_recall_s']:.2f} s | "
            f"{r['watcher_s']:.2f} s | {r['peak_cells']} | {r['seconds']:.0f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


def plot(args: argparse.Namespace, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for config in dict.fromkeys(r["config"] for r in results):
        pts = sorted((t["distance"], t["nll"]) for r in results if r["config"] == config for t in r["trials"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=config, alpha=0.7)
    ax.set_xlabel("tokens from the text's start to the reminder's value")
    ax.set_ylabel("value NLL (summed over its tokens)")
    ax.set_title(f"Recall inside one generation: {args.model}, budget {args.budget}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "plot.png", dpi=110)


if __name__ == "__main__":
    main()
