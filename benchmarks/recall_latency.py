"""What recall adds to a chat turn at a 4K-token history (SmolLM2 at budget 512 by default), with recall on and off.

usage: python benchmarks/recall_latency.py [--rounds 1] [--story 256] [--answer 32] [--kv-bytes N] [--fused]
                                           [--model smollm2-135m] [--budget 512]
                                           [--out benchmarks/results/recall-latency-smollm2]
Each conversation opens with a user message holding personal details, then two long stories given as assistant
messages and a third one generated (~4K tokens, not timed). Then two timed turns continue it: another story
(`--story` tokens) and a question about the details (`--answer` tokens), asked in the fact's words or in other
words. The end-of-turn token is banned in the timed turns, so that both configs answer as many tokens and the
ratio compares like with like. Recall's cost is what recall_before spends: choosing (BM25, and a 32-token
query probe for the attention), then decoding the recalled block (where the turn's head shares the block's ubatch,
the block's share of it by tokens); it is paid once per turn, so its share falls as the answer grows. --fused
decodes the block inside the new text's first ubatch (recall.FUSED_BLOCK, off by default). Writes results.json, results.md and a plot when --out is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
from recall_bench import filler  # noqa: E402

from pymorph_edge import EngineConfig, Llama  # noqa: E402
from pymorph_edge.engine import recall as recall_module  # noqa: E402
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


def timed_turn(llm: Llama, msgs: list[dict], content: str, n: int, no_end: dict[int, float]) -> dict:
    before = llm.stats
    msgs.append({"role": "user", "content": content})
    t0 = time.perf_counter()
    r = llm.create_chat_completion(msgs, max_tokens=n, temperature=0.0, logit_bias=no_end)
    dt = time.perf_counter() - t0
    msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
    after = llm.stats
    return {
        "seconds": dt,
        "answer_tokens": r["usage"]["completion_tokens"],
        "prompt_tokens_decoded": r["usage"]["prompt_tokens"]
        - (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        "recall_s": after.recall_s - before.recall_s,
        "probe_s": after.recall_probe_s - before.recall_probe_s,
        "block_s": after.recall_block_s - before.recall_block_s,
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
    recall: bool, question: str, story: int, answer: int, kv_bytes: int = 0, model: str = "smollm2-135m", budget=512
) -> dict:
    cfg = EngineConfig(recall_kv_bytes=kv_bytes)  # --kv-bytes: recalled text restored from saved KV where it can be
    llm = Llama(resolve_model(model), kv_budget=budget, recall=recall, config=cfg)
    no_end = end_of_turn_ban(llm)
    msgs = conversation(llm)
    history = llm.engine.n_past
    story_turn = timed_turn(llm, msgs, "Thanks! Now write another long story, about a mountain village.", story, no_end)
    question_turn = timed_turn(llm, msgs, question, answer, no_end)
    s = llm.stats
    llm.close()
    return {
        "history": history,
        "story_turn": story_turn,
        "question_turn": question_turn,
        "recall_key_bytes": s.recall_key_bytes,
        "recall_log_bytes": s.recall_log_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--story", type=int, default=256, help="tokens answered in the story turn (default 256)")
    ap.add_argument("--answer", type=int, default=32, help="tokens answered in the question turn (default 32)")
    ap.add_argument("--kv-bytes", type=int, default=0, help="EngineConfig(recall_kv_bytes) with recall on (0: off)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=512, help="kv_budget (Gemma 3 needs at least 544)")
    ap.add_argument("--fused", action="store_true", help="the block inside the new text's first ubatch")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    recall_module.FUSED_BLOCK = args.fused
    rows = []
    for r in range(args.rounds):
        for wording, question in QUESTIONS.items():
            on = run(True, question, args.story, args.answer, args.kv_bytes, args.model, args.budget)
            off = run(False, question, args.story, args.answer, 0, args.model, args.budget)
            rows.append({"round": r + 1, "wording": wording, "on": on, "off": off})
            for turn in ("story_turn", "question_turn"):
                a, b = on[turn], off[turn]
                print(
                    f"round {r + 1}, asked {wording}, {turn}: on {a['seconds']:.3f} s (recall {a['recall_s']:.3f} s, "
                    f"{a['recalled_tokens']} tokens), off {b['seconds']:.3f} s, on/off {a['seconds'] / b['seconds']:.3f}",
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
        "block (s) | tokens recalled | recall off (s) | on / off | recall / off |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    labels, ratios = [], []
    for row in rows:
        for turn, name in (("story_turn", "story"), ("question_turn", "question")):
            on, off = row["on"][turn], row["off"][turn]
            ratio = on["seconds"] / off["seconds"]
            lines.append(
                f"| {row['round']} | {row['wording']} | {name} | {on['answer_tokens']} | {on['seconds']:.3f} | "
                f"{on['recall_s']:.3f} | {parts(on)} | {on['recalled_tokens']} | {off['seconds']:.3f} | {ratio:.3f} | "
                f"{on['recall_s'] / off['seconds']:.3f} |"
            )
            labels.append(f"{name}\n{row['wording']}")
            ratios.append(ratio)
    first = rows[0]["on"]
    lines += [
        "",
        f"History before the timed turns: {first['history']} tokens. Host memory for recall at the end: "
        f"{first['recall_log_bytes']} bytes of token ids, {first['recall_key_bytes']} bytes of keys.",
        "",
        "on / off compares two runs of the turn, so it carries the machine's noise (a few % per turn here); "
        "recall / off is the time recall_before itself took against the turn without recall.",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(range(len(ratios)), ratios, color="tab:blue")
    ax.axhline(1.15, color="tab:red", linestyle="--", label="+15%")
    ax.set_xticks(range(len(ratios)), labels, fontsize=7)
    ax.set_ylabel("turn latency, recall on / off")
    ax.set_ylim(0.9, max(1.3, max(ratios) + 0.05))
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "latency.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
