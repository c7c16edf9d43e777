"""What recall adds to a chat turn at a 4K-token history (SmolLM2 at budget 512 by default), with recall on and off.

usage: python benchmarks/recall_latency.py [--rounds 1] [--repeats 1] [--story 256] [--answer 32] [--kv-bytes N]
                                           [--fused] [--model smollm2-135m] [--budget 512]
                                           [--out benchmarks/results/recall-latency-smollm2]
Each conversation opens with a user message holding personal details, then two long stories given as assistant
messages and a third one generated (~4K tokens, not timed). Then two timed turns continue it: another story
(`--story` tokens) and a question about the details (`--answer` tokens), asked in the fact's words or in other
words. The end-of-turn token is banned in the timed turns, so that both configs answer as many tokens and the
ratio compares like with like. Recall's cost is what recall_before spends: choosing (BM25, and a 32-token
query probe for the attention), then decoding the recalled block (where the turn's head shares the block's ubatch,
the block's share of it by tokens); it is paid once per turn, so its share falls as the answer grows. --fused
decodes the block inside the new text's first ubatch (recall.FUSED_BLOCK, off by default). --repeats N times each
turn N times from the same saved state and reports the medians: on two shared cores the same turn's time moves by
up to 40% between runs, and the median keeps that noise out of the ratio. With recall on it also times the same turn
from the same state with recall skipped, interleaved: the recall-on and recall-off runs reach the question through
different stories, and their turns ran up to 20% apart in speed with nothing of recall's in them. Writes results.json, results.md and a plot when --out is given.
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

from pymorph_edge import EngineConfig, Llama  # noqa: E402
from pymorph_edge.engine import recall as recall_module  # noqa: E402
from pymorph_edge.generation import recall_placement as placement  # noqa: E402
from pymorph_edge.model.default_model import resolve_model  # noqa: E402

FACT = "Hi, I'm Dana from Porto. My locker number is 48213. Please write me a long story about a lighthouse."
QUESTIONS = {
    "in the fact's words": "What is my locker number?",
    "in other words": "Which five-digit number did I give you in my first message?",
}


def conversation(llm: Llama) -> list[dict]:
    msgs = [{"role": "user", "content": FACT}]
    for k, topic in enumerate(("a clockmaker", "a river barge")):
        msgs.append({"role": "assistant", "content": " ".join(filler("held-out", 108, 11 + k))})
        msgs.append({"role": "user", "content": f"Thanks! Now write another long story, about {topic}."})
    r = llm.create_chat_completion(msgs, max_tokens=300, temperature=0.0, repeat_penalty=1.1)
    msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
    return msgs


def timed_turn(llm: Llama, msgs: list[dict], content: str, n: int, no_end: dict[int, float], repeats: int = 1) -> dict:
    """One turn, timed `repeats` times from the same saved state (save_state/load_state, the key log included);
    seconds and recall_s are the medians, and every repeat must answer the same. With repeats, the first run is from
    the restored state too. llama.cpp's CPU kernels round a multi-token ubatch's rows differently from one token's, and
    differently again for another count of cells: the same 5 tokens after a restore (its cells packed) moved a logit
    by 0.6 on SmolLM2 against the live cache, while decoded one at a time they agreed to the bit. A live run and a
    restored one may therefore answer differently, and two restored ones do not."""
    saved = llm.save_state() if repeats > 1 else None
    engine = llm.engine
    # a load_state forgets the saved rows (--kv-bytes); the mark lets each repeat restore from them again
    mark = engine.scorer.kvstore_mark() if saved is not None and engine.scorer is not None else None
    msgs.append({"role": "user", "content": content})
    recalls = engine.recall_enabled
    runs, without = [], []
    for _ in range(repeats):
        # with recall on and repeats, the same turn from the same state with recall_before skipped, interleaved:
        # the denominator that differs from the turn only by recall (two runs' states differ, and so does their
        # speed: up to 20% a turn on two shared cores)
        for skip in (True, False) if recalls and saved is not None else (False,):
            if saved is not None:
                llm.load_state(saved)
                if mark is not None:
                    engine.scorer.kvstore_rewind(mark)
            engine.recall_enabled = recalls and not skip
            before = llm.stats
            t0 = time.perf_counter()
            r = llm.create_chat_completion(msgs, max_tokens=n, temperature=0.0, logit_bias=no_end)
            (without if skip else runs).append((time.perf_counter() - t0, r, before, llm.stats))
    engine.recall_enabled = recalls
    for kind in (runs, without):
        answers = {run[1]["choices"][0]["message"]["content"] for run in kind}
        if len(answers) > 1:
            raise RuntimeError(f"the {repeats} repeats of a turn answered differently: {sorted(answers)}")
    dt, r, before, after = runs[-1]
    msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
    return {
        "seconds": statistics.median(run[0] for run in runs),
        "same_state_without_s": statistics.median(run[0] for run in without) if without else None,
        "seconds_each": [run[0] for run in runs],
        "recall_s_each": [run[3].recall_s - run[2].recall_s for run in runs],
        "answer_tokens": r["usage"]["completion_tokens"],
        "prompt_tokens_decoded": r["usage"]["prompt_tokens"]
        - (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        "recall_s": statistics.median(run[3].recall_s - run[2].recall_s for run in runs),
        "probe_s": statistics.median(run[3].recall_probe_s - run[2].recall_probe_s for run in runs),
        "block_s": statistics.median(run[3].recall_block_s - run[2].recall_block_s for run in runs),
        "recalled_tokens": after.recalled_tokens - before.recalled_tokens,
        "restored_tokens": after.restored_tokens - before.restored_tokens,
        "history": llm.engine.n_past,
        "answer": r["choices"][0]["message"]["content"],
    }


def end_of_turn_ban(llm: Llama) -> dict[int, float]:
    """EOS and the template's end-of-turn token (ChatML's, Gemma's), whichever the vocabulary has as one token."""
    ends = {llm.token_eos()}
    for text in (b"<|im_end|>", b"<end_of_turn>"):
        toks = llm.tokenize(text, add_bos=False, special=True)
        if len(toks) == 1:
            ends.add(toks[0])
    return {t: -1e9 for t in ends}


