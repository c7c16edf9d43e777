"""llama.cpp's RPC backend on loopback: a non-host backend that CI can run without a GPU.

An `rpc-server` child process serves this machine's CPU; the model's layers, its KV cache and the compute
buffers go to it, so every tensor the scorer reads lives in a non-host buffer and comes through
ggml_backend_tensor_get (the path a CUDA or Metal device takes). Whatever the backend, the scorer must decide
the same: the greedy tokens, the cell map and the keep-set equal the CPU backend's run.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time

import pytest

from pymorph_edge import Llama
from pymorph_edge.engine.engine_config import EngineConfig
from pymorph_edge.model.rpc_backend import RPCError, rpc_supported

PROMPT_WORDS = "The lighthouse keeper wrote in his log every night about the ships, the weather and the sea. "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, port: int, what: str, deadline_s: float = 120.0) -> None:
    """Poll until the port accepts a connection (a generous deadline: CI machines are busy)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on {port} within {deadline_s} s")


@pytest.fixture(scope="module")
def rpc_endpoint():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pymorph_edge.cli", "rpc-server", "--port", str(port), "--threads", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_listening(proc, port, "rpc-server")
    yield f"127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def test_this_llama_cpp_has_the_rpc_backend():
    """The README's setup builds llama-cpp-python with GGML_RPC; a build without it fails here, not in a skip."""
    assert rpc_supported()


# budget and prompt repeats: Gemma 3's 512-token sliding window needs a budget past it, and a prompt past that
SIZES = {"smollm2": (256, 30), "gemma": (640, 75)}


def _run(
    path: str,
    rpc: str | None,
    policy: str,
    flash_attn: bool,
    kv_type: str,
    size: tuple[int, int],
    recall: bool | None = None,
    layers: tuple[int | str | None, bool | str] = (None, False),
) -> dict:
    # the CPU run without llama.cpp's weight repacking: an rpc-server does not repack, and repacked kernels round
    # differently (on an AVX-512 machine Gemma 3's Q4_K weights are repacked and its attention moves by ~1%)
    kw = {"n_gpu_layers": -1, "rpc_servers": rpc} if rpc else {"use_extra_bufts": False}
    cfg = EngineConfig(
        n_ubatch=128,
        flash_attn=flash_attn,
        type_k=kv_type,
        type_v=kv_type,
        score_layers=layers[0],
        rotate_layers=layers[1],
    )
    budget, repeats = size
    with Llama(path, kv_budget=budget, policy=policy, config=cfg, recall=recall, **kw) as llm:
        if not rpc and flash_attn:
            # with flash attention on, a non-host backend rebuilds the attention rows with ggml's ops
            # (native/pme_devscore.c), the host with its own kernels (pme_fattn.c): they agree to rounding only,
            # so the CPU run reduces on the CPU backend with the same ops, which must then agree to the bit
            llm.engine.scorer.backend_scores("always")
        prompt = llm.tokenize((PROMPT_WORDS * repeats).encode())
        tokens = list(itertools.islice(llm.generate(prompt, temp=0.0), 24))
        cells = llm.engine.scorer.cell_positions()
        sc = llm.engine.scorer
        return {
            "tokens": tokens,
            "cells": cells,
            "kept": sorted(p for p in cells if p >= 0),
            "stats": llm.stats,
            "layers": (sc.read_cap, sc.rotates),
        }


CASES = [
    (policy, fa, kv) for policy in ("morphkv", "tova") for fa, kv in ((False, "f16"), (True, "f16"), (True, "q8_0"))
]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma"])
@pytest.mark.parametrize("policy,flash_attn,kv_type", CASES)
def test_rpc_scores_as_the_cpu_backend(model, policy, flash_attn, kv_type, rpc_endpoint, smollm2_path, gemma_path):
    path = smollm2_path if model == "smollm2" else gemma_path
    rpc = _run(path, rpc_endpoint, policy, flash_attn, kv_type, SIZES[model])
    # off the host the default reads a quarter of the layers a decode step, in turn, and 8 chosen ones for long
    # prompt chunks (engine_config.py); the CPU run is told the same, so the two must decide alike
    assert rpc["layers"] == (8, "chunks")
    cpu = _run(path, None, policy, flash_attn, kv_type, SIZES[model], layers=rpc["layers"])
    assert cpu["stats"].tokens_evicted > 0  # the prompt overflowed the budget
    assert rpc["tokens"] == cpu["tokens"]
    assert rpc["cells"] == cpu["cells"]
    assert rpc["kept"] == cpu["kept"]
    # the tensors really were off the host: scores (and the key log's keys) came over
    assert rpc["stats"].decode_d2h_bytes > 0
    if not flash_attn:
        assert cpu["stats"].decode_d2h_bytes == 0  # host buffers, read in place


