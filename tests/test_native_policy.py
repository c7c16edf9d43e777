"""MorphKV selection rules in C, on synthetic attention rows."""

import numpy as np
import pytest
from native_helpers import NativeState


def row(n_kv, values, n_head=1):
    """One decode step's attention: (n_head, 1, n_kv) with values {cell: weight} on every head."""
    a = np.zeros((n_head, 1, n_kv), dtype=np.float32)
    for c, v in values.items():
        a[:, 0, c] = v
    return a


def fill(st, n):
    st.set_cells(list(range(n)) + [-1] * (st.n_cells - n))


def test_window_is_never_evicted():
    # 12 live cells, budget 4, window 4: all 8 excess must come from positions < next_pos - 4
    st = NativeState(n_cells=16, budget=4, window=4)
    fill(st, 12)
    # the recent window gets no attention at all, so it would go first if not protected
    st.step(row(16, {c: 1.0 for c in range(8)}), [11], prefill=False)
    victims = st.select(next_pos=12)
    assert len(victims) == 8
    assert all(p < 8 for p in victims)
    st.close()


def test_lowest_fused_scores_go_first():
    st = NativeState(n_cells=16, budget=9, window=4)
    fill(st, 12)
    scores = {0: 0.5, 1: 0.01, 2: 0.3, 3: 0.02, 4: 0.9, 5: 0.03, 6: 0.4, 7: 0.6}
    for p in range(8, 12):
        st.step(row(16, scores), [p], prefill=False)
    assert sorted(st.select(next_pos=12)) == [1, 3, 5]
    st.close()


def test_sum_and_max_fusion_differ():
    # cell 0: steady 0.3 over 4 rows (sum 1.2, max 0.3); cell 1: one spike 0.9 (sum 0.9, max 0.9)
    rows = [{0: 0.3, 1: 0.9, 2: 2.0, 3: 2.0}] + [{0: 0.3, 2: 2.0, 3: 2.0}] * 3
    picked = {}
    for fusion, name in ((0, "sum"), (1, "max")):
        st = NativeState(n_cells=16, budget=7, window=4, fusion=fusion)
        fill(st, 8)
        for i, r in enumerate(rows):
            st.step(row(16, r), [4 + i], prefill=False)
        picked[name] = st.select(next_pos=8)
        st.close()
    assert picked["sum"] == [1]
    assert picked["max"] == [0]


def test_window_rows_older_than_w_are_forgotten():
    # a spike on cell 1 in the first step falls out of a 2-row window after two more steps
    st = NativeState(n_cells=16, budget=7, window=2)
    fill(st, 8)
    st.step(row(16, {0: 0.1, 1: 5.0, 2: 1, 3: 1, 4: 1, 5: 1}), [5], prefill=False)
    st.step(row(16, {0: 0.1, 2: 1, 3: 1, 4: 1, 5: 1}), [6], prefill=False)
    st.step(row(16, {0: 0.1, 2: 1, 3: 1, 4: 1, 5: 1}), [7], prefill=False)
    assert st.select(next_pos=8) == [1]
    st.close()


def test_gqa_query_heads_are_summed_within_their_group():
    # 4 query heads, 2 KV heads: heads {0,1} share KV head 0, heads {2,3} share KV head 1.
    # cell 0 is attended by heads 0 and 1 (group sum 1.0); cell 1 by heads 1 and 2 (0.5 per group).
    # Under max-over-KV-heads aggregation only correct grouping ranks cell 0 above cell 1.
    st = NativeState(n_cells=16, budget=7, window=1, n_head=4, n_head_kv=2, aggregate=1)
    fill(st, 8)
    a = np.zeros((4, 1, 16), dtype=np.float32)
    a[0, 0, 0] = a[1, 0, 0] = 0.5
    a[1, 0, 1] = a[2, 0, 1] = 0.5
    a[:, 0, 2:7] = 1.0
    st.step(a, [7], prefill=False)
    assert st.select(next_pos=8) == [1]
    st.close()


