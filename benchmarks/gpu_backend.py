"""MorphKV on a GPU through ggml's backend API: agreement with the host paths, what scoring copies, and speed.

usage: python benchmarks/gpu_backend.py [--models smollm2-135m,gemma3-270m] [--big PATH] [--parts agreement,speed] --out DIR
       python benchmarks/gpu_backend.py --render --out DIR   (results.md and the plot again, from results.json)

Run where llama-cpp-python was built with a GPU backend (CMAKE_ARGS="-DGGML_CUDA=on" tools/llama-cpp-wheel); every
layer is offloaded (n_gpu_layers=-1). Two parts, each written to results.json as it finishes:

1. Agreement. The same 24-token greedy run (MorphKV and TOVA; flash attention off with an f16 cache, on with f16
   and q8_0) three ways: scores reduced on the GPU (native/pme_devscore.c, what a user gets), the GPU's attention
   copied to the host and reduced there (the path before scores moved to the backend), and the CPU backend with
   the same ggml reduction. A GPU's kernels round differently from the CPU's, so the greedy tokens and keep-set
   are compared, not assumed: the table gives how many tokens agree before the first difference and the overlap
   of the kept positions (Jaccard).
2. Speed. Prefill and decode with the full cache and with MorphKV at a budget, flash attention on and off, a
   1.2K- and a 4K-token prompt then 128 greedy tokens; MorphKV as a user gets it (off the host: a quarter of the
   layers a decode step, in turn), reading every layer, and reading 4 (EngineConfig(score_layers)), since every
   layer read splits the graph and makes the GPU wait. With --big, a random-weight
   Llama of Llama-3.2-1B's shape (16 layers, 2048 wide, 32 heads, 8 KV heads; f32 weights, byte tokenizer) too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from pymorph_edge import Llama
from pymorph_edge.engine.engine_config import EngineConfig
from pymorph_edge.model.default_model import resolve_model

TEXT = "The lighthouse keeper wrote in his log every night about the ships, the weather and the sea. "
# agreement runs: (budget, prompt repeats) as tests/test_rpc.py uses them; Gemma 3's window needs a budget past 512
AGREE_SIZES = {"smollm2-135m": (256, 30), "gemma3-270m": (640, 75)}
SPEED_BUDGET = {"smollm2-135m": 512, "gemma3-270m": 1024, "big": 1024}
CASES = [(p, fa, kv) for p in ("morphkv", "tova") for fa, kv in ((False, "f16"), (True, "f16"), (True, "q8_0"))]


def agree_run(path: str, where: str, policy: str, fa: bool, kv: str, size: tuple[int, int]) -> dict:
    """where: "gpu" (scores on the GPU), "gpu-copy" (attention copied to the host) or "cpu"."""
    kw = {"n_gpu_layers": -1} if where != "cpu" else {"use_extra_bufts": False}
    # every layer on both sides: off the host the default reads a quarter of them a step (engine_config.py)
    cfg = EngineConfig(n_ubatch=128, flash_attn=fa, type_k=kv, type_v=kv, score_layers="all")
    budget, repeats = size
    with Llama(path, kv_budget=budget, policy=policy, config=cfg, **kw) as llm:
        mode = {"gpu": "auto", "gpu-copy": "never", "cpu": "always" if fa else "auto"}[where]
        llm.engine.scorer.backend_scores(mode)
        prompt = llm.tokenize((TEXT * repeats).encode())
        tokens = list(itertools.islice(llm.generate(prompt, temp=0.0), 24))
        cells = llm.engine.scorer.cell_positions()
        s = llm.stats
        return {
            "tokens": tokens,
            "kept": sorted(p for p in cells if p >= 0),
            "evicted": s.tokens_evicted,
            "d2h_step": s.d2h_bytes_per_decode_step,
            "d2h_chunk": s.d2h_bytes_per_prompt_chunk,
            "syncs_step": s.syncs_per_decode_step,
            "n_ctx": s.n_ctx,
        }


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / max(1, len(sa | sb))


def agreement(models: dict[str, str]) -> list[dict]:
    rows = []
    for name, path in models.items():
        if name not in AGREE_SIZES:
            continue
        for policy, fa, kv in CASES:
            runs, errors = {}, {}
            for w in ("gpu", "gpu-copy", "cpu"):
                try:
                    runs[w] = agree_run(path, w, policy, fa, kv, AGREE_SIZES[name])
                except RuntimeError as e:  # reported in the table, not hidden: the other runs still go ahead
                    errors[w] = str(e)
                    print(f"{name} {policy} fa={fa} {kv} {w}: {e}", flush=True)
            if "gpu" not in runs or "gpu-copy" not in runs:
                rows.append({"model": name, "policy": policy, "flash_attn": fa, "kv": kv, "errors": errors})
                continue
            g, c = runs["gpu"], runs["gpu-copy"]
            h = runs.get("cpu", {"tokens": [], "kept": []})
            row = {
                "model": name,
                "policy": policy,
                "flash_attn": fa,
                "kv": kv,
                "evicted": g["evicted"],
                "n_ctx": g["n_ctx"],
                "gpu_vs_copy_tokens": common_prefix(g["tokens"], c["tokens"]),
                "gpu_vs_copy_kept": jaccard(g["kept"], c["kept"]),
                "gpu_vs_cpu_tokens": common_prefix(g["tokens"], h["tokens"]),
                "gpu_vs_cpu_kept": jaccard(g["kept"], h["kept"]),
                "n_tokens": len(g["tokens"]),
                "gpu_d2h_step": g["d2h_step"],
                "copy_d2h_step": c["d2h_step"],
                "gpu_d2h_chunk": g["d2h_chunk"],
                "copy_d2h_chunk": c["d2h_chunk"],
                "gpu_syncs_step": g["syncs_step"],
                "errors": errors,
            }
            rows.append(row)
            print(
                f"{name} {policy} fa={'on' if fa else 'off'} {kv}: tokens agree {row['gpu_vs_copy_tokens']}/24 "
                f"(copy path), {row['gpu_vs_cpu_tokens']}/24 (CPU); kept overlap {row['gpu_vs_copy_kept']:.3f}, "
                f"{row['gpu_vs_cpu_kept']:.3f}; {g['d2h_step'] / 1e3:.1f} KB/step vs {c['d2h_step'] / 1e3:.1f} KB",
                flush=True,
            )
    return rows


def speed_run(path: str, budget: int | None, fa: bool, prompt_tokens: int, layers: int | str | None = None) -> dict:
    cfg = EngineConfig(
        flash_attn=fa, n_ctx=prompt_tokens + 256 if budget is None else None, score_layers=layers if budget else None
    )
    with Llama(path, kv_budget=budget, n_gpu_layers=-1, config=cfg) as llm:
        prompt = (llm.tokenize((TEXT * (prompt_tokens // 10 + 10)).encode()))[:prompt_tokens]
        t0 = time.perf_counter()
        t_first, n = 0.0, 0
        for _ in llm.generate(prompt, temp=0.0, logit_bias={llm.token_eos(): -1e9}):
            n += 1
            if n == 1:
                t_first = time.perf_counter()
            if n >= 128:
                break
        t_end = time.perf_counter()
        s = llm.stats
        return {
            "prefill_s": t_first - t0,
            "prefill_tok_s": len(prompt) / (t_first - t0),
            "decode_tok_s": (n - 1) / (t_end - t_first),
            "tokens": n,
            "evicted": s.tokens_evicted,
            "peak_cells": s.peak_cells,
            "n_ctx": s.n_ctx,
            "d2h_step": s.d2h_bytes_per_decode_step,
            "d2h_chunk": s.d2h_bytes_per_prompt_chunk,
            "syncs_step": s.syncs_per_decode_step,
            "syncs_chunk": s.syncs_per_prompt_chunk,
        }


def speed(models: dict[str, str]) -> list[dict]:
    rows = []
    for name, path in models.items():
        speed_run(path, None, True, 256)  # warm-up: the first context on a device pays its set-up
        budget = SPEED_BUDGET.get(name, 1024)
        for prompt_tokens, fa in itertools.product((1200, 4096), (True, False)):
            # "morphkv": the default, which off the host reads a quarter of the layers a decode step in turn
            configs = (
                ("full", None, None),
                ("morphkv", budget, None),
                ("morphkv-every-layer", budget, "all"),
                ("morphkv-4-layers", budget, 4),
            )
            for label, b, layers in configs:
                r = speed_run(path, b, fa, prompt_tokens, layers)
                row = {"model": name, "prompt": prompt_tokens, "flash_attn": fa, "config": label, "budget": b, **r}
                rows.append(row)
                print(
                    f"{name} prompt {prompt_tokens} fa={'on' if fa else 'off'} {label}: prefill "
                    f"{r['prefill_tok_s']:.0f} tok/s, decode {r['decode_tok_s']:.1f} tok/s, "
                    f"{r['d2h_step'] / 1e3:.1f} KB/step, {r['syncs_step']:.0f} syncs/step",
                    flush=True,
                )
    return rows


def write_big(path: Path) -> Path:
    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    if not path.exists():
        write_synthetic_llama(
            path, n_head=32, n_head_kv=8, n_layer=16, n_embd=2048, n_ff=8192, n_ctx_train=131072, seed=1
        )
    return path


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [f"# MorphKV on a GPU: {result.get('device', '?')}", "", f"`{result['command']}`", ""]
    if result.get("agreement"):
        lines += [
            "## Agreement (24 greedy tokens)",
            "",
            "| model | policy | flash attention | KV | evicted | tokens agree: GPU vs copy path | kept overlap | "
            "tokens agree: GPU vs CPU | kept overlap | device->host per step: GPU scores | copy path | per chunk: GPU "
            "scores | copy path | syncs per step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in result["agreement"]:
            if "evicted" not in r:  # the GPU runs failed: the error is the row
                lines.append(
                    f"| {r['model']} | {r['policy']} | {'on' if r['flash_attn'] else 'off'} | {r['kv']} | "
                    f"failed: {r['errors']} |"
                )
                continue
            cpu = (
                f"{r['gpu_vs_cpu_tokens']}/{r['n_tokens']} | {r['gpu_vs_cpu_kept']:.3f}"
                if "cpu" not in r["errors"]
                else f"CPU run failed: {r['errors']['cpu']} | -"
            )
            lines.append(
                f"| {r['model']} | {r['policy']} | {'on' if r['flash_attn'] else 'off'} | {r['kv']} | {r['evicted']} | "
                f"{r['gpu_vs_copy_tokens']}/{r['n_tokens']} | {r['gpu_vs_copy_kept']:.3f} | "
                f"{cpu} | "
                f"{r['gpu_d2h_step'] / 1e3:.1f} KB | {r['copy_d2h_step'] / 1e3:.1f} KB | "
                f"{r['gpu_d2h_chunk'] / 1e6:.3f} MB | {r['copy_d2h_chunk'] / 1e6:.2f} MB | {r['gpu_syncs_step']:.0f} |"
            )
        lines.append("")
    if result.get("speed"):
        lines += [
            "## Speed (128 greedy tokens after the prompt; every layer on the GPU)",
            "",
            "| model | prompt | flash attention | config | prefill tok/s | decode tok/s | decode vs full | peak cells | "
            "device->host per step | syncs per step; per chunk |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        full = {(r["model"], r["prompt"], r["flash_attn"]): r for r in result["speed"] if r["config"] == "full"}
        for r in result["speed"]:
            f = full.get((r["model"], r["prompt"], r["flash_attn"]))
            ratio = f"{r['decode_tok_s'] / f['decode_tok_s']:.2f}x" if f else "-"
            lines.append(
                f"| {r['model']} | {r['prompt']} | {'on' if r['flash_attn'] else 'off'} | {r['config']}"
                f"{'' if r['budget'] is None else ' ' + str(r['budget'])} | {r['prefill_tok_s']:.0f} | "
                f"{r['decode_tok_s']:.1f} | {ratio} | {r['peak_cells']} | {r['d2h_step'] / 1e3:.1f} KB | "
                f"{r['syncs_step']:.0f}; {r['syncs_chunk']:.0f} |"
            )
    lines += ["", *result.get("notes", [])]  # what the run's circumstances were, added by hand to results.json
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out, result)


def plot(out: Path, result: dict) -> None:
    """Decode speed against the full cache (speed), or what scoring copies per step (agreement)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result.get("speed"):
        rows = [r for r in result["speed"] if r["config"] != "full"]
        full = {(r["model"], r["prompt"], r["flash_attn"]): r for r in result["speed"] if r["config"] == "full"}
        fig, ax = plt.subplots(figsize=(9, 3.6))
        ratios = [r["decode_tok_s"] / full[(r["model"], r["prompt"], r["flash_attn"])]["decode_tok_s"] for r in rows]
        hue = {"morphkv": "tab:blue", "morphkv-every-layer": "tab:green"}
        colors = [hue.get(r["config"], "tab:orange") for r in rows]
        ax.bar(range(len(rows)), ratios, color=colors)
        labels = [f"{r['model'][:7]}\n{r['prompt']}\nfa {'on' if r['flash_attn'] else 'off'}" for r in rows]
        ax.set_xticks(range(len(rows)), labels, fontsize=6)
        ax.axhline(1.0, color="gray", linestyle="--")
        ax.set_ylabel("decode tok/s vs full cache")
        ax.set_title(f"{result.get('device', '')}: MorphKV (blue), every layer (green), 4 layers (orange)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "gpu_speed.png", dpi=110)
        plt.close(fig)
    elif result.get("agreement"):
        rows = [r for r in result["agreement"] if "evicted" in r]
        fig, ax = plt.subplots(figsize=(8, 3.4))
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["copy_d2h_step"] / 1e3 for r in rows], 0.4, label="attention copied")
        ax.bar([i + 0.2 for i in x], [r["gpu_d2h_step"] / 1e3 for r in rows], 0.4, label="scores on the GPU")
        labels = [f"{r['model'][:7]}\n{r['policy']}\nfa {'on' if r['flash_attn'] else 'off'} {r['kv']}" for r in rows]
        ax.set_xticks(list(x), labels, fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("device->host KB per decode step")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "gpu_copies.png", dpi=110)
        plt.close(fig)


