"""Recall benchmark: facts given early, asked for after the bounded cache has evicted them.

usage: python benchmarks/recall_bench.py --model smollm2-135m --task continuation --budget 512 \
           --out benchmarks/results/recall-smollm2 [--sets tuning,held-out] [--configs full,morphkv,...]

Two tasks, both with this project's own facts and texts (benchmarks/recall_texts.py), in seven sets: "tuning" chose
the recall constants, "held-out" was reported and also looked at while comparing thresholds; "fresh", "final",
"sealed" and "closing" were each written before a change and then showed the failure that the next change fixed;
"last" was only ever reported:
- continuation: eight facts (a 5-digit code under a name) open a text; then ~4.5K tokens of prose arrive as
  successive requests of ~500 tokens, each extending the cached text and ending just before a reminder's
  value ("... the code for Maria is"). The greedy continuation is scored by the digits it copies.
- dialogue (chat models): the user gives personal details, one a 5-digit number, and asks for a story; two
  more stories follow (~900 generated tokens); then the user asks for the number.
Each config is a policy with recall on or off ("morphkv", "morphkv-norecall", ...) or "full"; "+rivals" and
"+anyword" turn off recall's rival test and its on-the-cue test (recall_select.py), and "+eager" asks attention
beside the words every request (recall.ATTENTION_BESIDE_WORDS, the way before stop 33), for an A/B; "+fused"
decodes a recalled block inside the new text's first ubatch, "+own" puts a chat block in a user message of its
own, "+long" labels it "(From earlier in this conversation:)" (both the way before stop 34), and "+next" recalls attention's pick with the sentence after it ("+alone", its
opposite, is the default and a no-op). Tried at stop 35 and left off: "+bare" (no label) and "+after" (the block
after the user's words); "+untyped" is the way before stop 35 (a word asking for a number does not match numerals); "+front" puts a
completion's block before all of the new text, the way before stop 37; "+echoes" lets BM25 bring back a span that only
repeats the request's words and "+covered" one whose matched words a cached sentence matches and more, both the way
before stop 43; "+drop" removes a recalled sentence's kept fragments where it first stood (tried at stop 46, left
off); "+boundary" recalls only at request boundaries, not inside a
fresh completion longer than the cache (request_recall.RECALL_INSIDE_PROMPT). With `--paste N` the dialogue's question
comes after N sentences of pasted prose in the same message, and "+start" puts the block at that message's start
(recall_placement.NEXT_TO_CUE_TOKENS = 0), the way before stop 40. With `--history N` turns of pasted prose, each
its own request answered in a few words, follow the stories until the conversation holds N tokens (past n_ctx_train).
Distances are tokens from the fact to the question; the continuation task also reports whether the asked code is in
the cache at the cue. Writes results.json, results.md and a plot.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from recall_texts import DIALOGUE_FACTS, OPENING, SETS, STORIES, continuation_facts, filler

from pymorph_edge import Llama
from pymorph_edge.bench.common import last_logprobs
from pymorph_edge.engine import recall as recall_module
from pymorph_edge.engine import recall_select
from pymorph_edge.engine.engine_config import EngineConfig
from pymorph_edge.engine.recall import BLOCK_LPOS, recalled_live
from pymorph_edge.engine.recall_fragments import consecutive_runs
from pymorph_edge.generation import recall_placement as placement
from pymorph_edge.generation import request_recall
from pymorph_edge.model.default_model import resolve_model

IS_RIVAL, ON_CUE = recall_module.is_rival, recall_module.on_cue
NEXT_TO_CUE = placement.NEXT_TO_CUE_TOKENS
SHORT_PREFIX, LONG_PREFIX = placement.RECALLED_PREFIX, "(From earlier in this conversation:) "


def runs_of(indices: set[int]) -> list[tuple[int, int]]:
    """Consecutive runs [lo, hi) of a set of sequence indices."""
    return consecutive_runs(sorted(indices))


def open_llm(path: Path, config: str, budget: int, kv_bytes: int | None = None, template: str | None = None) -> Llama:
    # "+rivals": recall without its rival test (recall_select.is_rival); "+anyword": BM25 may bring back a span
    # that shares no word with the request's last sentence (recall_select.on_cue); "+eager": a query probe every
    # request, and attention's best span beside BM25's picks (recall.ATTENTION_BESIDE_WORDS); the A/Bs for those
    config, *flags = config.split("+")
    rivals, anyword = "rivals" in flags, "anyword" in flags
    recall_module.is_rival = (lambda span, cue: False) if rivals else IS_RIVAL
    recall_module.on_cue = (lambda span, cue: True) if anyword else ON_CUE
    recall_module.ATTENTION_BESIDE_WORDS = "eager" in flags
    # "+fused": the block inside the new text's first ubatch (recall.FUSED_BLOCK); "+own": a chat block as a user
    # message of its own where the new user message could open with it, and "+long": labelled "(From earlier in this
    # conversation:)", both as before stop 34 ("+inline" and "+short", their defaults since, are accepted as no-ops)
    recall_module.FUSED_BLOCK = "fused" in flags
    placement.PREFER_INLINE = "own" not in flags
    placement.BLOCK_AFTER_WORDS = "after" in flags  # "+after": the block after the user's own words
    # "+start": a long message's block at its start, as before stop 40
    placement.NEXT_TO_CUE_TOKENS = 0 if "start" in flags else NEXT_TO_CUE
    # "+front": a completion's block before all of the new text, as before stop 37 (not just before its last sentence)
    placement.BEFORE_LAST_SENTENCE = "front" not in flags
    # "+bare": the recalled text with no label at all (4 tokens fewer than "(Earlier:) " under SmolLM2's vocabulary)
    placement.RECALLED_PREFIX = LONG_PREFIX if "long" in flags else "" if "bare" in flags else SHORT_PREFIX
    recall_module.ATTENTION_NEXT = "next" in flags  # "+next": attention's pick with the sentence after it
    # "+untyped": a word asking for a number does not also match numerals (recall_select.TYPED_NUMBERS), as before
    # stop 35
    recall_select.TYPED_NUMBERS = "untyped" not in flags
    # "+echoes": BM25 may bring back a span that only repeats the request's words (recall_select.adds_a_word), as
    # before stop 43
    recall_select.ECHOES_OUT = "echoes" not in flags
    # "+covered": BM25 may bring back a span the cache already covers (recall_select.HeldCover), as before stop 43
    recall_select.COVERED_OUT = "covered" not in flags
    # "+uncounted": a count of digits in the request is a word like any other, and no span needs a numeral that long
    # (recall_select.COUNTED_DIGITS), as before stop 45
    recall_select.COUNTED_DIGITS = "uncounted" not in flags
    # "+drop": a recalled sentence's kept fragments leave the place it first stood (recall.DROP_KEPT_FRAGMENTS; tried
    # at stop 46 and left off)
    recall_module.DROP_KEPT_FRAGMENTS = "drop" in flags
    # "+boundary": a fresh completion longer than the cache does not recall inside itself, only requests that extend the
    # cached text do (request_recall.RECALL_INSIDE_PROMPT), as before stop 37's last change
    request_recall.RECALL_INSIDE_PROMPT = "boundary" not in flags
    if config == "full":
        return Llama(path, kv_budget=None, n_ctx=8192, chat_template=template)
    # "@all" / "@4": EngineConfig(score_layers=...), the layers the policy reads
    config, _, layers = config.partition("@")
    policy, off, _ = config.partition("-norecall")
    # "-attention" / "-both" / "-bm25": how recall judges relevance; otherwise EngineConfig's default ("bm25" since
    # stop 47; runs before it named the words alone "morphkv-bm25" and "both" plain "morphkv")
    policy, by = (policy.split("-", 1) + [EngineConfig.recall_by])[:2]
    # "@r8": 8 layers a decode step, in turn (EngineConfig.rotate_layers); "@c8": long prompt chunks read 8 too
    rotate = {"r": True, "c": "chunks"}.get(layers[:1], False)
    layers = layers.lstrip("rc")
    cfg = EngineConfig(
        recall_by=by,
        score_layers=None if not layers else layers if layers == "all" else int(layers),
        rotate_layers=rotate,
        # --kv-bytes N: every recalled block restored from N bytes of saved KV where it can be, a completion's too
        # (recall_restore="all"), as this flag ran before stop 50; 0: every block recomputed, the default before it.
        # Unset: the engine's default (chat blocks restored where a restore is cheap: SmolLM2, not Gemma 3)
        recall_kv_bytes=kv_bytes,
        recall_restore="all" if kv_bytes else "chat",
    )
    return Llama(path, kv_budget=budget, policy=policy, recall=not off, config=cfg, chat_template=template)


def teacher_forced(llm: Llama, text: str, code: str) -> tuple[float, int, int]:
    """The issue's teacher-forced score of a reminder's value, right after the request that ends before it: the
    summed negative log-likelihood of the value's tokens and how many were the model's first choice, each given the
    true ones before it. The greedy answer's tokens are rolled back first (they are the cache's live tail), and the
    cache ends holding the value, as the next request's text does. No request boundary falls inside, so no recall."""
    eng = llm.engine
    ids = llm.tokenize(text.encode())
    full = llm.tokenize(f"{text} {code}.".encode())
    if full[: len(ids)] != ids:
        raise RuntimeError("the value's tokens do not extend the request's")
    value: list[int] = []
    for t in full[len(ids) :]:  # the tokens up to the fifth digit
        value.append(t)
        if sum(ch.isdigit() for ch in llm.detokenize(value).decode(errors="replace")) >= len(code):
            break
    if eng.reuse_prefix(ids) != len(ids) - 1:  # the request's last token is decoded again, for its logits
        raise RuntimeError("the request's end was not the cache's live tail")
    eng.decode([ids[-1]])
    nll, top1 = 0.0, 0
    for t in value:
        row = last_logprobs(llm)
        nll -= float(row[t])
        top1 += int(row.argmax() == t)
        eng.decode([t])
    return nll, top1, len(value)


