"""`pymorph-edge generate` end to end, through a subprocess like a user would run it."""

import re
import subprocess
import sys

import pytest


def run(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "pymorph_edge.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_generate_streams_and_prints_stats(gqa_model, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello " * 100)
    r = run(
        "generate",
        "-m",
        gqa_model,
        "--kv-budget",
        "128",
        "-f",
        str(prompt),
        "-n",
        "300",
        "--ignore-eos",
        "--temperature",
        "0",
        "--n-ubatch",
        "64",
    )
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("[stats]")][-1]
    stats = dict(re.findall(r"(\w+)=([\w.]+)", line))
    assert stats["tokens"] == "300" and stats["budget"] == "128"
    assert int(stats["peak_kv_cells"]) <= 128 + 64 and int(stats["evictions"]) > 0
    assert len(r.stdout) > 0


def test_bad_arguments_give_one_clear_line():
    r = run("generate", "--kv-budget", "-3")
    assert r.returncode == 2
    assert "expected a positive integer, got '-3'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_model_is_a_clear_error(tmp_path):
    r = run("generate", "-m", str(tmp_path / "missing.gguf"), "-p", "hi")
    assert r.returncode == 2
    assert "model file not found" in r.stderr and "missing.gguf" in r.stderr


def test_budget_too_small_is_a_clear_error(gqa_model):
    r = run("generate", "-m", gqa_model, "--kv-budget", "8", "-p", "hi")
    assert r.returncode == 2 and "kv_budget=8 must be larger" in r.stderr


def test_cache_types_and_flash_attention_from_the_command_line(gqa_model, synthetic_dir):
    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    wide = str(write_synthetic_llama(synthetic_dir / "cli-wide.gguf", n_head=8, n_head_kv=2, n_embd=256))
    r = run(
        "generate",
        "-m",
        wide,
        "--kv-budget",
        "64",
        "--n-ubatch",
        "32",
        "--type-k",
        "q8_0",
        "--type-v",
        "q8_0",
        "-p",
        "hello " * 80,
        "-n",
        "20",
        "--ignore-eos",
        "--temperature",
        "0",
    )
    assert r.returncode == 0, r.stderr
    stats = dict(re.findall(r"(\w+)=([\w.]+)", [x for x in r.stderr.splitlines() if x.startswith("[stats]")][-1]))
    assert int(stats["peak_kv_cells"]) <= 64 + 32 and int(stats["evictions"]) > 0
    # a quantized V needs flash attention; an unknown type is refused by the parser
    r = run("generate", "-m", wide, "--type-v", "q4_0", "--flash-attn", "off", "-p", "hi")
    assert r.returncode == 2 and "type_v='q4_0' needs flash attention" in r.stderr
    r = run("generate", "-m", gqa_model, "--type-k", "q3_k", "-p", "hi")
    assert r.returncode == 2 and "--type-k" in r.stderr and "q3_k" in r.stderr


def test_chat_through_a_pipe_keeps_the_ceiling_and_reuses_the_cache(gqa_model):
    turns = "\n".join(["hello there"] * 4) + "\n"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pymorph_edge.cli",
            "chat",
            "-m",
            gqa_model,
            "--kv-budget",
            "128",
            "-n",
            "80",
            "--temperature",
            "0",
        ],
        input=turns,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("[turn")]
    assert len(lines) == 4
    stats = [dict(re.findall(r"(\w+)=([\w.]+)", x)) for x in lines]
    assert all(int(s["kv_cells"]) <= 128 for s in stats)
    assert stats[0]["cached"] == "0"
    # later turns continue on the compressed cache unless an answer hit the end-of-turn early
    assert sum(int(s["cached"]) > 0 for s in stats[1:]) >= 2
    assert int(stats[-1]["evictions"]) > 0


def test_serve_help_lists_every_option():
    r = run("serve", "--help")
    assert r.returncode == 0
    for opt in ("--host", "--port", "--api-key", "--kv-budget", "--max-queue", "-m"):
        assert opt in r.stdout


def test_ctrl_c_stops_the_answer_but_not_the_session(gqa_model):
    pexpect = __import__("pytest").importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "pymorph_edge.cli",
            "chat",
            "-m",
            gqa_model,
            "--kv-budget",
            "128",
            "-n",
            "100000",
            "--temperature",
            "0.8",
            "--seed",
            "1",
            "--ignore-eos",
        ],
        encoding="utf-8",
        timeout=60,
    )
    child.expect("> ")
    child.sendline("tell me everything")
    child.expect("tell me everything\r\n")  # the echo of our own line
    child.expect(".{20}")  # the answer is streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(r"\[turn 1\]")
    child.expect("> ")
    child.sendline("and now?")
    child.expect("and now\\?\r\n")
    child.expect(".{20}")  # the session survived and answers again
    child.sendintr()
    child.expect(r"\[stopped\]")
    # the random synthetic model may emit a NUL byte, which llama.cpp's C-string templates cut, so whether
    # turn 2 reuses the cache is checked at library level (test_prefix_reuse), not here
    child.expect(r"\[turn 2\] prompt=\d+ cached=\d+")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_generate_chat_sends_one_user_turn_through_the_template(gqa_model):
    r = run(
        "generate", "-m", gqa_model, "--kv-budget", "128", "-p", "hi", "-n", "12", "--temperature", "0",
        "--chat", "--repeat-penalty", "1.15", "--n-ubatch", "64",
    )  # fmt: skip
    # the synthetic model's architecture is llama -> llama.cpp's built-in llama3 template
    assert r.returncode == 0, r.stderr
    assert "[stats] tokens=" in r.stderr
    assert "<|start_header_id|>" not in r.stdout  # the template's own markup is not echoed as answer text


