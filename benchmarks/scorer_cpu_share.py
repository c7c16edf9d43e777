"""The scorer's share of the CPU, sampled with perf: robust where wall-clock ratios are not.

usage: python benchmarks/scorer_cpu_share.py [--baseline-site DIR] [--steps 600] [--rounds 2]
                                             [--out benchmarks/results/NAME]

On a shared 2-core machine, two runs of the same decode differ by 10-20% in tok/s, more than most changes to the
scorer. perf's samples do not care how fast the machine ran: this counts, per case, the samples in pymorph_edge's
native library (libpme.so), in the OpenMP runtime (libgomp: threads waiting while another thread works alone), and in
all, each divided by the samples in the model's own weight products (ggml_vec_dot_q4_1_q8_1 for SmolLM2 Q4_1), which
are the same work in every run. "all / weights" is then proportional to the time a step takes.

Cases (SmolLM2, MorphKV at budget 1024, 2 threads, recall at its default): decode with flash attention on (f16 and
q8_0 caches; perf samples only the decode steps, after a 1024-token prompt) and a 1536-token prompt in 512-token
chunks (flash attention on with q8_0, off with f16). References: the unbounded cache decoding at the same mean
length, and prefill_vs_raw.py's raw llama.cpp loop over the same prompt; their "all" over the bounded run's is the
bounded run's speed ratio. With --baseline-site, each round also runs another build of pymorph_edge, installed
with `pip install --no-deps --no-build-isolation --target DIR <checkout>`, right after this one. The committed
results' baseline is the build before the flash-attention rows were made leaner: `git worktree add /tmp/abold
5636883 && pip install --no-deps --no-build-isolation --target /tmp/abold-site /tmp/abold`. Needs Linux perf.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import os, sys, time
site = os.environ.get("PME_SITE")
if site:  # another build: the editable install's finder must not answer first
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, site)
from pymorph_edge import Llama
from pymorph_edge.engine.engine_config import EngineConfig
from pymorph_edge.model.default_model import resolve_model
mode, kv, fa, steps = sys.argv[1], sys.argv[2], sys.argv[3] == "on", int(sys.argv[4])
budget, prompt = (None if sys.argv[5] == "none" else int(sys.argv[5])), int(sys.argv[6])


def enable():  # perf samples from here on
    with open(os.environ["PERF_CTL"], "w") as f:
        f.write("enable\n")
    with open(os.environ["PERF_ACK"]) as f:
        f.read(5)


text = "The lighthouse keeper wrote in his log every night about the ships, the weather and the sea. "
cfg = EngineConfig(n_ubatch=512, flash_attn=fa, type_k=kv, type_v=kv)
if mode == "raw":  # a plain llama_decode loop over the same prompt (prefill_vs_raw.py's), no pymorph_edge engine
    sys.path.insert(0, "benchmarks")
    import prefill_vs_raw
    path = str(resolve_model("smollm2-135m"))
    with Llama(path, kv_budget=None, n_ctx=256) as llm:
        tokens = llm.tokenize((text * 200).encode())[:prompt]
    enable()
    prefill_vs_raw.raw(path, tokens, fa, kv, 2)
    sys.exit(0)
with Llama(str(resolve_model("smollm2-135m")), kv_budget=budget, n_ctx=2048, config=cfg, n_threads=2) as llm:
    tokens = llm.tokenize((text * 200).encode())[:1536]
    if mode == "prefill":
        enable()
        llm.engine.decode(tokens)
    else:
        llm.engine.decode(tokens[:prompt])
        enable()
        for i in range(steps):
            llm.engine.decode([tokens[prompt + i % 500]])
"""

# (label, mode, KV type, flash attention, budget, prompt tokens). The unbounded cache decodes after a shorter prompt,
# so that over --steps (default 600) it holds 1024 tokens on average, as the bounded cache does throughout.
CASES = [
    ("decode, flash attention on, f16", "decode", "f16", "on", "1024", 1024),
    ("decode, flash attention on, q8_0", "decode", "q8_0", "on", "1024", 1024),
    ("prompt, flash attention on, q8_0", "prefill", "q8_0", "on", "1024", 1536),
    ("prompt, flash attention off, f16", "prefill", "f16", "off", "1024", 1536),
    ("decode, f16, unbounded", "decode", "f16", "on", "none", 724),
    ("decode, q8_0, unbounded", "decode", "q8_0", "on", "none", 724),
    ("prompt, q8_0, raw llama.cpp loop", "raw", "q8_0", "on", "none", 1536),
    ("prompt, f16, raw llama.cpp loop", "raw", "f16", "off", "none", 1536),
]
WEIGHTS = "ggml_vec_dot_q4_1_q8_1"


