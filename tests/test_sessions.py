"""Saved conversations: Llama.save_session / load_session, save_state / load_state and `chat --session`."""

import base64
import json
import os
import subprocess
import sys
import textwrap

import pytest
from kv_introspect import llama_cell_positions

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.sessions.session_file import MAGIC

CFG = dict(kv_budget=128, config=EngineConfig(n_ubatch=32))


def ban(llm):
    # llama.cpp's built-in templates are C strings: keep the random model from emitting a NUL byte (token 3)
    return {llm.token_eos(): -1e9, 3: -1e9}


def chat_turns(llm, n, start=0, tokens=40):
    """n greedy turns; the first creates the conversation, the rest continue it. Returns the answers."""
    answers = []
    for i in range(start, start + n):
        msg = [{"role": "user", "content": f"turn {i}: tell me more about {i * 7}"}]
        kw = dict(max_tokens=tokens, temperature=0, logit_bias=ban(llm))
        r = llm.continue_chat(msg, **kw) if llm.has_conversation else llm.create_chat_completion(msg, **kw)
        answers.append((r["choices"][0]["message"]["content"], r["usage"]))
    return answers


def test_a_restored_state_matches_llama_cpps_cells_and_continues_identically(gqa_model):
    with Llama(gqa_model, **CFG) as a, Llama(gqa_model, **CFG) as b:
        chat_turns(a, 3)
        assert a.stats.tokens_evicted > 0  # the budget is full: scores decide what stays
        state = a.save_state()
        b.load_state(state)
        live = [p for p in b.engine.cell_positions() if p >= 0]
        # the native map was re-laid into cells 0..n-1: it must be what llama.cpp restored
        assert live == llama_cell_positions(b.engine.ctx)
        assert sorted(live) == sorted(p for p in a.engine.cell_positions() if p >= 0)
        assert b.stats.tokens_decoded == a.stats.tokens_decoded and b.engine.next_pos == a.engine.next_pos
        # the same next turn from both: same tokens, and the whole restored sequence counts as cached
        n_past = b.engine.n_past
        (ta, ua), (tb, ub) = chat_turns(a, 1, start=3)[0], chat_turns(b, 1, start=3)[0]
        assert ta == tb and ua == ub
        assert ub["prompt_tokens_details"]["cached_tokens"] == n_past
        assert [p for p in b.engine.cell_positions() if p >= 0] == llama_cell_positions(b.engine.ctx)


RESUME = textwrap.dedent(
    """
    import json, sys
    from pymorph_edge import EngineConfig, Llama
    from test_sessions import chat_turns
    path, session, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    with Llama(path, kv_budget=128, config=EngineConfig(n_ubatch=32)) as llm:
        if mode == "save":
            chat_turns(llm, 3)
            llm.save_session(session)
            print(json.dumps(None))
        else:
            if mode == "load":
                llm.load_session(session)
                answers = chat_turns(llm, 1, start=3)
            else:
                answers = chat_turns(llm, 4)[3:]
            print(json.dumps(answers[0]))
    """
)