def test_offload_flag_is_taken_by_every_front_end_and_checked(gqa_model):
    """-ngl reaches Llama(n_gpu_layers=...): on a CPU-only llama.cpp the layers stay on the CPU and the run is the
    same; a count below -1 is refused, naming it."""
    base = ("generate", "-m", gqa_model, "--kv-budget", "64", "-p", "hello " * 20, "-n", "8", "--temperature", "0")
    plain, offloaded = run(*base), run(*base, "-ngl", "-1")
    assert plain.returncode == 0 and offloaded.returncode == 0, offloaded.stderr
    assert offloaded.stdout == plain.stdout
    for cmd in ("generate", "chat", "serve", "bench"):
        r = run(cmd, "-ngl", "-2")
        assert r.returncode == 2 and "-ngl/--n-gpu-layers" in r.stderr and "'-2'" in r.stderr, (cmd, r.stderr)


def test_bench_config_checks_n_gpu_layers():
    import pytest

    from pymorph_edge.bench.config import BenchConfig

    with pytest.raises(ValueError, match="n_gpu_layers must be an int >= -1"):
        BenchConfig(n_gpu_layers=-3)
    assert BenchConfig(n_gpu_layers=-1).n_gpu_layers == -1


def test_score_layers_from_the_command_line(synthetic_dir):
    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    path = str(write_synthetic_llama(synthetic_dir / "cli-six-layers.gguf", n_layer=6))
    args = ("generate", "-m", path, "--kv-budget", "48", "-p", "hello " * 40, "-n", "20", "--ignore-eos")
    r = run(*args, "--score-layers", "2", "--n-ubatch", "32")
    assert r.returncode == 0, r.stderr
    assert int(re.search(r"tokens evicted\s*: (\d+)", r.stderr).group(1)) > 0
    assert run(*args, "--score-layers", "r2", "--n-ubatch", "32").returncode == 0
    bad = run(*args, "--score-layers", "0")
    assert bad.returncode == 2 and "expected a positive integer, got '0'" in bad.stderr


@pytest.mark.parametrize(
    "flag, want", [("2", (2, False)), ("r2", (2, True)), ("c2", (2, "chunks")), ("all", (None, False))]
)
def test_score_layers_forms_reach_the_scorer(synthetic_dir, flag, want):
    """N, rN (decode steps in turn) and cN (long prompt chunks read the N chosen layers too) reach the native scorer."""
    from pymorph_edge.cli import _open_model
    from pymorph_edge.cli_parser import build_parser
    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    path = str(write_synthetic_llama(synthetic_dir / "cli-six-layers.gguf", n_layer=6))
    args = build_parser().parse_args(["generate", "-m", path, "--kv-budget", "48", "--score-layers", flag])
    with _open_model(args) as llm:
        assert (llm.engine.scorer.read_cap, llm.engine.scorer.rotates) == want


def test_recall_and_keep_from_the_command_line(gqa_model):
    """--recall, --recall-in-generation and --keep reach the engine on every front end's model options, a bad
    --keep is one clear line, and recall inside a generation asked for with recall off is refused, naming both."""
    from pymorph_edge.cli import _open_model
    from pymorph_edge.cli_parser import build_parser

    def opened(*flags):
        args = build_parser().parse_args(["generate", "-m", gqa_model, "--kv-budget", "64", *flags])
        return _open_model(args)

    with opened() as llm:  # MorphKV's defaults: recall on, nothing pinned, no watcher inside a generation
        assert llm.engine.recall_enabled and llm.engine.n_keep == 0 and llm._generation_recall is None
    with opened("--recall", "off", "--keep", "8") as llm:
        assert not llm.engine.recall_enabled and llm.engine.n_keep == 8
    with opened("--policy", "tova", "--recall", "on", "--recall-in-generation") as llm:
        assert llm.engine.recall_enabled and llm._generation_recall is not None
    with opened("--keep", "system") as llm:
        assert llm._keep_system
    bad = run("generate", "-m", gqa_model, "--keep", "first")
    assert bad.returncode == 2 and "expected a non-negative integer or 'system', got 'first'" in bad.stderr
    refused = run("generate", "-m", gqa_model, "--kv-budget", "64", "--recall", "off", "--recall-in-generation")
    assert refused.returncode == 2 and "recall_in_generation=True needs recall" in refused.stderr
    assert "recall=False" in refused.stderr
