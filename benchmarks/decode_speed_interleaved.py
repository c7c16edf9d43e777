"""Decode speed of several policies, interleaved over rounds so machine noise hits them alike.

usage: python benchmarks/decode_speed_interleaved.py [--rounds 3] [--tokens 256] [--budget 1024] [--model NAME]
           [--flash-attn] [--kv-type f16|q8_0|q4_0] [--out DIR] POLICY [POLICY ...]
POLICY is a policy name, "full", or NAME@LAYERS for EngineConfig(score_layers=LAYERS) ("morphkv@all"), NAME@rK for
K layers a decode step in turn (rotate_layers), NAME@cK for that and K chosen layers for long prompt chunks.
Each round, for each policy: prefill a budget-sized prompt, then time `tokens` decode steps ("full": the
unbounded cache, which then decodes at about the same cached-token count). Prints one line per measurement and
the median tok/s per policy, and its ratio to the first policy; with --out, writes results.json, results.md and a
plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from pymorph_edge import Llama
from pymorph_edge.engine.engine_config import EngineConfig
from pymorph_edge.model.default_model import default_model_path, resolve_model


def measure(model: str, policy: str, budget: int, tokens: int, flash_attn: bool | None, kv_type: str | None) -> float:
    # "morphkv@all" / "morphkv@4": the policy with EngineConfig(score_layers=...) set
    name, _, layers = policy.partition("@")
    kw = {"kv_budget": None, "n_ctx": budget + tokens + 64} if name == "full" else {"kv_budget": budget, "policy": name}
    if layers:  # "@r8": 8 layers a decode step, in turn (EngineConfig.rotate_layers); "@c8": long chunks read 8 too
        rotate, layers = {"r": True, "c": "chunks"}.get(layers[:1], False), layers.lstrip("rc")
        kw["config"] = EngineConfig(score_layers=layers if layers == "all" else int(layers), rotate_layers=rotate)
    with Llama(model, flash_attn=flash_attn, type_k=kv_type, type_v=kv_type, **kw) as llm:
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
    ap.add_argument("--model", default=None, help="a packaged model name or a GGUF path (default: the default model)")
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--kv-type", default=None, help="K and V cache type (f16, q8_0, q4_0)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    model = str(resolve_model(a.model) if a.model else default_model_path())
    fa = True if a.flash_attn else None
    speeds: dict[str, list[float]] = {p: [] for p in a.policies}
    for r in range(a.rounds):
        for p in a.policies:
            speeds[p].append(measure(model, p, a.budget, a.tokens, fa, a.kv_type))
            print(f"round {r} {p} {speeds[p][-1]:.1f} tok/s", flush=True)
    first = statistics.median(speeds[a.policies[0]])
    lines = []
    for p, v in speeds.items():
        m = statistics.median(v)
        lines.append(f"| {p} | {' / '.join(f'{x:.1f}' for x in v)} | {m:.1f} | {m / first:.2f}x |")
        print(f"median {p}: {m:.1f} tok/s over {len(v)} rounds ({m / first:.2f}x {a.policies[0]})")
    if a.out is not None:
        write(a, model, speeds, lines)


def write(a: argparse.Namespace, model: str, speeds: dict[str, list[float]], lines: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/decode_speed_interleaved.py " + " ".join(sys.argv[1:])
    (a.out / "results.json").write_text(json.dumps({"command": command, "model": model, "speeds": speeds}, indent=1))
    head = [
        f"# Decode speed, interleaved rounds ({Path(model).name}, budget {a.budget}, flash attention "
        f"{'on' if a.flash_attn else 'default'}, KV {a.kv_type or 'f16'})",
        "",
        f"`{command}`",
        "",
        f"{a.tokens} decode steps after a {a.budget}-token prompt, each policy once per round.",
        "",
        f"| policy | tok/s per round | median | / {a.policies[0]} |",
        "| --- | --- | --- | --- |",
    ]
    (a.out / "results.md").write_text("\n".join(head + lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3))
    for p, v in speeds.items():
        ax.plot(range(1, len(v) + 1), v, marker="o", label=p)
    ax.set_xlabel("round")
    ax.set_ylabel("decode tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "decode_speed.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
