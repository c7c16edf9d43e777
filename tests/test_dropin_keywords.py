"""llama_cpp keywords on the synthetic model (fast): each one does what it does there, or is refused by name."""

import pytest

from pymorph_edge import Llama


def test_verbose_true_writes_llama_cpps_log_to_stderr_and_false_silences_it(gqa_model, capfd):
    Llama(gqa_model, kv_budget=128, verbose=True).close()
    assert "llama_" in capfd.readouterr().err  # llama.cpp's own lines, as llama_cpp prints them
    Llama(gqa_model, kv_budget=128, verbose=False).close()
    assert "llama_" not in capfd.readouterr().err


def test_rope_freq_base_reaches_llama_cpp(gqa_model):
    outs = []
    for base in (0.0, 500.0):
        with Llama(gqa_model, kv_budget=None, n_ctx=256, rope_freq_base=base) as m:
            outs.append(m.create_completion("hello world hello", max_tokens=12, temperature=0)["choices"][0]["text"])
    assert outs[0] != outs[1]  # another RoPE base changes what the model computes


def test_model_name_tfs_z_and_swa_full(gqa_model):
    with Llama(gqa_model, kv_budget=128) as m:
        r = m.create_completion("hello", max_tokens=3, temperature=0, model="my-model", tfs_z=0.9)
        assert r["model"] == "my-model" and r["usage"]["completion_tokens"] == 3
    with pytest.raises(ValueError, match="swa_full=True would grow the sliding-window cache"):
        Llama(gqa_model, kv_budget=128, swa_full=True)
    with Llama(gqa_model, kv_budget=None, n_ctx=256, swa_full=True) as m:  # the full cache takes it, as llama_cpp
        assert m.n_ctx() == 256


def test_n_batch_caps_n_ubatch_and_n_ctx_zero_means_n_ctx_train(gqa_model):
    with Llama(gqa_model, n_ctx=0, n_batch=64) as m:
        assert m.n_batch == 64 and m.kv_budget == m.n_ctx_train - 64


def test_grammar_as_gbnf_text_and_seeded_reruns(gqa_model):
    with Llama(gqa_model, kv_budget=128) as m:
        r = m.create_completion("x", max_tokens=8, temperature=0.9, seed=5, grammar='root ::= "ab" | "cd"')
        assert r["choices"][0]["text"] in ("ab", "cd")
        a = m.create_completion("x", max_tokens=8, temperature=0.9, seed=5)["choices"][0]["text"]
        b = m.create_completion("x", max_tokens=8, temperature=0.9, seed=5)["choices"][0]["text"]
        assert a == b