@pytest.mark.slow
@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("layers", [(None, False), ("all", False)])
def test_rpc_scoring_copies_a_few_bytes_per_cell(flash_attn, layers, rpc_endpoint, smollm2_path):
    """Scores are reduced where the attention lives: per decoded token the host receives one float per cell (two in
    the W steps after a chunk that filled the window: that chunk's rows still in the ring, summed), per prompt
    chunk its max and the sum of its window's rows (native/pme_devring.c), never the attention matrix (n_kv x
    n_head floats a layer) or the K cache. Issue 21's bounds: 16 bytes a cell per step, 64 per chunk. Recall off:
    its key log copies each new token's keys."""
    run = _run(smollm2_path, rpc_endpoint, "morphkv", flash_attn, "f16", SIZES["smollm2"], recall=False, layers=layers)
    s = run["stats"]
    n_cells = s.n_ctx  # the scored cache's cells (budget + n_ubatch, padded)
    window = 32
    assert s.tokens_evicted > 0
    assert s.d2h_bytes_per_decode_step <= 2 * 4 * n_cells + 8
    assert s.d2h_bytes_per_prompt_chunk <= (window + 2) * 4 * n_cells / 2  # was all W rows: 132 bytes a cell
    # one synchronisation per layer read (the node asked for) plus one read of the scores: every layer when told,
    # by default a quarter of SmolLM2's 30 a step (7 or 8, in turn), so every 4th step reads each
    if layers[0] == "all":
        assert s.syncs_per_decode_step == 30 + 1
    else:
        assert 7 + 1 <= s.syncs_per_decode_step <= 8 + 1


def test_an_unreachable_server_is_a_clear_error(gqa_model):
    port = free_port()  # nothing listens there
    with pytest.raises(RPCError, match=f"127.0.0.1:{port}"):
        Llama(gqa_model, n_gpu_layers=-1, rpc_servers=f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    "servers,ngl,message",
    [
        ("localhost", -1, "not host:port"),
        ("127.0.0.1:0", -1, "port in 1..65535"),
        ("127.0.0.1:50052", 0, "n_gpu_layers=0 would offload nothing"),
    ],
)
def test_bad_rpc_settings_are_refused_before_anything_loads(servers, ngl, message):
    with pytest.raises(ValueError, match=message):
        Llama("does-not-matter.gguf", n_gpu_layers=ngl, rpc_servers=servers)


@pytest.mark.slow
def test_serve_over_rpc_answers_the_openai_client_with_a_bounded_cache(rpc_endpoint, smollm2_path):
    import json
    import urllib.request

    import openai

    port = free_port()
    cmd = [sys.executable, "-m", "pymorph_edge.cli", "serve", "-m", smollm2_path, "--kv-budget", "128"]
    cmd += ["--n-ubatch", "64", "--port", str(port), "-ngl", "-1", "--rpc", rpc_endpoint]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_listening(proc, port, "serve --rpc")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper. " * 10}],
            max_tokens=120,
            temperature=0,
        )
        assert r.choices[0].message.content and r.usage.completion_tokens > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as h:
            kv = json.loads(h.read())["kv"]
        assert kv["tokens_evicted"] > 0 and kv["peak_cells"] <= 128 + 64  # bounded, and it did evict
        assert kv["decode_d2h_bytes"] > 0  # the scorer read the RPC server's tensors
    finally:
        proc.terminate()
        proc.wait(30)
