"""Selection rules of the baseline policies on synthetic attention, and every policy end to end."""

import llama_cpp.llama_cpp as C
import numpy as np
import pytest
from native_helpers import NativeState

from pymorph_edge import EngineConfig, Llama
from pymorph_edge._native import native
from pymorph_edge.policies import POLICIES, make_policy

_, LIB = native()
H2O, TOVA, SNAPKV, STREAMING = LIB.PME_POLICY_H2O, LIB.PME_POLICY_TOVA, LIB.PME_POLICY_SNAPKV, LIB.PME_POLICY_STREAMING


def state(policy, **kw):
    kw.setdefault("window", 1)
    return NativeState(policy=policy, **kw)


def row(values, n_kv=16):
    a = np.zeros((1, 1, n_kv), dtype=np.float32)
    for c, v in values.items():
        a[0, 0, c] = v
    return a


def two_steps(policy, **kw):
    # step 1: cell 0 gets a spike (0.9); step 2: cell 1 gets 0.5 and cell 0 nothing. Others stay busy.
    st = state(policy, budget=7, window=1, **kw)
    st.set_cells(list(range(8)) + [-1] * 8)
    busy = {c: 1.0 for c in range(2, 7)}
    st.step(row({0: 0.9, **busy}), [6], prefill=False)
    st.step(row({1: 0.5, **busy}), [7], prefill=False)
    victims = st.select(next_pos=8)
    st.close()
    return victims


def test_h2o_accumulates_and_tova_looks_only_at_the_current_token():
    assert two_steps(H2O) == [1]  # cumulative: cell 0 (0.9) outranks cell 1 (0.5)
    assert two_steps(TOVA) == [0]  # current token ignores cell 0


def test_h2o_forget_fades_old_attention():
    # 0.9 faded once by 0.5 is 0.45 < 0.5: the spike of the step before no longer outranks cell 1
    assert two_steps(H2O, forget=0.5) == [0]
    assert two_steps(H2O, forget=0.6) == [1]  # 0.54 > 0.5


def test_h2o_forget_fades_the_old_sum_once_per_token_of_a_prompt_chunk():
    st = state(H2O, budget=7, window=1, forget=0.5)
    st.set_cells(list(range(8)) + [-1] * 8)
    busy = {c: 1.0 for c in range(2, 7)}
    st.step(row({0: 1.0, **busy}), [5], prefill=False)
    chunk = np.zeros((1, 2, 16), dtype=np.float32)
    chunk[0, :, 2:7] = 1.0
    chunk[0, 0, 1] = 0.3
    st.step(chunk, [6, 7], prefill=1)
    # cell 0's 1.0 fades by 0.5 per token of the chunk: 0.25 < 0.3 (faded once per chunk it would be 0.5)
    assert st.select(next_pos=8) == [0]
    st.close()


def test_streaming_keeps_sinks_and_evicts_the_oldest_regardless_of_attention():
    st = state(STREAMING, budget=8, window=4, protect=4, n_sink=2)
    st.set_cells(list(range(12)) + [-1] * 4)
    victims = st.select(next_pos=12)
    assert victims == [2, 3, 4, 5]
    st.close()


def test_snapkv_compresses_only_at_the_end_of_the_prompt():
    st = state(SNAPKV, budget=6, window=2, protect=2, pool=1)
    st.set_cells(list(range(10)) + [-1] * 6)
    a = np.zeros((1, 4, 16), dtype=np.float32)
    a[0, 2:, 4] = 1.0  # the observation window (last 2 rows) attends cell 4
    st.step(a, [6, 7, 8, 9], prefill=1)  # a prompt chunk that is not the last: no eviction
    assert st.select(next_pos=10) == []
    st.step(a, [6, 7, 8, 9], prefill=3)  # last chunk: compress
    victims = st.select(next_pos=10)
    assert len(victims) == 4 and not {3, 4, 5} & set(victims)  # cell 4 and its pooled neighbours survive
    st.step(row({}), [10], prefill=0)  # generation: never evicts, the cache grows
    assert st.select(next_pos=11) == []
    st.close()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_runs_end_to_end(name, mha_model):
    run_policy_table_row(name, mha_model)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_runs_end_to_end_on_smollm2(name, smollm2_path):
    """The same table on a standard (all layers global) GQA model: 30 layers, 9 query / 3 KV heads."""
    run_policy_table_row(name, smollm2_path)


def run_policy_table_row(name, model):
    budget, ubatch = 256, 64
    policy = make_policy(name, **({"n_ctx": 2048} if name == "snapkv" else {}))
    kv_budget = None if name == "full" else budget
    with Llama(
        model,
        kv_budget=kv_budget,
        policy=policy,
        n_ctx=2048,
        # each token decoded once: recall inside the generation decodes more, counted in test_generation_recall.py
        config=None if name == "full" else EngineConfig(n_ubatch=ubatch, recall_in_generation=False),
    ) as llm:
        prompt = [3 + (i * 7) % 250 for i in range(600)]
        out = llm.create_completion(prompt, max_tokens=400, temperature=0, logit_bias={llm.token_eos(): -1e9})
        s = llm.stats
        assert out["usage"]["completion_tokens"] == 400
        assert s.tokens_decoded == 600 + 399
        if name == "full":
            assert s.tokens_evicted == 0 and s.cells_in_use == 999
        elif name == "snapkv":
            assert s.cells_in_use == budget + 399  # compressed once, then grew with the answer
            assert s.peak_cells == s.cells_in_use  # its peak is at the end of the answer, above the budget
        elif name == "context_shift":
            assert s.cells_in_use <= budget and s.tokens_evicted > 0
        else:
            assert s.cells_in_use == budget and s.peak_cells <= budget + ubatch
            assert s.tokens_evicted == 999 - budget


def test_unknown_policy_name_and_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="unknown policy 'context-shift'"):
        make_policy("context-shift")
    with pytest.raises(ValueError, match="n_sink must be an int >= 0"):
        make_policy("streaming", n_sink=-1)
    with pytest.raises(ValueError, match="bad parameters for policy 'tova'"):
        make_policy("tova", fusion="sum")


@pytest.mark.slow
def test_context_shift_runs_on_gemma_with_a_full_size_swa_cache(gemma_path):
    """llama.cpp shifts an iSWA cache only when both caches have the same size, so context shift asks for
    swa_full at n_ctx = kv_budget."""
    with Llama(gemma_path, kv_budget=1024, policy="context_shift") as llm:
        assert C.llama_memory_can_shift(llm.engine.mem)
        out = llm.create_completion(
            "Once upon a time", max_tokens=1200, temperature=0, logit_bias={llm.token_eos(): -1e9}
        )
        s = llm.stats
        assert out["usage"]["completion_tokens"] == 1200
        assert s.cells_in_use <= 1024 and s.tokens_evicted > 0 and s.next_pos <= 1024


def test_h2o_splits_the_budget_between_heavy_hitters_and_recent_tokens(mha_model):
    # the paper's split (10% heavy + 10% recent); an explicit window still wins
    with Llama(mha_model, kv_budget=64, policy="h2o") as llm:
        assert llm.policy.window == 32 and llm.policy.protected_recent == 32
    with Llama(mha_model, kv_budget=64, policy="h2o", window=8) as llm:
        assert llm.policy.protected_recent == 8
