"""What scoring would cost a backend whose buffers are not host memory (CUDA, Metal, RPC): the device->host bytes
the scorer copies and the graph nodes it asks for, counted per decode step and per prompt chunk (llm.stats).

No such backend runs here, so the non-host path is driven on the CPU backend by a test hook that reads every
tensor through ggml_backend_tensor_get, as it would a GPU's: the tokens, the cell map and the scores must be
those of the in-place run, and the counters must show what crossed."""

from __future__ import annotations

import itertools

import pytest

from pymorph_edge import Llama
from pymorph_edge.engine.engine_config import EngineConfig

PROMPT = [(i * 7919) % 200 + 10 for i in range(100)]
N_HEAD, N_LAYER = 8, 2  # the wide GQA model below


@pytest.fixture(scope="module")
def gqa(synthetic_dir):
    from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

    return str(write_synthetic_llama(synthetic_dir / "gqa-counters.gguf", n_head=N_HEAD, n_head_kv=2, n_embd=256))


def _run(path: str, copy: bool, flash_attn: bool = False, policy: str = "morphkv", n: int = 20) -> dict:
    llm = Llama(path, kv_budget=48, policy=policy, config=EngineConfig(n_ubatch=32, flash_attn=flash_attn))
    llm.engine.scorer.force_copy(copy)
    out = list(itertools.islice(llm.generate(PROMPT, temp=0.0), n))
    result = {
        "tokens": out,
        "kept": sorted(p for p in llm.engine.scorer.cell_positions() if p >= 0),
        "scores": llm.engine.scorer.scores(),
        "stats": llm.stats,
    }
    llm.close()
    return result


@pytest.mark.parametrize("flash_attn", [False, True])
def test_the_copy_path_scores_as_the_in_place_path(gqa, flash_attn):
    """Reading every tensor through the backend API changes nothing the scorer decides."""
    host = _run(gqa, copy=False, flash_attn=flash_attn)
    copied = _run(gqa, copy=True, flash_attn=flash_attn)
    assert copied["tokens"] == host["tokens"]
    assert copied["kept"] == host["kept"]
    assert copied["scores"] == host["scores"]
    assert host["stats"].tokens_evicted > 0  # the run did evict


def test_host_buffers_copy_nothing_and_each_scored_layer_is_one_sync(gqa):
    s = _run(gqa, copy=False)["stats"]
    assert s.decode_d2h_bytes == 0 and s.prompt_d2h_bytes == 0
    # 100 prompt tokens in 32-token ubatches (4 chunks, the last one 4 tokens); the answer's first token comes from
    # the prompt's logits, so 19 of the 20 tokens are decoded one at a time
    assert s.prompt_chunks == 4 and s.decode_steps == 19
    assert s.syncs_per_decode_step == N_LAYER  # one attention node per scored layer
    assert s.syncs_per_prompt_chunk == N_LAYER


def test_a_policy_that_reads_no_attention_asks_for_no_node(gqa):
    """StreamingLLM reads no attention: nothing is asked for, and only the cell map's inputs cross, the cell index
    (an int64) of each token written."""
    s = _run(gqa, copy=True, policy="streaming")["stats"]
    assert s.decode_syncs == 0 and s.prompt_syncs == 0
    assert s.decode_d2h_bytes == 8 * s.decode_steps
    assert s.prompt_d2h_bytes == 8 * len(PROMPT)


def test_the_counters_show_what_a_non_host_backend_would_copy(gqa):
    """Flash attention off, every decode step copies each scored layer's whole softmax (n_kv x n_head floats):
    today's cost, which on-backend scoring is meant to cut (issue 21)."""
    s = _run(gqa, copy=True)["stats"]
    assert s.decode_d2h_bytes > 0 and s.prompt_d2h_bytes > 0
    # at least the live cells' attention from every head of every layer, as f32
    assert s.d2h_bytes_per_decode_step >= N_LAYER * N_HEAD * 4 * 48
    assert s.d2h_bytes_per_prompt_chunk > s.d2h_bytes_per_decode_step


def test_counters_restart_with_the_cache(gqa):
    llm = Llama(gqa, kv_budget=48, config=EngineConfig(n_ubatch=32))
    list(itertools.islice(llm.generate(PROMPT, temp=0.0), 3))
    assert llm.stats.decode_steps > 0
    llm.reset()
    s = llm.stats
    assert (s.decode_steps, s.decode_syncs, s.prompt_chunks, s.prompt_syncs) == (0, 0, 0, 0)
    llm.close()


def test_flash_attention_fetches_only_the_new_keys_once_the_mirror_holds_the_rest(gqa):
    """With flash attention on, the scorer recomputes attention from Q and K. A decode step copies each layer's
    query rows and the one K row it wrote (the host mirror holds the others), plus the mask once for all layers:
    not the K view of every layer, as it did before (native/pme_kmirror.c)."""
    r = _run(gqa, copy=True, flash_attn=True)
    s = r["stats"]
    d, n_head_kv = 256 // N_HEAD, 2
    q_bytes, k_row = N_HEAD * d * 4, n_head_kv * d * 2
    n_cells = s.n_ctx
    # per layer: Q and the new K row (the key log reads that row again); once: the mask row (<= n_cells f16) and
    # the cell index
    bound = N_LAYER * (q_bytes + 2 * k_row) + n_cells * 2 + 8
    assert 0 < s.d2h_bytes_per_decode_step <= bound, (s.d2h_bytes_per_decode_step, bound)
    k_view = N_LAYER * n_cells * k_row  # what a step copied before: the K view of every layer (n_kv = all cells)
    assert s.d2h_bytes_per_decode_step < k_view / 10
