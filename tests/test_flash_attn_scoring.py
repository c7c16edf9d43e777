"""Scoring with flash attention on (native/pme_fattn.c), and quantized KV caches under a budget.

With flash attention on there is no kq_soft_max node: the scorer recomputes the attention rows from the
FLASH_ATTN_EXT node's Q, K and mask. These tests pin that the recomputation is the model's own attention
(the node's output rebuilt from it), that it scores as the softmax path does, and that quantized caches
keep the ceiling with exact byte counts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pymorph_edge import Llama
from pymorph_edge.bench.passkey import answer, filler_repeats_for, make_case
from pymorph_edge.engine.engine_config import FLASH_ATTN_WHEN_BOUNDED, EngineConfig
from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

PROMPT = [(i * 7919) % 200 + 10 for i in range(300)]


@pytest.fixture(scope="module")
def wide_gqa(synthetic_dir):
    """GQA with 32-wide heads, so that q8_0/q4_0 blocks fit (the session fixtures' heads are 8 and 16 wide)."""
    return str(write_synthetic_llama(synthetic_dir / "gqa-wide.gguf", n_head=8, n_head_kv=2, n_embd=256))


@pytest.fixture(scope="module")
def one_layer_gqa(synthetic_dir):
    """One layer: Q and K depend only on the tokens, so flash attention on and off see identical inputs."""
    return str(write_synthetic_llama(synthetic_dir / "gqa-1l.gguf", n_head=8, n_head_kv=2, n_embd=256, n_layer=1))


def _run(path: str, budget: int = 64, n: int = 30, check_mode: bool = True, **cfg):
    llm = Llama(path, kv_budget=budget, config=EngineConfig(n_ubatch=32, **cfg))
    check = llm.engine.scorer.fattn_check(check_mode)
    out = list(itertools.islice(llm.generate(PROMPT, temp=0.0), n))
    check = llm.engine.scorer.fattn_check(False)
    result = {
        "tokens": out,
        "scores": np.array(llm.engine.scorer.scores()),
        "kept": sorted(p for p in llm.engine.scorer.cell_positions() if p >= 0),
        "check": check,
        "stats": llm.stats,
    }
    llm.close()
    return result


@pytest.mark.parametrize("type_k", ["f16", "q8_0"])
@pytest.mark.parametrize("check_mode", [True, False], ids=["group-by-group", "decode-all-groups-at-once"])
def test_flash_attention_scores_match_the_softmax_path(one_layer_gqa, check_mode, type_k):
    """Flash attention on vs off over a real decode with evictions: the same tokens, per-cell scores within 1e-3
    relative, and the same keep-set. Check mode recomputes a decode step one KV group at a time; without it every
    group's row is computed in one parallel region (pme_fattn.c attn_decode): both must score alike. A q8_0 K is
    multiplied by the q8_0-rounded query in integers (pme_kdotq.c kdotq_q8_0), as llama.cpp's softmax path does."""
    off = _run(one_layer_gqa, flash_attn=False, type_k=type_k)
    on = _run(one_layer_gqa, check_mode=check_mode, flash_attn=True, type_k=type_k)
    assert on["tokens"] == off["tokens"]
    live = off["scores"] > 1e-6
    rel = np.abs(on["scores"][live] - off["scores"][live]) / off["scores"][live]
    assert rel.max() <= 1e-3, rel.max()
    assert on["kept"] == off["kept"]
    assert on["stats"].tokens_evicted == off["stats"].tokens_evicted > 0


@pytest.mark.parametrize("type_k", ["f16", "q8_0"])
def test_rows_folded_as_they_are_made_score_bit_for_bit_as_whole_groups(wide_gqa, type_k):
    """The default flash-attention path folds a prompt chunk's rows as each is made (pme_fattn.c attn_chunk) and a
    decode step's groups in one parallel region (attn_decode); check mode keeps every row of a group and folds it
    afterwards (pme_scores.c). Same adds in the same order: identical floats, tokens and keep-set, on a model with
    several layers and two KV groups."""
    whole = _run(wide_gqa, check_mode=True, flash_attn=True, type_k=type_k)
    fused = _run(wide_gqa, check_mode=False, flash_attn=True, type_k=type_k)
    assert fused["tokens"] == whole["tokens"]
    assert np.array_equal(fused["scores"], whole["scores"])
    assert fused["kept"] == whole["kept"]
    assert fused["stats"].tokens_evicted == whole["stats"].tokens_evicted > 0


def test_softmax_rows_recomputed_the_flash_attention_way(wide_gqa):
    """The same arithmetic run on the softmax path's own Q and K (check mode) reproduces kq_soft_max, on every
    layer of every decode: the two paths differ only in where Q and K come from."""
    c = _run(wide_gqa, flash_attn=False)["check"]
    assert c["nodes"] >= 2 * 30
    assert c["max_rel"] <= 1e-3 and c["max_abs"] <= 1e-4, c


def test_quantized_cache_bytes_are_exact(wide_gqa):
    """kv_bytes counts blocks exactly: q8_0 stores 34 bytes per 32 elements, q4_0 18, f16 64."""
    sizes = {}
    for t in ("f16", "q8_0", "q4_0"):
        with Llama(wide_gqa, kv_budget=64, type_k=t, type_v=t) as llm:
            sizes[t] = llm.stats.kv_bytes
            # a quantized V turns it on; f16 follows the measured default for a budget
            assert llm.engine.flash_attn == (t != "f16" or FLASH_ATTN_WHEN_BOUNDED)
    assert sizes["q8_0"] * 64 == sizes["f16"] * 34
    assert sizes["q4_0"] * 64 == sizes["f16"] * 18
    with Llama(wide_gqa, kv_budget=64, type_k="q8_0", flash_attn=False) as llm:  # a quantized K alone: no FA needed
        assert not llm.engine.flash_attn
        assert llm.stats.kv_bytes * 128 == sizes["f16"] * (34 + 64)


@pytest.mark.slow
def test_gemma_scores_the_same_both_ways_and_q8_keeps_a_passkey(gemma_path):
    """Gemma 3 (iSWA: only the 3 global layers are scored) at budget 1024 with a prompt of 2x the budget: the
    flash-attention arithmetic reproduces the softmax path's rows on the same Q and K; with flash attention on and
    a q8_0 cache the node's output is rebuilt from the rows, the key is still answered, and kv_bytes halves."""
    results = {}
    for name, cfg in {
        "softmax": {"flash_attn": False},
        "q8_0": {"flash_attn": True, "type_k": "q8_0", "type_v": "q8_0"},
    }.items():
        with Llama(gemma_path, kv_budget=1024, **cfg) as llm:
            llm.engine.scorer.fattn_check(True)
            case = make_case(filler_repeats_for(llm, 2 * 1024 + 200), 0.3, 101)
            ok, text = answer(llm, case)
            results[name] = (ok, llm.engine.scorer.fattn_check(False), llm.stats)
            assert ok, (name, text)
            assert llm.stats.peak_cells <= 1024 + 512
    soft, q8 = results["softmax"][1], results["q8_0"][1]
    assert soft["nodes"] > 0 and soft["max_rel"] <= 1e-3, soft
    assert q8["nodes"] > 0 and q8["max_abs"] <= 5e-3 * q8["max_ref"], q8
    ratio = results["q8_0"][2].kv_bytes / results["softmax"][2].kv_bytes
    assert ratio == pytest.approx(34 / 64)


def test_a_quantized_flash_attention_session_restores_and_continues(wide_gqa):
    """Sessions carry the cache in its own types: a q8_0 cache with flash attention on saves, restores into
    cells 0..n-1 as llama.cpp lays them out, and the next turn is token-identical."""
    from kv_introspect import llama_cell_positions
    from test_sessions import chat_turns

    kw = dict(kv_budget=128, type_k="q8_0", type_v="q8_0", config=EngineConfig(n_ubatch=32))
    with Llama(wide_gqa, **kw) as a, Llama(wide_gqa, **kw) as b:
        chat_turns(a, 3)
        assert a.stats.tokens_evicted > 0 and a.engine.flash_attn
        b.load_state(a.save_state())
        assert [p for p in b.engine.cell_positions() if p >= 0] == llama_cell_positions(b.engine.ctx)
        assert chat_turns(a, 1, start=3) == chat_turns(b, 1, start=3)
    with Llama(wide_gqa, kv_budget=128, config=EngineConfig(n_ubatch=32)) as f16, Llama(wide_gqa, **kw) as q8:
        chat_turns(q8, 1)
        with pytest.raises(ValueError, match="kv_cache="):
            f16.load_state(q8.save_state())


@pytest.mark.parametrize(
    "k_name,view_of,layer",
    [
        ("cache_k_l7 (view)", "cache_k_l7", 7),  # the K view llama.cpp hands the node, on the cache's own backend
        ("CUDA0#cache_k_l3 (view)#0", None, 3),  # the scheduler's copy: the node ran on a GPU, the cache on the host
        ("Metal#cache_k_l12 (view)#1", None, 12),
        ("CUDA0#Kcur-3#0", None, -1),  # a copy of something that is not a cache layer's K
        ("cache_v_l3 (view)", "cache_v_l3", -1),
    ],
)
def test_a_flash_attention_node_is_read_whichever_backend_runs_it(k_name, view_of, layer):
    """On the H200 (stop 43, a CUDA build of llama-cpp-python) a flash attention node that the scheduler moved to
    the GPU while its layer's cache stayed in host memory had a copy of the K view as its source, so its layer was
    not recognised and every decode failed with 'no attention node ... was read'
    (benchmarks/results/gpu-h200-fattn-layer-name)."""
    from pymorph_edge._native import native

    ffi, lib = native()
    assert lib.pme_test_fattn_layer(k_name.encode(), view_of.encode() if view_of else ffi.NULL) == layer