def run(
    recall: bool,
    question: str,
    story_len: int,
    answer: int,
    kv_bytes: int | None = None,
    model: str = "smollm2-135m",
    budget: int = 512,
    repeats: int = 1,
) -> dict:
    # --kv-bytes: the bytes of saved KV a chat block is restored from (0: recomputed, the default before stop 50);
    # unset: the engine's default (restored where a restore is cheap: SmolLM2, not Gemma 3)
    cfg = EngineConfig(recall_kv_bytes=kv_bytes)
    llm = Llama(resolve_model(model), kv_budget=budget, recall=recall, config=cfg)
    no_end = end_of_turn_ban(llm)
    msgs = conversation(llm)
    history = llm.engine.n_past
    story = "Thanks! Now write another long story, about a mountain village."
    story_turn = timed_turn(llm, msgs, story, story_len, no_end, repeats)
    question_turn = timed_turn(llm, msgs, question, answer, no_end, repeats)
    s = llm.stats
    llm.close()
    return {
        "history": history,
        "story_turn": story_turn,
        "question_turn": question_turn,
        "recall_key_bytes": s.recall_key_bytes,
        "recall_log_bytes": s.recall_log_bytes,
        "recall_kv_bytes": s.recall_kv_bytes,
        "restored_tokens": s.restored_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--story", type=int, default=256, help="tokens answered in the story turn (default 256)")
    ap.add_argument("--answer", type=int, default=32, help="tokens answered in the question turn (default 32)")
    ap.add_argument(
        "--kv-bytes",
        type=int,
        default=None,
        help="EngineConfig(recall_kv_bytes) with recall on (0: recomputed; default: the engine's)",
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=512, help="kv_budget (Gemma 3 needs at least 544)")
    ap.add_argument("--fused", action="store_true", help="the block inside the new text's first ubatch")
    ap.add_argument("--bare", action="store_true", help="the recalled text with no label (recall_bench's +bare)")
    ap.add_argument(
        "--repeats", type=int, default=1, help="time each turn this many times from a saved state; report medians"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    recall_module.FUSED_BLOCK = args.fused
    if args.bare:
        placement.RECALLED_PREFIX = ""
    rows = []
    for r in range(args.rounds):
        for wording, question in QUESTIONS.items():
            on = run(True, question, args.story, args.answer, args.kv_bytes, args.model, args.budget, args.repeats)
            off = run(False, question, args.story, args.answer, None, args.model, args.budget, args.repeats)
            rows.append({"round": r + 1, "wording": wording, "on": on, "off": off})
            for turn in ("story_turn", "question_turn"):
                a, b = on[turn], off[turn]
                print(
                    f"round {r + 1}, asked {wording}, {turn}: on {a['seconds']:.3f} s (recall {a['recall_s']:.3f} s, "
                    f"{a['recalled_tokens']} tokens), off {b['seconds']:.3f} s, on/off {a['seconds'] / b['seconds']:.3f}"
                    + (
                        ""
                        if a.get("same_state_without_s") is None
                        else f", same state without recall {a['same_state_without_s']:.3f} s, "
                        f"on/without {a['seconds'] / a['same_state_without_s']:.3f}"
                    ),
                    flush=True,
                )
    if args.out is not None:
        write(args, rows)


def parts(turn: dict) -> str:
    """Recall's time split: the query probe, choosing (the rest), and the block's decode."""
    probe, block = turn.get("probe_s", 0.0), turn.get("block_s", 0.0)
    return f"{probe:.3f} / {turn['recall_s'] - probe - block:.3f} / {block:.3f}"


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/recall_latency.py " + " ".join(sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    lines = [
        f"# Recall latency: chat turns at a 4K-token history, {args.model}, budget {args.budget}",
        "",
        f"`{command}`",
        "",
        "| round | question asked | turn | tokens answered | recall on (s) | of which recall (s) | probe / choosing / "
        "block (s) | tokens recalled | recall off (s) | on / off | recall / off | same state, recall skipped (s) | "
        "on / skipped |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    labels, ratios = [], []
    for row in rows:
        for turn, name in (("story_turn", "story"), ("question_turn", "question")):
            on, off = row["on"][turn], row["off"][turn]
            ratio = on["seconds"] / off["seconds"]
            skipped = on.get("same_state_without_s")
            same = "- | - |" if skipped is None else f"{skipped:.3f} | {on['seconds'] / skipped:.3f} |"
            lines.append(
                f"| {row['round']} | {row['wording']} | {name} | {on['answer_tokens']} | {on['seconds']:.3f} | "
                f"{on['recall_s']:.3f} | {parts(on)} | {on['recalled_tokens']} | {off['seconds']:.3f} | {ratio:.3f} | "
                f"{on['recall_s'] / off['seconds']:.3f} | {same}"
            )
            labels.append(f"{name}\n{row['wording']}")
            ratios.append(ratio if skipped is None else on["seconds"] / skipped)
    first = rows[0]["on"]
    lines += [
        "",
        f"History before the timed turns: {first['history']} tokens. Host memory for recall at the end: "
        f"{first['recall_log_bytes']} bytes of token ids, {first['recall_key_bytes']} bytes of keys, "
        f"{first.get('recall_kv_bytes', 0)} bytes of saved K/V rows ({first.get('restored_tokens', 0)} tokens "
        "restored over the run).",
        "",
        "on / off compares two runs of the turn, so it carries the machine's noise (a few % per turn here); "
        "recall / off is the time recall_before itself took against the turn without recall. "
        f"Each time is the median of {args.repeats} timing(s) of the turn from the same saved state. With repeats, "
        "'same state, recall skipped' times the recall-on run's turn from its own saved state with recall_before "
        "skipped, interleaved with the timings with it: on / skipped differs only by recall, and the plot shows it "
        "(on / off otherwise).",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(range(len(ratios)), ratios, color="tab:blue")
    ax.axhline(1.15, color="tab:red", linestyle="--", label="+15%")
    ax.set_xticks(range(len(ratios)), labels, fontsize=7)
    ax.set_ylabel("turn latency, recall on / without")
    ax.set_ylim(0.9, max(1.3, max(ratios) + 0.05))
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "latency.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
