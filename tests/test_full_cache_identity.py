"""kv_budget=None is plain llama.cpp: greedy output is token-identical to llama_cpp.Llama."""

import llama_cpp
import pytest

from pymorph_edge import Llama


@pytest.fixture(autouse=True)
def same_model_params(monkeypatch):
    """llama_cpp.Llama loads with the model parameters we use (no AMX repacking where it crashes)."""
    from pymorph_edge.model.model_file import default_model_params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", default_model_params)


def reference_tokens(path, prompt, n, n_ctx):
    ref = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=2, verbose=False)
    toks = ref.tokenize(prompt.encode(), special=True)
    out = []
    for t in ref.generate(toks, temp=0, top_k=40, top_p=0.95, min_p=0.05):
        out.append(t)
        if len(out) == n:
            break
    ref.close()
    return toks, out


def ours(path, prompt_tokens, n, n_ctx):
    with Llama(path, kv_budget=None, n_ctx=n_ctx, n_threads=2) as llm:
        out = []
        for t in llm.generate(prompt_tokens, temp=0):
            out.append(t)
            if len(out) == n:
                break
    return out


def test_synthetic_full_cache_matches_llama_cpp(gqa_model):
    toks, ref = reference_tokens(gqa_model, "hello world, " * 30, 64, 1024)
    assert ours(gqa_model, toks, 64, 1024) == ref


@pytest.mark.slow
def test_gemma_full_cache_matches_llama_cpp(gemma_path):
    prompt = "The history of the lighthouse begins in ancient Egypt, where" * 20
    toks, ref = reference_tokens(gemma_path, prompt, 96, 2048)
    assert ours(gemma_path, toks, 96, 2048) == ref


@pytest.mark.slow
def test_gemma_completion_text_matches_llama_cpp(gemma_path):
    ref = llama_cpp.Llama(gemma_path, n_ctx=1024, n_threads=2, verbose=False)
    want = ref.create_completion("The lighthouse keeper", max_tokens=40, temperature=0)["choices"][0]["text"]
    ref.close()
    with Llama(gemma_path, kv_budget=None, n_ctx=1024, n_threads=2) as llm:
        got = llm.create_completion("The lighthouse keeper", max_tokens=40, temperature=0)["choices"][0]["text"]
    assert got == want