def sample(case: tuple, steps: int, site: str | None, tmp: Path) -> dict:
    """perf samples of one child run: libpme, libgomp and all, each over the weight products' samples."""
    _, mode, kv, fa, budget, prompt = case
    env = dict(os.environ)
    env.pop("PME_SITE", None)
    if site:
        env["PME_SITE"] = site
    data, ctl, ack = tmp / "perf.data", tmp / "ctl", tmp / "ack"
    cmd = ["perf", "record", "-q", "-F", "1999", "-o", str(data)]
    # only the measured work: the child enables sampling after loading (and, to decode, after its prompt)
    for fifo in (ctl, ack):
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
    cmd += ["-D", "-1", f"--control=fifo:{ctl},{ack}"]
    env.update(PERF_CTL=str(ctl), PERF_ACK=str(ack))
    cmd += [sys.executable, "-c", CHILD, mode, kv, fa, str(steps), budget, str(prompt)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rep = subprocess.run(
        ["perf", "report", "-i", str(data), "-n", "--no-children", "--sort", "dso,symbol", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    by_dso: dict[str, int] = {}
    weights = 0
    for line in rep.splitlines():
        f = line.split()
        if line.startswith("#") or len(f) < 4 or not f[0].endswith("%"):
            continue
        by_dso[f[2]] = by_dso.get(f[2], 0) + int(f[1])
        weights += int(f[1]) if WEIGHTS in line else 0
    if weights == 0:
        raise RuntimeError(f"no samples in {WEIGHTS}: is the model SmolLM2 Q4_1 and perf allowed to sample?")
    return {
        "pme": by_dso.get("libpme.so", 0) / weights,
        "gomp": sum(v for k, v in by_dso.items() if k.startswith("libgomp")) / weights,
        "all": sum(by_dso.values()) / weights,
        "weight_samples": weights,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-site", default=None, help="a `pip install --target` of another pymorph_edge build")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if shutil.which("perf") is None:
        sys.exit("scorer_cpu_share.py needs Linux perf (`perf record`), which is not on PATH")
    if args.baseline_site and not (Path(args.baseline_site) / "pymorph_edge").is_dir():
        sys.exit(f"--baseline-site {args.baseline_site!r} holds no pymorph_edge package")
    builds = [("this build", None)] + ([("baseline", args.baseline_site)] if args.baseline_site else [])
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for case in CASES:
                for name, site in builds:
                    if case[4] == "none" and site:
                        continue  # the unbounded cache never calls the scorer
                    s = sample(case, args.steps, site, Path(d))
                    rows.append({"round": r + 1, "case": case[0], "build": name, **s})
                    print(
                        f"round {r + 1} {case[0]:34s} {name:10s} scorer {s['pme']:.3f} "
                        f"OpenMP {s['gomp']:.3f} all {s['all']:.3f} (per weight-product sample)",
                        flush=True,
                    )
    summary = summarise(rows, builds)
    for line in table(summary, builds):
        print(line)
    if args.out is not None:
        write(args, rows, summary, builds)


def summarise(rows: list[dict], builds: list) -> list[dict]:
    out = []
    for case in CASES:
        entry: dict = {"case": case[0]}
        for name, _ in builds:
            mine = [x for x in rows if x["case"] == case[0] and x["build"] == name]
            for key in ("pme", "gomp", "all"):
                entry[f"{name}:{key}"] = statistics.median(x[key] for x in mine) if mine else float("nan")
        out.append(entry)
    return out


def table(summary: list[dict], builds: list) -> list[str]:
    cols = [f"{n}: {k}" for n, _ in builds for k in ("scorer", "OpenMP", "all")]
    lines = ["| case | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for e in summary:
        vals = [f"{e[f'{n}:{k}']:.3f}" for n, _ in builds for k in ("pme", "gomp", "all")]
        lines.append(f"| {e['case']} | " + " | ".join(vals) + " |")
    # all / weights is proportional to a step's time, so unbounded over bounded is the bounded decode's speed ratio
    by = {e["case"]: e for e in summary}
    lines.append("")
    for kv in ("f16", "q8_0"):
        full, mine = by[f"decode, {kv}, unbounded"], by[f"decode, flash attention on, {kv}"]
        ratios = [f"{n} {full['this build:all'] / mine[f'{n}:all']:.2f}x" for n, _ in builds]
        lines.append(f"Bounded decode speed / unbounded at 1024 cached tokens, {kv}: " + ", ".join(ratios))
    for kv, fa in (("q8_0", "on"), ("f16", "off")):
        raw, mine = by[f"prompt, {kv}, raw llama.cpp loop"], by[f"prompt, flash attention {fa}, {kv}"]
        ratios = [f"{n} {raw['this build:all'] / mine[f'{n}:all']:.2f}x" for n, _ in builds]
        lines.append(f"Prompt processing / a raw llama.cpp loop, flash attention {fa}, {kv}: " + ", ".join(ratios))
    return lines


def write(args: argparse.Namespace, rows: list[dict], summary: list[dict], builds: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/scorer_cpu_share.py " + " ".join(sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps({"command": command, "rows": rows, "median": summary}, indent=1))
    lines = [
        "# The scorer's share of the CPU (perf samples per sample of the model's weight products)",
        "",
        f"`{command}`",
        "",
        "SmolLM2, MorphKV at budget 1024, 2 threads; medians over rounds. scorer: libpme.so; OpenMP: libgomp "
        "(threads waiting); all: every sample, which is proportional to a step's time.",
        "",
        *table(summary, builds),
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(builds)
    for i, (name, _) in enumerate(builds):
        xs = [k + i * width for k in range(len(summary))]
        ax.bar(xs, [e[f"{name}:pme"] for e in summary], width, label=f"{name}: scorer")
        ax.bar(
            xs,
            [e[f"{name}:gomp"] for e in summary],
            width,
            bottom=[e[f"{name}:pme"] for e in summary],
            alpha=0.5,
            label=f"{name}: OpenMP waiting",
        )
    ax.set_xticks([k + width * (len(builds) - 1) / 2 for k in range(len(summary))])
    ax.set_xticklabels([e["case"].replace(", ", "\n", 1) for e in summary], fontsize=7)
    ax.set_ylabel("samples per weight-product sample")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "scorer_cpu_share.png", dpi=120)


if __name__ == "__main__":
    main()
