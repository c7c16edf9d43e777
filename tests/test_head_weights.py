"""Per-head weights and the induction-head calibration they come from (native/pme_head_weights.c,
pymorph_edge/head_calibration.py)."""

import math

import numpy as np
import pytest
from native_helpers import NativeState

from pymorph_edge import Llama, MorphKV
from pymorph_edge.engine.head_calibration import copy_sequence, induction_scores


def two_head_attention(n_kv, cell_a, cell_b, n_tokens=1):
    """KV head 0 looks at cell_a, KV head 1 at cell_b (one query head each)."""
    a = np.full((2, n_tokens, n_kv), 0.01, dtype=np.float32)
    a[0, :, cell_a] = 0.9
    a[1, :, cell_b] = 0.9
    return a


def set_weights(st, w):
    buf = st.ffi.new("float[]", w)
    return st.lib.pme_set_head_weights(st.st, buf, len(w))


def muted_head_attention(n_kv, cell_a, cell_b):
    """KV head 0 spreads 0.05 over every cell but cell_b and 0.9 on cell_a; KV head 1 looks only at cell_b."""
    a = np.full((2, 1, n_kv), 0.05, dtype=np.float32)
    a[0, :, cell_a] = 0.9
    a[0, :, cell_b] = 0.0
    a[1, :, :] = 0.0
    a[1, :, cell_b] = 0.9
    return a


@pytest.mark.parametrize("prompt", [True, False])
def test_a_zero_weight_silences_its_head_in_prompt_ubatches_only(prompt):
    # cells 0..5 hold positions 0..5; budget 5 with window 1 evicts one of the older cells 0..4.
    # Head 1 (layer 0) is the only one attending cell 3: muted, cell 3 scores 0 and goes first.
    # Decode ubatches ignore the weights (they raised the KL to the full model on SmolLM2), so there
    # cell 3 keeps head 1's 0.9 and the victim is the oldest of the 0.05 cells.
    st = NativeState(n_cells=8, budget=5, window=1, n_head=2, n_head_kv=2)
    st.set_cells([0, 1, 2, 3, 4, 5, -1, -1])
    w = [1.0] * 8  # n_layer 4 x n_head_kv 2
    w[1] = 0.0
    assert set_weights(st, w) == 0
    st.step(muted_head_attention(8, 2, 3), [5], prefill=prompt)
    assert st.select(6) == ([3] if prompt else [0])


def test_uniform_weights_are_the_default_and_can_be_restored():
    st = NativeState(n_cells=8, budget=5, window=1, n_head=2, n_head_kv=2)
    assert set_weights(st, [0.0] * 8) == 0
    assert st.lib.pme_set_head_weights(st.st, st.ffi.NULL, 0) == 0  # back to uniform
    st.set_cells([0, 1, 2, 3, 4, 5, -1, -1])
    st.step(two_head_attention(8, 2, 3), [5], prefill=False)
    assert set(st.select(6)).isdisjoint({2, 3})


@pytest.mark.parametrize(
    "weights, message", [([1.0] * 7, "7 weights for 8"), ([1.0] * 7 + [math.nan], "weight 7 is nan")]
)
def test_bad_head_weights_are_refused(weights, message):
    st = NativeState(n_cells=8, budget=5, window=1, n_head=2, n_head_kv=2)
    assert set_weights(st, weights) == -1
    assert message in st.error


def test_calibration_measures_attention_on_each_rows_target():
    st = NativeState(n_cells=8, budget=8, window=1, n_head=2, n_head_kv=2)
    st.set_cells([0, 1, 2, 3, -1, -1, -1, -1])
    # two new rows at positions 4, 5; row 0 should copy position 1, row 1 position 2
    targets = st.ffi.new("int32_t[]", [1, 2])
    assert st.lib.pme_calibrate(st.st, targets, 2) == 0
    a = np.full((2, 2, 8), 0.0, dtype=np.float32)
    a[0, 0, 1], a[0, 1, 2] = 0.8, 0.6  # head 0: mean 0.7 on the targets
    a[1, 0, 1], a[1, 1, 2] = 0.1, 0.1  # head 1: 0.1
    st.set_cells([0, 1, 2, 3, 4, 5, -1, -1])
    st.step(a, [4, 5], prefill=True)
    out = st.ffi.new("float[]", 8)
    assert st.lib.pme_calibration_scores(st.st, out, 8) == 8
    assert out[0] == pytest.approx(0.7) and out[1] == pytest.approx(0.1)
    assert list(out)[2:] == [0.0] * 6  # layers never folded


def test_copy_sequence_targets_point_at_the_next_token_of_the_first_copy(gqa_model):
    with Llama(gqa_model, kv_budget=256, policy=MorphKV(head_weights="uniform")) as llm:
        tokens, targets = copy_sequence(llm.engine)
    half = (len(tokens) - 1) // 2
    assert tokens[1 : 1 + half] == tokens[1 + half :]
    for row, tgt in enumerate(targets):
        if tgt >= 0:
            assert tokens[tgt] == tokens[row + 1]  # what the head should copy is what comes next


@pytest.mark.slow
def test_smollm2_has_induction_heads_and_they_get_the_weight(smollm2_path):
    with Llama(smollm2_path, kv_budget=512) as llm:
        w = llm.engine.head_weights
        scores = induction_scores(llm.engine)
        assert llm.stats.tokens_decoded == 0  # calibration leaves no trace in the sequence
    assert w is not None and max(w) == pytest.approx(1.0)
    best = max(scores)
    assert best > 0.3  # a real copy head: most of its attention on the token to copy
    # only a few of the 90 (layer, KV head) pairs copy; the median head is near zero
    assert sorted(scores)[len(scores) // 2] < 0.05 * best
