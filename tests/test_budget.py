"""The cache never holds more than kv_budget (+ n_ubatch while a prompt chunk is in)."""

import pytest

from pymorph_edge import EngineConfig, Llama


def generate_checking_ceiling(llm, prompt, n_tokens, ceiling):
    peak_seen = 0
    ban = {llm.token_eos(): -1e9}
    for i, _ in enumerate(llm.generate(prompt, temp=0, logit_bias=ban)):
        s = llm.stats
        assert s.cells_in_use <= ceiling, (i, s)
        peak_seen = max(peak_seen, s.cells_in_use)
        if i + 1 >= n_tokens:
            break
    return peak_seen


@pytest.mark.parametrize("model", ["mha_model", "gqa_model"])
def test_synthetic_generation_of_3x_budget_stays_within_budget(model, request):
    path = request.getfixturevalue(model)
    budget = 512
    # each decode step evicts one token; recall inside the generation, which decodes blocks as well, is counted in
    # tests/test_generation_recall.py
    with Llama(path, kv_budget=budget, config=EngineConfig(n_ubatch=64, recall_in_generation=False)) as llm:
        prompt = llm.tokenize("The quick brown fox. " * 3)
        assert len(prompt) < budget
        peak = generate_checking_ceiling(llm, prompt, 3 * budget, budget)
        s = llm.stats
        assert peak == budget  # it filled up to the budget and stayed there
        assert s.tokens_decoded == len(prompt) + 3 * budget - 1
        assert s.tokens_evicted == s.tokens_decoded - budget
        assert s.peak_cells == budget + 1  # one decoded token over the budget, evicted right after


def test_prompt_of_4x_budget_prefills_within_the_ceiling(gqa_model):
    budget, ubatch = 256, 64
    with Llama(gqa_model, kv_budget=budget, config=EngineConfig(n_ubatch=ubatch)) as llm:
        prompt = [3 + (i * 7) % 250 for i in range(4 * budget)]
        out = llm.create_completion(prompt, max_tokens=8, temperature=0)
        s = llm.stats
        assert out["usage"]["prompt_tokens"] == 4 * budget
        assert s.peak_cells <= budget + ubatch
        assert s.cells_in_use <= budget
        assert s.n_ctx == -(-(budget + ubatch) // 256) * 256  # the allocation itself is bounded (llama.cpp pads to 256)


def test_kv_bytes_do_not_depend_on_output_length(mha_model):
    with Llama(mha_model, kv_budget=128, config=EngineConfig(n_ubatch=32)) as a:
        before = a.stats.kv_bytes
        a.create_completion("x", max_tokens=400, temperature=0, logit_bias={a.token_eos(): -1e9})
        assert a.stats.kv_bytes == before
    with Llama(mha_model, kv_budget=None, n_ctx=4096) as full:
        assert full.stats.kv_bytes > 10 * before


@pytest.mark.slow
def test_gemma_generation_of_3x_budget_stays_within_budget(gemma_path):
    budget = 1024
    with Llama(gemma_path, kv_budget=budget) as llm:
        prompt = llm.tokenize("Write a very long story about a lighthouse.")
        peak = generate_checking_ceiling(llm, prompt, 3 * budget, budget)
        assert peak == budget
        assert llm.stats.tokens_evicted == llm.stats.tokens_decoded - budget
        assert llm.stats.next_pos > llm.stats.n_ctx


@pytest.mark.slow
def test_gemma_budget_below_sliding_window_is_refused(gemma_path):
    with pytest.raises(ValueError, match=r"kv_budget=512 .*n_swa \+ window = 544"):
        Llama(gemma_path, kv_budget=512)


def test_an_iswa_base_cache_is_never_as_large_as_its_sliding_window_cache():
    # the scorer tells the two caches apart by cell count (native/pme_callback.c refuses a tie)
    from pymorph_edge.engine.engine_config import _apart_from_swa_cache

    assert _apart_from_swa_cache(640 + 128, 512, 128) == 1024  # both would be 768 cells
    assert _apart_from_swa_cache(1024 + 512, 512, 512) == 1536  # 1536 vs 1024: already apart
    # two sequences in a unified cache (recall_kv_bytes): the window counts twice, and one step of 256 is not enough
    # (1280 would tie with pad(min(1280, 1024 + 512)) = 1280, and 1536 with 1536)
    assert _apart_from_swa_cache(640 + 512, 2 * 512, 512) == 1792