def run_py(*args):
    tests_dir = os.path.dirname(__file__)
    r = subprocess.run(
        [sys.executable, "-c", RESUME, *args], capture_output=True, text=True, timeout=300, cwd=tests_dir
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_saved_chat_resumes_in_a_new_process_token_identical(gqa_model, tmp_path):
    session = tmp_path / "chat.session"
    run_py(gqa_model, str(session), "save")
    text, usage = run_py(gqa_model, str(session), "load")
    uninterrupted_text, uninterrupted_usage = run_py(gqa_model, str(session), "straight")
    assert text == uninterrupted_text
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    assert usage["prompt_tokens_details"]["cached_tokens"] > usage["prompt_tokens"] / 2  # turns 1-3 were not redone
    assert usage == uninterrupted_usage


def test_session_size_is_set_by_the_budget_not_the_conversation(gqa_model, tmp_path):
    """Apart from the recall log (token ids, bounded by recall_log_bytes: tested below), the size is the budget's."""

    def without_log(llm, path):
        size = llm.save_session(path)
        return size - len(base64.b64encode(bytes(llm.stats.recall_log_bytes)))

    with Llama(gqa_model, **CFG) as llm:
        chat_turns(llm, 20, tokens=20)
        size_20 = without_log(llm, tmp_path / "a")
        chat_turns(llm, 180, start=20, tokens=20)
        size_200 = without_log(llm, tmp_path / "b")
    assert abs(size_200 - size_20) / size_20 < 0.05, (size_20, size_200)


def test_the_recall_log_in_a_session_is_bounded_by_its_setting(gqa_model, tmp_path):
    with Llama(gqa_model, kv_budget=128, config=EngineConfig(n_ubatch=32, recall_log_bytes=4096)) as llm:
        chat_turns(llm, 60, tokens=20)
        assert llm.stats.recall_log_bytes <= 4096
        size = llm.save_session(tmp_path / "a")
        chat_turns(llm, 60, start=60, tokens=20)
        assert abs(llm.save_session(tmp_path / "b") - size) / size < 0.05


@pytest.fixture()
def saved(gqa_model, tmp_path):
    path = tmp_path / "s.session"
    with Llama(gqa_model, **CFG) as llm:
        chat_turns(llm, 2)
        llm.save_session(path)
    return path


def assert_untouched(llm, before):
    """The running conversation is as it was: same cache, and it still continues."""
    assert llm.engine.history.fingerprint() == before and llm.has_conversation


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(kv_budget=160, config=EngineConfig(n_ubatch=32)), "kv_budget=128"),
        (dict(kv_budget=128, policy="tova", config=EngineConfig(n_ubatch=32)), "policy="),
        (dict(kv_budget=128, window=16, config=EngineConfig(n_ubatch=32)), "policy="),
        (dict(kv_budget=128, config=EngineConfig(n_ubatch=64)), "n_ubatch=32"),
        # flash attention stores V untransposed: llama.cpp's state would not fit
        (dict(kv_budget=128, config=EngineConfig(n_ubatch=32, flash_attn=True)), "kv_cache="),
    ],
)
def test_a_session_for_another_setup_is_refused_and_nothing_changes(gqa_model, saved, other, message):
    with Llama(gqa_model, **other) as llm:
        chat_turns(llm, 1, start=50)
        before = llm.engine.history.fingerprint()
        with pytest.raises(ValueError, match=message):
            llm.load_session(saved)
        assert_untouched(llm, before)


def test_a_session_for_another_model_is_refused(mha_model, saved):
    with Llama(mha_model, **CFG) as llm:
        with pytest.raises(ValueError, match="saved with model 'gqa.gguf'"):
            llm.load_session(saved)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d[: len(d) // 2], "checksum"),
        (lambda d: d[:-1], "checksum"),
        (lambda d: d[:20], "checksum|truncated"),
        (lambda d: b"GGUF" + d[4:], "bad magic"),
        (lambda d: d[:200] + bytes([d[200] ^ 0xFF]) + d[201:], "checksum"),
        (lambda d: b"", "bad magic"),
    ],
)
def test_a_damaged_session_file_is_a_clear_error_and_nothing_changes(gqa_model, saved, damage, message):
    saved.write_bytes(damage(saved.read_bytes()))
    with Llama(gqa_model, **CFG) as llm:
        chat_turns(llm, 1, start=50)
        before = llm.engine.history.fingerprint()
        with pytest.raises(ValueError, match=message):
            llm.load_session(saved)
        assert_untouched(llm, before)


def test_a_missing_session_file_is_file_not_found(gqa_model, tmp_path):
    with Llama(gqa_model, **CFG) as llm:
        with pytest.raises(FileNotFoundError, match="nope.session"):
            llm.load_session(tmp_path / "nope.session")


def test_a_crash_mid_save_leaves_the_old_file_whole(gqa_model, saved, monkeypatch):
    old = saved.read_bytes()
    with Llama(gqa_model, **CFG) as llm:
        chat_turns(llm, 1, start=60)

        def crash(*_a):
            raise OSError("disk gone")

        monkeypatch.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="disk gone"):
            llm.save_session(saved)
    assert saved.read_bytes() == old and old.startswith(MAGIC)
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temp file left behind


def test_continue_chat_without_a_conversation_is_a_clear_error(gqa_model):
    with Llama(gqa_model, **CFG) as llm:
        with pytest.raises(ValueError, match="no conversation to continue"):
            llm.continue_chat([{"role": "user", "content": "hi"}])


