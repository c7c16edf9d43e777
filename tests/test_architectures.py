"""The layouts small instruction-tuned models ship in besides Llama's: Qwen2 (biased Q/K/V) and Qwen3 (Q and K
normed per head), both with NeoX RoPE. The scorer reads llama.cpp's attention nodes, which every architecture
builds the same way; these pin that the cell map, the full cache, flash-attention scoring and recall hold on them."""

import itertools

import llama_cpp
import pytest
from kv_introspect import llama_cell_positions
from test_full_cache_identity import ours, reference_tokens
from test_recall import ask_for_toms_code, recalled_text

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

ARCHS = ["qwen2", "qwen3"]
PROMPT = [(i * 7919) % 200 + 10 for i in range(300)]


@pytest.fixture(scope="module", params=ARCHS)
def model(request, synthetic_dir):
    arch = request.param
    return str(write_synthetic_llama(synthetic_dir / f"{arch}.gguf", n_head=8, n_head_kv=2, n_embd=256, arch=arch))


def test_the_arch_is_what_llama_cpp_loads(model):
    with Llama(model, kv_budget=64) as llm:
        assert llm.metadata["general.architecture"] in ARCHS


def test_full_cache_matches_llama_cpp(model, monkeypatch):
    from pymorph_edge.model.model_file import default_model_params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", default_model_params)
    toks, ref = reference_tokens(model, "hello world, " * 30, 48, 1024)
    assert ours(model, toks, 48, 1024) == ref


def test_cell_map_matches_llama_cpp_through_evictions(model):
    with Llama(model, kv_budget=96, window=8, config=EngineConfig(n_ubatch=32)) as llm:
        eng = llm.engine
        eng.decode(PROMPT[:200])
        for t in PROMPT[200:300]:
            eng.decode([t])
        assert [p for p in eng.cell_positions() if p >= 0] == llama_cell_positions(eng.ctx)
        assert llm.stats.tokens_evicted == 300 - 96 and llm.stats.peak_cells <= 96 + 32


def test_flash_attention_rows_are_the_models_softmax(model):
    """Check mode rebuilds each layer's attention rows from Q and K as the flash-attention path does, next to the
    softmax node llama.cpp computed: the normed or biased Q and K are the ones the node used."""
    llm = Llama(model, kv_budget=64, config=EngineConfig(n_ubatch=32, flash_attn=False))
    llm.engine.scorer.fattn_check(True)
    list(itertools.islice(llm.generate(PROMPT, temp=0.0), 30))
    c = llm.engine.scorer.fattn_check(False)
    llm.close()
    assert c["nodes"] >= 2 * 30
    assert c["max_rel"] <= 1e-3 and c["max_abs"] <= 1e-4, c


def test_morphkv_recalls_an_evicted_fact(model):
    with Llama(model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        s0 = ask_for_toms_code(llm)
        assert llm.stats.recalls == s0.recalls + 1 and llm.stats.peak_cells <= 128 + 64
        assert any("The code for Tom is 90517." in t for t in recalled_text(llm))
