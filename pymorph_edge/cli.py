"""`pymorph-edge`: command-line front end."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from tqdm import tqdm

from pymorph_edge.cli_parser import DEFAULT_PROMPT, build_parser
from pymorph_edge.engine.stats import KVStats
from pymorph_edge.model.rpc_backend import RPCError


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
    if args.n_gpu_layers is not None:
        cfg.n_gpu_layers = args.n_gpu_layers
    if args.tasks:
        cfg = BenchConfig(**{**cfg.__dict__, "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()]})
    results = run(cfg, args.out, "pymorph-edge " + " ".join(sys.argv[1:]), merge=bool(args.tasks))
    sys.stdout.write((args.out / "results.md").read_text())
    sys.stderr.write(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'bench.png'}\n")
    return 0 if results["tasks"] else 1


def _layers_count(v: int | str) -> int | str:
    return int(v[1:]) if isinstance(v, str) and v[:1] in ("r", "c") else v


def _rotation(v: int | str | None) -> bool | str:
    """--score-layers rN: decode steps in turn (EngineConfig.rotate_layers=True); cN: long prompt chunks read N too"""
    return {"r": True, "c": "chunks"}.get(str(v)[:1], False)


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
        score_layers=None if args.kv_budget is None else _layers_count(args.score_layers),
        rotate_layers=_rotation(args.score_layers) if args.kv_budget is not None else False,
        recall_in_generation=args.recall_in_generation or None,
    )
    return Llama(
        path,
        kv_budget=args.kv_budget,
        policy=policy,
        window=args.window,
        fusion=args.fusion,
        config=config,
        recall={"auto": None, "on": True, "off": False}[args.recall],
        keep=args.keep,
        n_gpu_layers=args.n_gpu_layers or 0,
        rpc_servers=args.rpc,
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


def _rpc_server(args: argparse.Namespace) -> int:
    import os

    from pymorph_edge.model.rpc_backend import require_rpc, serve_rpc

    require_rpc()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(f"warning: RPC has no authentication; {args.host}:{args.port} is open to the network\n")
    if args.port > 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    sys.stderr.write(f"serving this CPU over llama.cpp RPC on {args.host}:{args.port}\n")
    serve_rpc(args.host, args.port, args.threads or os.cpu_count() or 1)
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
        if args.command == "rpc-server":
            return _rpc_server(args)
    except (ValueError, FileNotFoundError, RPCError) as exc:
        sys.stderr.write(f"pymorph-edge: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