def test_layers_combine_by_mean_or_max():
    # cell 0: 0.6 in one layer, 0 in the other (mean 0.3, max 0.6); cell 1: 0.4 in both (mean 0.4, max 0.4)
    l0 = row(16, {0: 0.6, 1: 0.4, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1})
    l1 = row(16, {1: 0.4, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1})
    out = {}
    for agg in (0, 1):
        st = NativeState(n_cells=16, budget=7, window=1, aggregate=agg)
        fill(st, 8)
        st.step([l0, l1], [7], prefill=False)
        out[agg] = st.select(next_pos=8)
        st.close()
    assert out[0] == [0] and out[1] == [1]


@pytest.mark.parametrize("decay", [0.95, 0.0])
def test_prefill_score_persists_across_chunks(decay):
    # chunk 1 attends cell 0 strongly once; chunk 2 never looks at it. With a persistent score
    # (decay > 0) cell 0 outlives the cells nobody attended; with decay 0 it is forgotten.
    st = NativeState(n_cells=32, budget=10, window=2, protect=2, decay=decay)
    fill(st, 12)
    a = np.zeros((1, 4, 32), dtype=np.float32)
    a[0, 0, 0] = 0.9
    a[0, 1:, 1:4] = 0.1
    st.step(a, [8, 9, 10, 11], prefill=True)
    b = np.zeros((1, 4, 32), dtype=np.float32)
    b[0, :, 5:12] = 0.1
    st.step(b, [12, 13, 14, 15], prefill=True)
    victims = sorted(st.select(next_pos=12))
    if decay > 0:
        assert victims == [1, 4]  # 4 was never attended; 1..3 tie at 0.095 and the oldest goes
    else:
        assert victims == [0, 1]
    st.close()


def test_invalid_config_is_rejected():
    from pymorph_edge._native import native

    ffi, lib = native()
    cfg = ffi.new("pme_config *")
    cfg.n_cells, cfg.budget, cfg.window, cfg.n_head, cfg.n_head_kv, cfg.n_layer, cfg.max_ubatch = 16, 8, 4, 3, 2, 1, 8
    err = ffi.new("char[256]")
    assert lib.pme_create(cfg, err, 256) == ffi.NULL
    assert "n_head=3" in ffi.string(err).decode()


def test_ubatch_larger_than_configured_is_an_error():
    st = NativeState()
    pos = st.ffi.new("int32_t[]", 65)
    assert st.lib.pme_begin_ubatch(st.st, pos, 65, 1) != 0
    assert "65" in st.error
    st.close()


@pytest.mark.parametrize("fusion", [0, 1])
def test_eviction_count_brings_cache_to_budget(fusion):
    rng = np.random.default_rng(0)
    st = NativeState(n_cells=64, budget=20, window=4, fusion=fusion)
    fill(st, 50)
    for p in range(46, 50):
        st.step(rng.random((1, 1, 64)).astype(np.float32), [p], prefill=False)
    victims = st.select(next_pos=50)
    assert len(victims) == 30 and len(set(victims)) == 30
    assert max(victims) < 46
    st.close()


SCORES = {0: 0.5, 1: 0.4, 2: 0.3, 3: 0.01, 4: 1.0, 5: 0.02, 6: 0.2, 7: 0.25}


@pytest.mark.parametrize("prompt_only", [1, 0])
def test_decode_steps_pool_only_when_asked(prompt_only):
    # cell 4 is what the window attends to most; pooling (radius 1) lends its score to cells 3 and 5,
    # which on their own are the two lowest. MorphKV pools at decode only with pool_decode=True.
    st = NativeState(n_cells=16, budget=6, window=2, pool=1, pool_prompt_only=prompt_only)
    fill(st, 10)
    for p in (8, 9):
        st.step(row(16, SCORES), [p], prefill=False)
    victims = set(st.select(next_pos=10))
    assert victims == ({3, 5, 6, 7} if prompt_only else {0, 2, 6, 7})
    st.close()


def test_prompt_evictions_pool_even_when_decode_steps_do_not():
    st = NativeState(n_cells=16, budget=6, window=2, pool=1, pool_prompt_only=1)
    fill(st, 10)
    chunk = np.concatenate([row(16, SCORES), row(16, SCORES)], axis=1)  # a 2-token prompt chunk at 8, 9
    st.step(chunk, [8, 9], prefill=True)
    victims = set(st.select(next_pos=10))
    assert victims == {0, 2, 6, 7}  # 3 and 5 ride on cell 4's score
    st.close()