def gpu_name() -> str:
    """The first GPU ggml registered (GGML_BACKEND_DEVICE_TYPE_GPU), or "none"."""
    import ctypes

    from pymorph_edge.model.rpc_backend import GGML_BACKEND_DEVICE_TYPE_GPU, _ggml

    ggml = _ggml()
    ggml.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_description.restype = ctypes.c_char_p
    dev = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU)
    return ggml.ggml_backend_dev_description(dev).decode() if dev else "none"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m", help="packaged names, GGUF paths or NAME=PATH")
    ap.add_argument("--big", type=Path, default=None, help="also a random-weight 1B-shaped Llama, written here")
    ap.add_argument("--parts", default="agreement,speed")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--render", action="store_true", help="only rewrite --out's results.md and plot from its JSON")
    args = ap.parse_args()
    if args.render:
        write(args.out, json.loads((args.out / "results.json").read_text()))
        return
    # NAME or NAME=PATH (a packaged model's file copied elsewhere keeps its name, and so its sizes)
    models = {m.split("=")[0]: str(resolve_model(m.split("=")[-1])) for m in args.models.split(",") if m}
    result = {"command": "python benchmarks/gpu_backend.py " + " ".join(sys.argv[1:]), "device": gpu_name()}
    if "agreement" in args.parts:
        result["agreement"] = agreement(models)
        write(args.out, result)
    if "speed" in args.parts:
        result["speed"] = speed(models)
        write(args.out, result)
    if args.big is not None:
        t0 = time.perf_counter()
        big = str(write_big(args.big))
        print(f"wrote {big} in {time.perf_counter() - t0:.0f} s", flush=True)
        result["speed"] = result.get("speed", []) + speed({"big": big})
        write(args.out, result)


if __name__ == "__main__":
    main()
