"""The native cell -> position map agrees with llama.cpp's own record, through evictions and refills."""

import random

from kv_introspect import llama_cell_positions

from pymorph_edge import EngineConfig, Llama


def native_positions_in_cell_order(llm):
    return [p for p in llm.engine.cell_positions() if p >= 0]


def test_map_matches_llama_after_evictions_and_hole_filling(gqa_model):
    rng = random.Random(0)
    with Llama(gqa_model, kv_budget=128, window=8, config=EngineConfig(n_ubatch=32)) as llm:
        eng = llm.engine
        eng.reset()
        eng.decode([rng.randrange(3, 259) for _ in range(200)])  # 7 chunks, evicting after each
        assert native_positions_in_cell_order(llm) == llama_cell_positions(eng.ctx)
        evicted_before = llm.stats.tokens_evicted
        assert evicted_before == 200 - 128
        for _ in range(150):  # one token per step: each lands in a hole left by an eviction
            eng.decode([rng.randrange(3, 259)])
        cells = eng.cell_positions()
        assert native_positions_in_cell_order(llm) == llama_cell_positions(eng.ctx)
        live = sorted(p for p in cells if p >= 0)
        assert len(live) == 128 and len(set(live)) == 128
        assert live[-8:] == list(range(342, 350))  # the window is the newest 8 positions
        # new tokens reused freed cells instead of growing past the budget + one ubatch
        assert max(i for i, p in enumerate(cells) if p >= 0) < 128 + 32


def test_positions_only_grow_past_n_ctx(mha_model):
    with Llama(mha_model, kv_budget=64, window=4, config=EngineConfig(n_ubatch=16)) as llm:
        eng = llm.engine
        eng.decode(list(range(3, 3 + 50)))
        for i in range(600):
            eng.decode([3 + i % 250])
        assert eng.next_pos == 650 > eng.n_ctx
        assert max(eng.cell_positions()) == 649
        assert llm.stats.cells_in_use == 64