def test_a_chunk_that_fills_the_window_scores_as_its_rows_summed():
    """A prompt chunk of at least W tokens writes the whole ring, and its rows are kept as suffix sums
    (native/pme_ring_group.c, so that on a device only the sum in use crosses). Each decode step after it must score
    what the plain ring of the last W rows scores, and a cell freed since the chunk keeps none of the rows it had."""
    w = 4
    st = NativeState(n_cells=16, budget=8, window=w)
    fill(st, 12)
    rng = np.random.default_rng(1)
    chunk = rng.random((1, 6, 16)).astype(np.float32)
    st.step(chunk, list(range(12, 18)), prefill=True)
    rows = [r.astype(np.float64) for r in chunk[0, -w:]]
    scores = st.ffi.new("float[]", 16)
    for k in range(w + 2):  # the chunk's rows roll out one a step, then none is left
        if k == 1:
            assert st.lib.pme_test_free_cell(st.st, 3) == 0
            for r in rows:
                r[3] = 0.0
        d = rng.random((1, 1, 16)).astype(np.float32)
        st.step(d, [18 + k], prefill=False)
        rows = (rows + [d[0, 0].astype(np.float64)])[-w:]
        st.select(next_pos=19 + k)
        assert st.lib.pme_test_scores(st.st, scores, 16) == 16
        np.testing.assert_allclose(np.frombuffer(st.ffi.buffer(scores), np.float32), np.sum(rows, axis=0), rtol=1e-6)
    st.close()


def _saved(st):
    n = st.lib.pme_session_size(st.st)
    buf = st.ffi.new("char[]", n)
    assert st.lib.pme_session_save(st.st, buf, n) == n
    return bytearray(st.ffi.buffer(buf, n))


def _scores_after_a_step(st, d):
    st.step(d, [30], prefill=False)
    st.select(next_pos=31)
    out = st.ffi.new("float[]", 16)
    st.lib.pme_test_scores(st.st, out, 16)
    return np.frombuffer(st.ffi.buffer(out), np.float32)[:12].copy()  # the live cells: a state saves only those


def test_a_scorer_state_keeps_the_windows_sums_and_version_1_states_still_load():
    """A state saved while a whole-window chunk's rows are still in the ring (version 2) carries their suffix sums:
    the loaded state scores the next step as the saved one. A version 1 state (before the sums; its group field was
    a reserved 0) still loads, and one that claims a group is refused, leaving the running state as it was."""
    rng = np.random.default_rng(2)
    a = NativeState(n_cells=16, budget=8, window=4)
    fill(a, 12)
    a.step(rng.random((1, 6, 16)).astype(np.float32), list(range(12, 18)), prefill=True)
    a.step(rng.random((1, 1, 16)).astype(np.float32), [18], prefill=False)  # 3 of the chunk's 4 rows left
    blob = _saved(a)
    version, grp_left = int.from_bytes(blob[4:8], "little"), int.from_bytes(blob[28:32], "little", signed=True)
    assert (version, grp_left) == (2, 3)
    b = NativeState(n_cells=16, budget=8, window=4)
    assert b.lib.pme_session_load(b.st, b.ffi.from_buffer(blob), len(blob)) == 0, b.error
    d = rng.random((1, 1, 16)).astype(np.float32)
    assert np.array_equal(_scores_after_a_step(a, d), _scores_after_a_step(b, d))
    # version 1: no group (four more steps roll the chunk's rows out), the version field set back
    for k in range(4):
        a.step(rng.random((1, 1, 16)).astype(np.float32), [31 + k], prefill=False)
    old = _saved(a)
    assert int.from_bytes(old[28:32], "little") == 0
    old[4:8] = (1).to_bytes(4, "little")
    c = NativeState(n_cells=16, budget=8, window=4)
    assert c.lib.pme_session_load(c.st, c.ffi.from_buffer(old), len(old)) == 0, c.error
    assert np.array_equal(_scores_after_a_step(a, d), _scores_after_a_step(c, d))
    bad = bytearray(blob)
    bad[4:8] = (1).to_bytes(4, "little")  # a version 1 state cannot hold a group
    assert c.lib.pme_session_load(c.st, c.ffi.from_buffer(bad), len(bad)) != 0
    assert "group 3" in c.error
    for s in (a, b, c):
        s.close()