def test_cli_chat_session_resumes_after_a_restart(gqa_model, tmp_path):
    session = tmp_path / "cli.session"

    def chat(lines):
        r = subprocess.run(
            [sys.executable, "-m", "pymorph_edge.cli", "chat", "-m", gqa_model, "--kv-budget", "128"]
            + ["--session", str(session), "--temperature", "0", "-n", "30"],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        return r.stderr

    first = chat(["hello", "tell me more"])
    assert "resumed" not in first and session.exists()
    second = chat(["and then?"])
    assert "resumed" in second
    turn = [ln for ln in second.splitlines() if ln.startswith("[turn 1]")][0]
    fields = dict(kv.split("=") for kv in turn.split()[2:] if "=" in kv)
    assert int(fields["cached"]) > int(fields["prompt"]) / 2  # the first run's turns were not decoded again


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2_path", "gemma_path"])
def test_real_models_restore_into_llama_cpps_cells_and_continue_identically(model, request):
    # SmolLM2: one global cache; Gemma 3: iSWA, whose sliding-window cache is restored alongside
    path = request.getfixturevalue(model)
    budget = 640 if model == "gemma_path" else 256  # Gemma's budget must exceed its 512-token window
    cfg = dict(kv_budget=budget, config=EngineConfig(n_ubatch=128))
    story = "Tell me a long story about a lighthouse keeper and the sea. " * 40  # past the budget: evictions
    with Llama(path, **cfg) as a, Llama(path, **cfg) as b:
        kw = dict(
            max_tokens=160, temperature=0, logit_bias={t: -1e9 for t in range(a.n_vocab()) if a.is_end_of_generation(t)}
        )
        a.create_chat_completion([{"role": "user", "content": story}], **kw)
        a.continue_chat([{"role": "user", "content": "Go on."}], **kw)
        assert a.stats.tokens_evicted > 0
        b.load_state(a.save_state())
        assert [p for p in b.engine.cell_positions() if p >= 0] == llama_cell_positions(b.engine.ctx)
        kw["max_tokens"] = 24
        ra = a.continue_chat([{"role": "user", "content": "And then?"}], **kw)
        rb = b.continue_chat([{"role": "user", "content": "And then?"}], **kw)
        assert ra["choices"][0]["message"]["content"] == rb["choices"][0]["message"]["content"]
        assert rb["usage"]["prompt_tokens_details"]["cached_tokens"] > 300


def test_h2o_sessions_from_before_forget_read_as_the_plain_sum():
    from pymorph_edge.policies import make_policy
    from pymorph_edge.sessions.session_file import mismatch, policy_identity

    old = {"name": "h2o", "window": 64, "aggregate": "mean"}  # written before H2O had `forget`
    running = {"model": None, "policy": None, "kv_budget": 128, "n_ctx": 256, "n_ubatch": 32, "kv_cache": None}
    saved = {**running, "policy": old, "kv_cache": {"type_k": "f16", "type_v": "f16", "flash_attn": False}}
    running["kv_cache"] = saved["kv_cache"]
    plain = policy_identity(make_policy("h2o", window=64, forget=1.0))
    assert mismatch(saved, {**running, "policy": plain}) is None
    faded = policy_identity(make_policy("h2o", window=64, forget=0.99))
    assert "policy=" in mismatch(saved, {**running, "policy": faded})


def test_morphkv_sessions_from_before_pool_decode_read_as_pooling_at_every_step():
    import dataclasses

    from pymorph_edge.policies import make_policy
    from pymorph_edge.sessions.session_file import mismatch, policy_identity

    old = policy_identity(make_policy("morphkv", pool_decode=True))
    del old["pool_decode"]  # written before MorphKV had `pool_decode`: it pooled at every decode step
    cache = {"type_k": "f16", "type_v": "f16", "flash_attn": False}
    running = {"model": None, "policy": None, "kv_budget": 128, "n_ctx": 256, "n_ubatch": 32, "kv_cache": cache}
    saved = {**running, "policy": old}
    pooled = policy_identity(make_policy("morphkv", pool_decode=True))
    assert mismatch(saved, {**running, "policy": pooled}) is None
    default = policy_identity(make_policy("morphkv"))
    assert not dataclasses.asdict(make_policy("morphkv"))["pool_decode"]
    assert "policy=" in mismatch(saved, {**running, "policy": default})
