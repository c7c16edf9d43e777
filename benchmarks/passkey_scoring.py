"""Passkey accuracy of MorphKV scoring variants, on a tuning set and a held-out set side by side.

usage: python benchmarks/passkey_scoring.py --model smollm2-135m --budget 512 --mult 4,8 \
           --out benchmarks/results/scoring-smollm2 LABEL=JSON [LABEL=JSON ...]

Each variant is a label and MorphKV keyword arguments, e.g. 'defaults={}' or
'uniform-heads={"head_weights": "uniform"}'; a JSON object with "policy" picks another policy.
The tuning set (bench/passkey.py TUNING) chose the defaults; the held-out set (HELDOUT: other
filler text, keys and depths) was only ever reported. Instruction-tuned models (a GGUF with a chat
template) are asked in a chat turn, base models by completion. Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pymorph_edge import Llama
from pymorph_edge.bench.passkey import HELDOUT, TUNING, answer, answer_chat, filler_repeats_for, make_case
from pymorph_edge.model.default_model import resolve_model
from pymorph_edge.policies import make_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--mult", default="4,8", help="prompt lengths as multiples of the budget")
    ap.add_argument("--sets", default="tuning,held-out")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("variants", nargs="+")
    args = ap.parse_args()
    path = resolve_model(args.model)
    mults = [float(m) for m in args.mult.split(",")]
    sets = [s for s in (TUNING, HELDOUT) if s.name in args.sets.split(",")]
    rows, trials = [], []
    for v in args.variants:
        label, _, kw_text = v.partition("=")
        kw = json.loads(kw_text or "{}")
        name = kw.pop("policy", "morphkv")
        budget = None if name == "full" else args.budget
        t0 = time.time()
        with Llama(
            path, kv_budget=budget, policy=make_policy(name, **kw), n_ctx=16384 if budget is None else None
        ) as llm:
            ask = answer_chat if llm.has_chat_template else answer
            for s in sets:
                for mult in mults:
                    n_filler = filler_repeats_for(llm, int(mult * args.budget), s.filler)
                    hits = 0
                    for j, depth in enumerate(s.depths):
                        case = make_case(n_filler, depth, s.seed_base + j, s.filler)
                        hit, text = ask(llm, case)
                        hits += hit
                        trials.append(
                            {"variant": label, "set": s.name, "mult": mult, "depth": depth, "key": case.key}
                            | {"answer": text, "correct": hit, "prompt_tokens": llm.last_timings.prompt_tokens}
                        )
                        print(label, s.name, mult, depth, case.key, repr(text[:48]), hit, flush=True)
                    rows.append({"variant": label, "set": s.name, "mult": mult, "correct": hits, "n": len(s.depths)})
        print(f"{label}: {time.time() - t0:.0f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/passkey_scoring.py " + " ".join(f"'{a}'" if "{" in a else a for a in sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps({"command": command, "rows": rows, "trials": trials}, indent=1))
    cols = [(s.name, m) for s in sets for m in mults]
    lines = [
        f"Passkey, {Path(path).name}, budget {args.budget}: correct / trials per set and prompt length.",
        "",
        f"Command: `{command}`",
        "",
        "| variant | " + " | ".join(f"{n} {m:g}x" for n, m in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for v in dict.fromkeys(r["variant"] for r in rows):
        cell = {(r["set"], r["mult"]): f"{r['correct']}/{r['n']}" for r in rows if r["variant"] == v}
        lines.append(f"| {v} | " + " | ".join(cell.get(c, "") for c in cols) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
