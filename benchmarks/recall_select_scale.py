"""What choosing recalled text costs per request as a conversation's evicted log grows, with and without the span index.

usage: python benchmarks/recall_select_scale.py [--lengths 4000,40000,400000,2000000] [--turns 5]
                                                [--out benchmarks/results/recall-select-scale-smollm2]
A log of N tokens of SmolLM2-tokenized prose (the recall sets' filler, repeated) with a MorphKV-shaped cache: the
last 32 tokens and 352 older cells spread over the log are held, the rest evicted. Each turn appends 300 tokens and
moves the cache on, then runs select()'s word path: the evicted runs widened to whole sentences, cut into sentence
spans, and ranked by BM25 against a question. "cut again" cuts every evicted span anew on every turn (the way
before the index); "index" takes the spans from engine/span_index.py's cuts (its first turn cuts them all). The model
is not run: this times the Python that choosing adds to a turn, which is the part that grows with the history.
For scale, llama.cpp's tokenizer speed is printed too: a chat request sends the whole conversation, which the
server tokenizes again (as llama-cpp-python's does), so every turn also pays that per token.
Writes results.json, results.md and a plot with --out.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, "benchmarks")
import llama_cpp  # noqa: E402
from recall_texts import filler  # noqa: E402

from pymorph_edge.engine.evicted_log import EvictedLog  # noqa: E402
from pymorph_edge.engine.recall import MAX_SPAN_TOKENS, evicted_spans  # noqa: E402
from pymorph_edge.engine.recall_select import gaps, query_weights, rank, sentences, whole_sentences  # noqa: E402
from pymorph_edge.engine.span_index import SpanIndex  # noqa: E402
from pymorph_edge.model.default_model import resolve_model  # noqa: E402

QUESTION = "Thanks, that was lovely. What is my locker number again?"
WINDOW, HELD_OLDER, TURN = 32, 352, 300


def held_cells(rng: random.Random, end: int) -> list[int]:
    """A MorphKV-shaped keep set at sequence length `end`: the window, and older cells spread over the log."""
    older = rng.sample(range(end - WINDOW), min(HELD_OLDER, end - WINDOW))
    return sorted(older + list(range(end - WINDOW, end)))


def one_length(tokens: list[int], piece, n: int, turns: int, memory: bool) -> dict:
    rng = random.Random(n)
    stream = (tokens * (n // len(tokens) + 2))[: n + turns * TURN]
    log = EvictedLog(max(8 << 20, 4 * (n + turns * TURN)))  # the default bound, or the whole run when longer
    log.extend(stream[:n])
    engine = SimpleNamespace(log=log, span_index=SpanIndex())
    query = query_weights(QUESTION)
    again, index, ranks, first, n_spans = [], [], [], None, 0
    for turn in range(turns + 1):
        end = n + turn * TURN
        if turn:
            log.extend(stream[end - TURN : end])
        bounds = (log.start, end)
        runs = whole_sentences(gaps(held_cells(rng, end), log.start, end), bounds, log.tokens, piece, 48)
        t0 = time.perf_counter()
        expected = sentences(runs, log.tokens, piece, MAX_SPAN_TOKENS)
        t1 = time.perf_counter()
        got = evicted_spans(engine, runs, piece)
        t2 = time.perf_counter()
        rank(got, query)
        t3 = time.perf_counter()
        assert got == expected, "the index must cut what cutting again cuts"
        n_spans = len(got)
        if turn == 0:
            first = t2 - t1
        else:
            again.append(t1 - t0)
            index.append(t2 - t1)
            ranks.append(t3 - t2)
    row = {
        "tokens": n,
        "spans": n_spans,
        "cut_again_s": statistics.median(again),
        "index_first_s": first,
        "index_s": statistics.median(index),
        "rank_s": statistics.median(ranks),
    }
    if memory:  # the index's own host memory: built again from cold under tracemalloc
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        cold = SimpleNamespace(log=log, span_index=SpanIndex())
        evicted_spans(cold, runs, piece)
        row["index_bytes"] = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4000,40000,400000,2000000")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass (slow at 2M tokens)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    vocab = llama_cpp.Llama(str(resolve_model(args.model)), vocab_only=True, verbose=False)
    text = " ".join(filler("tuning", 3000, 1))
    t0 = time.perf_counter()
    tokens = vocab.tokenize(text.encode(), add_bos=False)
    tokenize_us = 1e6 * (time.perf_counter() - t0) / len(tokens)
    cache: dict[int, str] = {}

    def piece(t: int) -> str:
        s = cache.get(t)
        if s is None:
            s = cache[t] = vocab.detokenize([t]).decode("utf-8", "replace")
        return s

    rows = []
    print(
        "| evicted log (tokens) | spans | cut again, per turn (s) | index, first turn (s) | index, later turns (s) | cut: again / index | BM25 rank (s) | index memory (MB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in (int(x) for x in args.lengths.split(",")):
        r = one_length(tokens, piece, n, args.turns, not args.no_memory)
        rows.append(r)
        mem = f"{r['index_bytes'] / 1e6:.1f}" if "index_bytes" in r else "-"
        print(
            f"| {n:,} | {r['spans']:,} | {r['cut_again_s']:.4f} | {r['index_first_s']:.4f} | {r['index_s']:.4f} | "
            f"{r['cut_again_s'] / r['index_s']:.1f}x | {r['rank_s']:.4f} | {mem} |",
            flush=True,
        )
    print(f"llama.cpp tokenizer: {tokenize_us:.2f} us a token ({len(tokens):,} tokens of the same prose)")
    if args.out:
        write(args, rows, tokenize_us)


def write(args: argparse.Namespace, rows: list[dict], tokenize_us: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/recall_select_scale.py " + " ".join(sys.argv[1:])
    (args.out / "results.json").write_text(
        json.dumps({"command": cmd, "tokenize_us_per_token": tokenize_us, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        f"# Choosing recalled text as the evicted log grows, {args.model}",
        "",
        f"`{cmd}`",
        "",
        "| evicted log (tokens) | spans | cut again, per turn (s) | index, first turn (s) | index, later turns (s) "
        "| cut: again / index | BM25 rank (s) | index memory (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mem = f"{r['index_bytes'] / 1e6:.1f}" if "index_bytes" in r else "-"
        lines.append(
            f"| {r['tokens']:,} | {r['spans']:,} | {r['cut_again_s']:.4f} | {r['index_first_s']:.4f} | "
            f"{r['index_s']:.4f} | {r['cut_again_s'] / r['index_s']:.1f}x | {r['rank_s']:.4f} | {mem} |"
        )
    lines += [
        "",
        f"Medians over {args.turns} turns of {TURN} tokens each. The BM25 rank of the index's spans against a question "
        "is timed on its own; it visits only the spans with a question word. "
        f"llama.cpp's tokenizer took {tokenize_us:.2f} us a token on the same prose: a chat request carries the whole "
        "conversation, and tokenizing it again is a per-token cost every turn pays, with or without recall.",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["tokens"] for r in rows]
    ax.loglog(xs, [r["cut_again_s"] for r in rows], "o-", label="cut again every turn (before)")
    ax.loglog(xs, [r["index_s"] for r in rows], "s-", label="span index, later turns")
    ax.loglog(xs, [r["index_first_s"] for r in rows], "^:", label="span index, first turn")
    ax.loglog(xs, [r["rank_s"] for r in rows], "d-", label="BM25 rank (spans with a question word)")
    ax.loglog(xs, [tokenize_us * 1e-6 * x for x in xs], "--", color="gray", label="tokenizing the history (llama.cpp)")
    ax.set_xlabel("evicted log (tokens)")
    ax.set_ylabel("seconds per turn")
    ax.set_title("Choosing recalled text: cutting the evicted log into sentences, per turn")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "select_scale.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
