"""What restoring an evicted run costs, with its K re-rotated as it is written (native/pme_kvrotate.c) against
llama.cpp's K shift (the run restored at its saved positions and moved with llama_memory_seq_add, which re-rotates
the K of every cell of the cache at the next decode).

usage: python benchmarks/restore_cost.py [--model smollm2-135m] [--budget 512] [--run 12] [--next 30]
                                         [--repeats 9] [--out benchmarks/results/restore-cost-smollm2]
A 3K-token text fills the cache down to the budget with every evicted token's K/V saved (recall_kv_bytes). Each
timing restores one evicted run of --run tokens at the next positions and decodes the --next tokens after it
(scored, as a chat turn's first ubatch is), then truncates both away, so every timing starts from the same cache.
The two ways are interleaved; medians of --repeats. The difference is the shift, which lands in the ubatch after
the restore: the turn's own prefill in a chat. Writes results.json, results.md and a plot when --out is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
from recall_bench import filler  # noqa: E402
from ubatch_cost import timed_ubatch  # noqa: E402

from pymorph_edge import EngineConfig, Llama  # noqa: E402
from pymorph_edge.engine import recall_decoding  # noqa: E402
from pymorph_edge.model.default_model import resolve_model  # noqa: E402

WAYS = {"rotated": True, "shifted": False}  # recall_decoding.ROTATE_ON_RESTORE


def evicted_run(llm: Llama, n: int) -> list[int]:
    """The first n consecutive evicted sequence indices whose saved rows lie at consecutive positions."""
    e = llm.engine
    live = {p for p in e.scorer.cell_lpos() if p >= 0}
    for lo in range(0, e.n_past - n):
        if all(i not in live for i in range(lo, lo + n)) and e.restorable([(lo, lo + n)]):
            return list(range(lo, lo + n))
    raise SystemExit(f"no {n} consecutive evicted tokens with saved rows")


def timed(llm: Llama, run: list[int], nxt: list[int], rotate: bool) -> tuple[float, float]:
    """(restore seconds, next ubatch seconds); the cache is left as it was."""
    e = llm.engine
    recall_decoding.ROTATE_ON_RESTORE = rotate
    p0 = e.next_pos
    t0 = time.perf_counter()
    if not e.restore_run(run, e.log.tokens(run[0], run[-1] + 1), p0):
        raise RuntimeError("the run could not be restored")
    t_restore = time.perf_counter() - t0
    e.next_pos += len(run)
    t_next = timed_ubatch(llm, nxt, True)
    e.scorer.truncate(e.mem, 0, p0)
    e.next_pos = p0
    return t_restore, t_next


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--run", type=int, default=12)
    ap.add_argument("--next", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cfg = EngineConfig(recall_kv_bytes=256 << 20)
    llm = Llama(resolve_model(args.model), kv_budget=args.budget, config=cfg, recall=False)
    text = " ".join(filler("held-out", 300, 7))
    llm.engine.decode(llm.tokenize(text.encode())[:3000])
    if not llm.engine.scorer.kvstore_rotates():
        raise SystemExit(f"{args.model}: restored K rows are not re-rotated here (an iSWA model, or a quantized K)")
    run = evicted_run(llm, args.run)
    nxt = llm.tokenize(" ".join(filler("tuning", 20, 3)).encode(), add_bos=False)[: args.next]
    cells = llm.stats.cells_in_use
    each: dict[str, list[tuple[float, float]]] = {w: [] for w in WAYS}
    timed(llm, run, nxt, True)  # warm-up
    for _ in range(args.repeats):
        for way, rotate in WAYS.items():  # interleaved, so drift hits both
            each[way].append(timed(llm, run, nxt, rotate))
    llm.close()
    rows = []
    for way in WAYS:
        r = statistics.median(t[0] for t in each[way])
        n = statistics.median(t[1] for t in each[way])
        s = statistics.median(t[0] + t[1] for t in each[way])
        rows.append({"way": way, "restore_s": r, "next_s": n, "sum_s": s, "each": each[way]})
        print(
            f"{way:8s}: restore {r * 1000:6.1f} ms, next {args.next} tokens {n * 1000:6.1f} ms, both {s * 1000:6.1f} ms"
        )
    print(f"shifted / rotated, both: {rows[1]['sum_s'] / rows[0]['sum_s']:.2f}x")
    if args.out is not None:
        write(args, rows, cells, run)


def write(args: argparse.Namespace, rows: list[dict], cells: int, run: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/restore_cost.py " + " ".join(sys.argv[1:])
    doc = {"command": command, "cells": cells, "run": run, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"# Restoring {args.run} evicted tokens, then {args.next} more: {args.model}, budget {args.budget}"
        f" ({cells} cells in use)",
        "",
        f"`{command}`",
        "",
        "| K of the restored run | restore (ms) | next ubatch (ms) | both (ms) |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['way']} | {r['restore_s'] * 1000:.1f} | {r['next_s'] * 1000:.1f} | {r['sum_s'] * 1000:.1f} |"
        )
    lines += [
        "",
        f"Medians of {args.repeats} timings each, the two ways interleaved, from the same cache (sequence indices"
        f" {run[0]}-{run[-1]}). 'rotated': re-rotated as written (native/pme_kvrotate.c); 'shifted': restored at the"
        " saved positions and moved, so llama.cpp re-rotates every cell's K in the next ubatch.",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3))
    names = [r["way"] for r in rows]
    ax.bar(names, [r["restore_s"] * 1000 for r in rows], label="restore")
    ax.bar(names, [r["next_s"] * 1000 for r in rows], bottom=[r["restore_s"] * 1000 for r in rows], label="next ubatch")
    ax.set_ylabel("ms (medians)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "restore_cost.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
