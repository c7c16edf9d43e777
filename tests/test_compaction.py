"""Position compaction: the live positions are renumbered 0..n-1 in order, llama.cpp and the native map
agree, K is re-rotated correctly, and everything keyed by sequence index survives it."""

import random

import numpy as np
import pytest
from kv_introspect import llama_cell_positions

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.bench.common import last_logprobs
from pymorph_edge.engine.token_history import BLOCK
from pymorph_edge.policies import make_policy


def native_in_cell_order(eng):
    return [p for p in eng.cell_positions() if p >= 0]


def test_compaction_renumbers_in_order_and_generation_continues(gqa_model):
    rng = random.Random(1)
    with Llama(gqa_model, kv_budget=128, window=8, config=EngineConfig(n_ubatch=32, max_span=400)) as llm:
        eng = llm.engine
        eng.decode([rng.randrange(3, 259) for _ in range(200)])
        for _ in range(700):
            eng.decode([rng.randrange(3, 259)])
            assert eng.next_pos <= 400
        assert llm.stats.compactions >= 2 and eng.n_past == 900
        assert native_in_cell_order(eng) == llama_cell_positions(eng.ctx)
        tail = eng.history.tail(8)
        eng.compact()  # also by hand: afterwards the positions are exactly 0..n-1, in their old order
        live = sorted(native_in_cell_order(eng))
        assert live == list(range(128)) and eng.next_pos == 128
        assert native_in_cell_order(eng) == llama_cell_positions(eng.ctx)
        assert eng.live_from() <= 900 - 8  # the window is still whole
        assert eng.history.tail(8) == tail
        for _ in range(100):  # decoding goes on from the renumbered cache
            eng.decode([int(np.argmax(last_logprobs(llm)))])
        assert native_in_cell_order(eng) == llama_cell_positions(eng.ctx) and eng.next_pos == 228


def shifted_vs_plain(model, toks, budget, span, window=16):
    """Next-token probabilities with and without compaction, when nothing old is kept (StreamingLLM
    without sinks): the cache is always one contiguous run, so compaction is a pure shift."""
    runs = []
    for max_span in (None, span):
        policy = make_policy("streaming", n_sink=0, window=window)
        with Llama(model, kv_budget=budget, policy=policy, config=EngineConfig(n_ubatch=32, max_span=max_span)) as llm:
            eng = llm.engine
            eng.decode(toks[:64])
            rows, comps = [], []
            for t in toks[64:]:
                eng.decode([t])
                rows.append(np.exp(last_logprobs(llm)))
                comps.append(llm.stats.compactions)
            runs.append((np.array(rows), np.array(comps)))
    return runs[0][0], runs[1][0], runs[1][1]


def test_uniform_shift_leaves_logits_unchanged(gqa_model):
    """RoPE is relative, so a pure shift must predict as before, up to the rounding of the re-rotated f16 K
    (llama.cpp's own context shift differs from a plain decode by as much)."""
    rng = random.Random(2)
    a, b, comps = shifted_vs_plain(gqa_model, [rng.randrange(3, 259) for _ in range(700)], budget=96, span=300)
    assert comps[-1] >= 2
    diff = np.abs(a - b).max(axis=1)
    assert diff[comps == 0].max() == 0  # identical before the first compaction
    assert diff.mean() < 5e-3 and diff.max() < 5e-2, (diff.mean(), diff.max())
    assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() > 0.97


@pytest.mark.slow
def test_uniform_shift_on_gemma_iswa_cache(gemma_path):
    """llama.cpp reports an iSWA cache with a small sliding-window cache as unshiftable, yet each of its two
    caches applies llama_memory_seq_add and re-rotates its own K. Compaction relies on that: the recent
    n_swa tokens stay contiguous and keep their distances, so the sliding-window layers see no change."""
    from pymorph_edge.bench.task_longrun import long_text_tokens

    with Llama(gemma_path, kv_budget=None, n_ctx=512) as tok:
        toks = long_text_tokens(tok, 1700)
    a, b, comps = shifted_vs_plain(gemma_path, toks, budget=560, span=1400)
    assert comps[-1] >= 1
    diff = np.abs(a - b).max(axis=1)
    assert diff[comps == 0].max() == 0
    # llama.cpp's own K-shift of a swa_full Gemma cache by +1000 on this text: median max|dp| 0.017, top-1 96%;
    # a sliding-window cache left unshifted would leave its layers attending across the wrong distances
    after = diff[comps > 0]
    top1 = (a.argmax(axis=1) == b.argmax(axis=1))[comps > 0].mean()
    assert np.median(after) < 0.04 and top1 > 0.9, (np.median(after), top1)


def test_prefix_reuse_and_rollback_across_a_compaction(gqa_model):
    with Llama(gqa_model, kv_budget=128, window=8, config=EngineConfig(n_ubatch=32, max_span=400)) as llm:
        ban = {llm.token_eos(): -1e9}
        prompt = llm.tokenize("the cat sat on the mat " * 8)
        gen = llm.generate(prompt, temp=0, logit_bias=ban)
        out = [next(gen) for _ in range(600)]
        gen.close()
        assert llm.stats.compactions >= 1
        hist = prompt + out[:-1]  # the last sampled token was never decoded
        assert len(llm.engine.history) == len(hist) and llm.engine.history.tail(50) == hist[-50:]
        # extend what was generated: everything in the cache is reused
        cont = llm.create_completion(hist + [10, 11], max_tokens=5, temperature=0, logit_bias=ban)
        assert cont["usage"]["prompt_tokens_details"]["cached_tokens"] == len(hist)
        assert native_in_cell_order(llm.engine) == llama_cell_positions(llm.engine.ctx)
        # diverge 3 tokens back: the live tail is rolled back, not re-prefilled
        hist = hist + [10, 11]
        again = llm.create_completion(hist[:-3] + [12, 13], max_tokens=5, temperature=0, logit_bias=ban)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(hist) - 3
        assert native_in_cell_order(llm.engine) == llama_cell_positions(llm.engine.ctx)
        # a prompt that differs in the part only hashed cannot reuse anything
        other = llm.create_completion([hist[0] + 1] + hist[1:], max_tokens=2, temperature=0, logit_bias=ban)
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_history_memory_is_bounded(mha_model):
    with Llama(mha_model, kv_budget=64, window=4, config=EngineConfig(n_ubatch=16, max_span=400)) as llm:
        eng = llm.engine
        eng.decode(list(range(3, 53)))
        for i in range(3000):
            eng.decode([3 + i % 250])
        assert len(eng.history) == eng.n_past == 3050
        assert len(eng.history.tail(10**6)) < eng.n_ctx + 16 + BLOCK  # only a cache's worth is stored
        assert eng.history.common_prefix(list(range(3, 53)) + [3 + i % 250 for i in range(3000)]) == 3050
        assert eng.history.common_prefix([4] + list(range(4, 53)) + [3 + i % 250 for i in range(3000)]) == 0


def test_max_span_too_small_is_a_clear_error(mha_model):
    with pytest.raises(ValueError, match="max_span=200"):
        Llama(mha_model, kv_budget=128, config=EngineConfig(n_ubatch=32, max_span=200))
    with pytest.raises(ValueError, match="max_span"):
        EngineConfig(max_span=0)