def code_in_cache(llm: Llama, code: str, n_prompt: int) -> bool:
    """Whether a run of the prompt's tokens that the cache holds (where they first stood, or as a recalled copy)
    spells the code: what a stronger model than these could copy (the answer's own tokens are left out)."""
    engine = llm.engine
    if engine.scorer is None:  # the full cache holds every token
        return True
    live = {p for p in engine.scorer.cell_lpos() if 0 <= p < min(n_prompt, BLOCK_LPOS)} | recalled_live(engine)
    return any(code in llm.detokenize(engine.log.tokens(lo, hi)).decode(errors="replace") for lo, hi in runs_of(live))


def continuation(llm: Llama, set_name: str, single: bool = False) -> list[dict]:
    """single: each request holds the whole text so far, sent to an emptied cache (--single): recall can only fire
    inside the request (recall_placement.RECALL_INSIDE_PROMPT)."""
    s = SETS[set_name]
    rng, facts, fact, cue = continuation_facts(set_name)
    text = "Records of the archive. " + " ".join(fact.format(name=n, code=c) for n, c in facts) + "\n\n"
    per = 28  # sentences (~500 tokens) per request
    prose = filler(set_name, 8 * per, s["seed"])
    fact_at = {n: len(llm.tokenize(text.split(fact.format(name=n, code=c))[0])) for n, c in facts}
    order = facts[:]
    rng.shuffle(order)
    out = []
    for r, (name, code) in enumerate(order):
        text += " ".join(prose[r * per : (r + 1) * per]) + " " + cue.format(name=name)
        n_prompt = len(llm.tokenize(text))
        if single:
            llm.reset()
        got = llm.create_completion(text, max_tokens=6, temperature=0.0)["choices"][0]["text"]
        in_cache = code_in_cache(llm, code, n_prompt)
        digits = "".join(ch for ch in got if ch.isdigit())[:5]
        copied = sum(a == b for a, b in zip(digits, code, strict=False))
        nll, top1, n_value = teacher_forced(llm, text, code)
        out.append(
            {
                "name": name,
                "code": code,
                "answer": got,
                "digits_copied": copied,
                "distance": n_prompt - fact_at[name],
                "value_nll": nll,  # summed over the value's tokens, teacher-forced after the request
                "value_top1": top1,  # of its n_value tokens, how many were the model's first choice
                "value_tokens": n_value,
                "fact_in_cache": in_cache,  # the code's digits among the prompt's cached tokens: all a model can copy
                # per request with --single (each began with a reset), else the counters so far
                "recalls": llm.stats.recalls,
                "recalled_tokens": llm.stats.recalled_tokens,
                "recall_s": llm.stats.recall_s,
                "peak_cells": llm.stats.peak_cells,
            }
        )
        text += f" {code}.\n"
    return out


