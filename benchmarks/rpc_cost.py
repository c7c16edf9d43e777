"""What bounded scoring costs on a non-host backend: llama.cpp's RPC on loopback against the CPU backend.

usage: python benchmarks/rpc_cost.py [--rounds 1] [--server-threads 2] [--budget 512] [--no-recall] [--score-layers K|all [--rotate-layers]]
                                    [--out benchmarks/results/rpc-cost-smollm2]
SmolLM2, a 1.2K-token prompt (--prompt-tokens) then 120 greedy tokens, the full cache against MorphKV at the budget, flash attention
off and on; every layer on an `rpc-server` child process (loopback), or on the CPU backend. On RPC MorphKV runs
twice: scores reduced on the backend (native/pme_devscore.c, the default) and, as before it existed, the attention
copied to the host ("copy path"). Reports each run's wall time, MorphKV / full on the same backend, and what
scoring copied device->host and how often it made the backend wait (llm.stats), per prompt chunk and per decode
step, also per cell of the cache. Writes results.json, results.md and a plot.
On loopback the server shares the client's cores: its compute threads keep polling while the client scores on
the host, so `--server-threads 1` leaves the client a core, as a separate machine or a GPU would.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from pymorph_edge import Llama
from pymorph_edge.engine.engine_config import EngineConfig
from pymorph_edge.model.default_model import resolve_model

# how a capped policy takes its layers (EngineConfig.rotate_layers)
ROTATION = {False: "", True: " in turn", "chunks": " in turn, chunks the chosen"}
TEXT = "The lighthouse keeper wrote in his log every night about the ships, the weather and the sea. "


def start_rpc_server(threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pymorph_edge.cli", "rpc-server", "--port", str(port), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("rpc-server did not start")


def one(
    path: str,
    rpc: str | None,
    budget: int | None,
    flash_attn: bool,
    recall: bool | None = None,
    scores: str = "auto",
    layers: int | str | None = None,
    rotate: bool = False,
    prompt_tokens: int = 1200,
) -> dict:
    kw = {"n_gpu_layers": -1, "rpc_servers": rpc} if rpc else {}
    cfg = EngineConfig(
        flash_attn=flash_attn,
        n_ctx=max(2048, prompt_tokens + 256) if budget is None else None,
        score_layers=layers if budget else None,
        rotate_layers=bool(rotate and budget),
    )
    if budget is not None:
        kw["recall"] = recall
    with Llama(path, kv_budget=budget, config=cfg, **kw) as llm:
        most = [0]  # the most one prompt ubatch (a chunk or a probe) sent
        if llm.engine.scorer is not None:
            llm.engine.scorer.backend_scores(scores)
            begin, end = llm.engine.scorer.begin, llm.engine.scorer.end
            at = [0]

            def begin_counting(*a: object, **kw: object) -> None:
                at[0] = llm.stats.prompt_d2h_bytes  # the copy path copies during the decode, the backend's at end
                begin(*a, **kw)

            def end_counting() -> None:
                end()
                most[0] = max(most[0], llm.stats.prompt_d2h_bytes - at[0])

            llm.engine.scorer.begin = begin_counting
            llm.engine.scorer.end = end_counting
        prompt = llm.tokenize((TEXT * (prompt_tokens // 20 + 10)).encode())[:prompt_tokens]
        t0 = time.perf_counter()
        n = 0
        for _ in llm.generate(prompt, temp=0.0, logit_bias={llm.token_eos(): -1e9}):
            n += 1
            if n >= 120:
                break
        s = llm.stats
        sc = llm.engine.scorer
        return {
            "seconds": time.perf_counter() - t0,
            # what the policy read: every layer, or a cap (in turn); None off the host is the default's choice
            "layers_read": None
            if sc is None
            else "all"
            if sc.read_cap is None
            else f"{sc.read_cap}{ROTATION[sc.rotates]}",
            "prompt_tokens": len(prompt),
            "tokens": n,
            "tokens_evicted": s.tokens_evicted,
            "n_ctx": s.n_ctx,
            "peak_cells": s.peak_cells,
            "d2h_bytes_per_decode_step": s.d2h_bytes_per_decode_step,
            "d2h_bytes_per_prompt_chunk": s.d2h_bytes_per_prompt_chunk,
            "max_d2h_bytes_prompt_chunk": most[0],
            "syncs_per_decode_step": s.syncs_per_decode_step,
            "syncs_per_prompt_chunk": s.syncs_per_prompt_chunk,
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--server-threads", type=int, default=2, help="the rpc-server's CPU threads (default 2)")
    ap.add_argument(
        "--no-recall", action="store_true", help="MorphKV without recall, so no key log (its keys cross too)"
    )
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument(
        "--score-layers",
        type=lambda v: v if v == "all" else int(v),
        default=None,
        help="EngineConfig(score_layers=...): layers read, or all (default: the engine's own choice)",
    )
    ap.add_argument("--rotate-layers", action="store_true", help="with --score-layers: in turn (rotate_layers)")
    ap.add_argument("--prompt-tokens", type=int, default=1200, help="prompt length (default 1200)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    recall = False if args.no_recall else None
    path = str(resolve_model("smollm2-135m"))
    proc, endpoint = start_rpc_server(args.server_threads)
    rows = []
    try:
        for r in range(args.rounds):
            for backend, rpc in (("cpu", None), ("rpc", endpoint)):
                for fa in (False, True):
                    full = one(path, rpc, None, fa, prompt_tokens=args.prompt_tokens)
                    # on RPC also the copy path, as before scores were reduced on the backend
                    for scores in ("auto", "never") if rpc else ("auto",):
                        bounded = one(
                            path,
                            rpc,
                            args.budget,
                            fa,
                            recall,
                            scores,
                            args.score_layers,
                            args.rotate_layers,
                            args.prompt_tokens,
                        )
                        row = {
                            "round": r + 1,
                            "backend": backend,
                            "scores": "on the backend" if rpc and scores == "auto" else "copy path" if rpc else "host",
                            "flash_attn": fa,
                            "full": full,
                            "morphkv": bounded,
                        }
                        rows.append(row)
                        print(
                            f"{backend} ({row['scores']}) fa={'on' if fa else 'off'}: full {full['seconds']:.2f} s, "
                            f"morphkv {bounded['seconds']:.2f} s ({bounded['seconds'] / full['seconds']:.2f}x), "
                            f"{bounded['d2h_bytes_per_decode_step'] / 1e3:.1f} KB/step, "
                            f"{bounded['d2h_bytes_per_prompt_chunk'] / 1e6:.2f} MB/chunk, "
                            f"{bounded['syncs_per_decode_step']:.1f} syncs/step, layers read: {bounded['layers_read']}",
                            flush=True,
                        )
    finally:
        proc.kill()
        proc.wait()
    if args.out is not None:
        write(args, rows)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/rpc_cost.py " + " ".join(sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    lines = [
        f"# Scoring on a non-host backend: llama.cpp RPC on loopback vs the CPU backend (SmolLM2, budget {args.budget})",
        "",
        f"`{command}`",
        "",
        f"{args.prompt_tokens}-token prompt, then 120 greedy tokens; every layer on the backend named. The rpc-server ran with "
        f"{args.server_threads} thread(s) on this machine's {os.cpu_count()} cores. Recall "
        f"{'off' if args.no_recall else 'on'}. MorphKV's layers read (EngineConfig(score_layers)="
        f"{args.score_layers}{', rotate_layers' if args.rotate_layers else ''}) are in the table.",
        "",
        f"| round | backend | scores | flash attention | full cache (s) | MorphKV {args.budget} (s) | MorphKV / full | "
        "device->host per decode step | per cell | per prompt chunk | per cell | most in one chunk, per cell | "
        "syncs per step; per chunk | layers read |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        f, m = row["full"], row["morphkv"]
        lines.append(
            f"| {row['round']} | {row['backend']} | {row['scores']} | {'on' if row['flash_attn'] else 'off'} | "
            f"{f['seconds']:.2f} | {m['seconds']:.2f} | {m['seconds'] / f['seconds']:.2f}x | "
            f"{m['d2h_bytes_per_decode_step'] / 1e3:.1f} KB | {m['d2h_bytes_per_decode_step'] / m['n_ctx']:.1f} B | "
            f"{m['d2h_bytes_per_prompt_chunk'] / 1e6:.2f} MB | {m['d2h_bytes_per_prompt_chunk'] / m['n_ctx']:.0f} B | "
            f"{m.get('max_d2h_bytes_prompt_chunk', 0) / m['n_ctx']:.0f} B | {m['syncs_per_decode_step']:.1f}; {m['syncs_per_prompt_chunk']:.0f} | {m.get('layers_read', 'all')} |"
        )
    lines += [
        "",
        f"MorphKV evicted {rows[0]['morphkv']['tokens_evicted']} tokens, peak {rows[0]['morphkv']['peak_cells']} cells, "
        f"of {rows[0]['morphkv']['n_ctx']}.",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.4))
    labels = [f"{r['backend']}\n{r['scores']}\nfa {'on' if r['flash_attn'] else 'off'}" for r in rows]
    ax.bar(range(len(rows)), [r["morphkv"]["seconds"] / r["full"]["seconds"] for r in rows])
    ax.axhline(1.15, color="tab:red", linestyle="--", label="1.15x")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel(f"MorphKV {args.budget} / full cache time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "rpc_cost.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