def pad_history(llm: Llama, msgs: list[dict], set_name: str, seed: int, tokens: int) -> None:
    """Chat turns of pasted prose, each its own request answered in a few words, until the conversation holds
    `tokens` tokens (--history: the question asked past the model's n_ctx_train)."""
    k = 0
    while llm.engine.n_past < tokens:
        prose = " ".join(filler(set_name, 30, seed + 1000 + k))
        msgs.append({"role": "user", "content": f"Here is part {k + 1} of my notes:\n\n{prose}\n\nJust say noted."})
        r = llm.create_chat_completion(msgs, max_tokens=8, temperature=0.0)
        msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
        k += 1


def dialogue(llm: Llama, set_name: str, n: int, paste: int = 0, history: int = 0) -> list[dict]:
    s = SETS[set_name]
    rng = random.Random(s["seed"])
    out = []
    for i in range(n):
        name, city, num = s["names"][i], s["cities"][i % len(s["cities"])], f"{rng.randrange(10000, 100000)}"
        fact, question = DIALOGUE_FACTS[set_name][i % len(DIALOGUE_FACTS[set_name])]
        llm.reset()
        stories = s.get("stories", STORIES)
        opening = s.get("opening", OPENING).format(name=name, city=city, fact=fact.format(num=num), story=stories[0])
        msgs = [{"role": "user", "content": opening}]
        for k, topic in enumerate(stories):
            if k:
                msgs.append({"role": "user", "content": f"Thanks! Now write another long story, about {topic}."})
            r = llm.create_chat_completion(msgs, max_tokens=300, temperature=0.0, repeat_penalty=1.1)
            msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
        if history:
            pad_history(llm, msgs, set_name, s["seed"] + i, history)
        distance = llm.engine.n_past
        if paste:  # the question after a pasted text, in the same message (a long message: NEXT_TO_CUE_TOKENS)
            prose = " ".join(filler(set_name, paste, s["seed"] + i))
            question = f"Here is a passage I am reading:\n\n{prose}\n\nAnyway, {question[:1].lower()}{question[1:]}"
        msgs.append({"role": "user", "content": question})
        t0 = time.perf_counter()
        ans = llm.create_chat_completion(msgs, max_tokens=24, temperature=0.0)["choices"][0]["message"]["content"]
        # the number's tokens in the cache as recalled copies: recall found it, whatever the model made of it
        blocks = [llm.engine.log.tokens(lo, hi) for lo, hi in runs_of(recalled_live(llm.engine))]
        out.append(
            {
                "name": name,
                "number": num,
                "answer": ans,
                "correct": num in ans,
                "question": question,
                "fact_recalled": any(num in llm.detokenize(b).decode(errors="replace") for b in blocks),
                # per dialogue: llm.reset() starts the counters and the peak again
                "recalls": llm.stats.recalls,
                "recalled_tokens": llm.stats.recalled_tokens,
                "recall_s": llm.stats.recall_s,
                "peak_cells": llm.stats.peak_cells,
                "distance": distance,
                "turn_s": time.perf_counter() - t0,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", choices=["continuation", "dialogue"], default="continuation")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--sets", default="tuning,held-out")
    ap.add_argument(
        "--configs", default="full,morphkv,morphkv-norecall,tova,tova-norecall,streaming,streaming-norecall"
    )
    ap.add_argument("--dialogues", type=int, default=4, help="dialogues per set")
    ap.add_argument(
        "--single", action="store_true", help="continuation: each request the whole text so far, in an emptied cache"
    )
    ap.add_argument("--paste", type=int, default=0, help="dialogue: sentences of prose pasted before the question")
    ap.add_argument(
        "--history", type=int, default=0, help="dialogue: pasted-prose turns until the conversation holds N tokens"
    )
    ap.add_argument(
        "--kv-bytes",
        type=int,
        default=None,
        help="EngineConfig(recall_kv_bytes) for every config, completions' blocks restored too (0: every block "
        "recomputed; default: the engine's)",
    )
    ap.add_argument(
        "--chat-template", type=Path, default=None, help="a Jinja chat template file (default: the model's)"
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    path = resolve_model(args.model)
    results = []
    for config in args.configs.split(","):
        template = args.chat_template.read_text() if args.chat_template else None
        llm = open_llm(path, config, args.budget, args.kv_bytes, template)
        for set_name in args.sets.split(","):
            t0 = time.perf_counter()
            trials = (
                continuation(llm, set_name, args.single)
                if args.task == "continuation"
                else dialogue(llm, set_name, args.dialogues, args.paste, args.history)
            )
            st = llm.stats
            row = {
                "config": config,
                "set": set_name,
                "trials": trials,
                "seconds": time.perf_counter() - t0,
                "peak_cells": st.peak_cells,
                "recalls": st.recalls,
                "recalled_tokens": st.recalled_tokens,
                "recall_s": st.recall_s,
                "log_bytes": st.recall_log_bytes,
            }
            if args.task == "dialogue" or args.single:  # each trial began with a reset: sum, take the highest peak
                row.update({k: sum(t[k] for t in trials) for k in ("recalls", "recalled_tokens", "recall_s")})
                row["peak_cells"] = max(t["peak_cells"] for t in trials)
            if args.task == "continuation":
                row["score"] = sum(t["digits_copied"] for t in trials)
                row["of"] = 5 * len(trials)
                row["value_nll"] = sum(t["value_nll"] for t in trials) / len(trials)  # per reminder
                row["value_top1"] = sum(t["value_top1"] for t in trials)
                row["value_tokens"] = sum(t["value_tokens"] for t in trials)
                row["fact_in_cache"] = sum(t["fact_in_cache"] for t in trials)
            else:
                row["score"] = sum(t["correct"] for t in trials)
                row["fact_recalled"] = sum(t["fact_recalled"] for t in trials)
                row["of"] = len(trials)
            results.append(row)
            write(args, results)  # after every row, so a stopped run keeps what it measured
            print(
                f"{config:22s} {set_name:9s} {row['score']}/{row['of']}  peak {row['peak_cells']}  recalls {row['recalls']}"
                + (f"  fact recalled {row['fact_recalled']}" if "fact_recalled" in row else "")
                + (f"  code in the cache {row['fact_in_cache']}/{len(trials)}" if "fact_in_cache" in row else ""),
                flush=True,
            )
            llm.reset()
        llm.close()


def write(args: argparse.Namespace, results: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/recall_bench.py " + " ".join(sys.argv[1:])
    (args.out / "results.json").write_text(
        json.dumps(
            {"command": command, "budget": args.budget, "model": args.model, "task": args.task, "results": results},
            indent=1,
        )
    )
    unit = "digits copied" if args.task == "continuation" else "numbers recalled"
    held = "code in the cache at the cue" if args.task == "continuation" else "fact's sentence recalled"
    forced = "value NLL (teacher-forced) | value tokens first choice |" if args.task == "continuation" else ""
    lines = [
        f"# Recall: {args.task}, {args.model}, budget {args.budget}",
        "",
        f"`{command}`",
        "",
        f"| config | set | {unit} | {forced} {held} | peak cells | recalls | tokens recalled | recall s |",
        "| --- " * (8 + 2 * bool(forced)) + "|",
    ]
    for r in results:
        tf = f"{r['value_nll']:.1f} | {r['value_top1']}/{r['value_tokens']} | " if "value_nll" in r else ""
        lines.append(
            f"| {r['config']} | {r['set']} | {r['score']}/{r['of']} | {tf}{r.get('fact_recalled', r.get('fact_in_cache', '-'))} | "
            f"{r['peak_cells']} | {r['recalls']} | {r['recalled_tokens']} | {r['recall_s']:.2f} |"
        )
    if forced:
        lines += [
            "",
            "Value NLL: the summed negative log-likelihood of a reminder's value tokens (5 digits), teacher-forced "
            "right after the request, averaged over the reminders.",
        ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(args, results)


def plot(args: argparse.Namespace, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    key = "digits_copied" if args.task == "continuation" else "correct"
    for config in dict.fromkeys(r["config"] for r in results):
        pts = sorted((t["distance"], float(t[key])) for r in results if r["config"] == config for t in r["trials"])
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            linestyle="-" if "norecall" not in config else ":",
            label=config,
        )
    ax.set_xlabel("tokens from the fact to the question")
    ax.set_ylabel("digits copied (of 5)" if args.task == "continuation" else "answered (1) or not (0)")
    ax.set_title(f"recall, {args.task}: {args.model}, budget {args.budget}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "recall.png", dpi=110)
    plt.close(fig)  # one plot per row written


if __name__ == "__main__":
    main()
