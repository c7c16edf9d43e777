"""A recalled block decoded inside the new text's first ubatch (engine/recall.py FUSED_BLOCK), on the synthetic
model: the same cache as decoding head, block and new text apart, for one ubatch's overhead less."""

import numpy as np
import pytest

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.bench.common import last_logprobs
from pymorph_edge.engine.recall import BLOCK_LPOS, PendingBlock

FACTS = "The code for Maria is 48213. The code for Tom is 90517. The code for Aiko is 27364.\n" * 2
HEAD, BLOCK, REST = "\n\n", " (Earlier:) The code for Tom is 90517.", " As recorded at the start, the code for Tom is"


def decode_both_ways(path, fused: bool) -> dict:
    """FACTS, then head, block and rest at a budget that evicts nothing, so the two ways see the same tokens
    (recall_by="both", so the key log is kept and compared too)."""
    with Llama(path, kv_budget=512, recall=True, config=EngineConfig(n_ubatch=128, recall_by="both")) as llm:
        eng = llm.engine
        eng.decode(llm.tokenize(FACTS.encode()))
        head, block, rest = (llm.tokenize(t.encode(), add_bos=False) for t in (HEAD, BLOCK, REST))
        lpos = list(range(BLOCK_LPOS, BLOCK_LPOS + len(block)))
        shares: list[float] = []
        if fused:
            eng.decode(head + rest, block=PendingBlock(len(head), block, lpos, shares.append))
        else:
            eng.decode(head, logits_last=False)
            eng.decode_block(block, lpos)
            eng.decode(rest)
        eng.release_pin()
        assert eng.stats.tokens_evicted == 0
        return {
            "logprobs": last_logprobs(llm).copy(),
            "cells": sorted(
                (p, lp) for p, lp in zip(eng.cell_positions(), eng.scorer.cell_lpos(), strict=True) if p >= 0
            ),
            "history": eng.history.tail(len(eng.history)),
            "n_past": eng.n_past,
            "next_pos": eng.next_pos,
            "keys": eng.keys.keys().copy(),
            "shares": shares,
            "block": block,
            "rest": rest,
        }


def test_a_block_inside_the_new_texts_ubatch_is_the_block_decoded_apart(gqa_model):
    fused, apart = decode_both_ways(gqa_model, True), decode_both_ways(gqa_model, False)
    # the same cells at the same positions with the same labels: the block's own, and the new text's indices
    assert fused["cells"] == apart["cells"]
    n_block = len(fused["block"])
    assert [lp for _, lp in fused["cells"] if lp >= BLOCK_LPOS] == list(range(BLOCK_LPOS, BLOCK_LPOS + n_block))
    # the block takes positions, not sequence indices, and leaves the key log to the sequence's own tokens
    assert fused["history"] == apart["history"] and fused["history"][-len(fused["rest"]) :] == fused["rest"]
    assert fused["n_past"] == apart["n_past"] == len(fused["history"]) == len(fused["keys"])
    assert fused["next_pos"] == apart["next_pos"] == fused["n_past"] + n_block
    assert fused["keys"].shape == apart["keys"].shape
    np.testing.assert_allclose(fused["keys"].astype(np.float32), apart["keys"].astype(np.float32), atol=2e-2)
    # what the model predicts next is the same, to the float error of a different ubatch split
    assert int(fused["logprobs"].argmax()) == int(apart["logprobs"].argmax())
    np.testing.assert_allclose(fused["logprobs"], apart["logprobs"], atol=2e-2)
    # the block's share of its ubatch's time was handed back once, for recall's counters
    assert len(fused["shares"]) == 1 and fused["shares"][0] > 0


def test_a_block_that_cannot_ride_in_the_first_chunk_is_refused_by_name(gqa_model):
    with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        llm.engine.decode(llm.tokenize(FACTS.encode()))
        too_long = PendingBlock(1, [100] * 64, list(range(BLOCK_LPOS, BLOCK_LPOS + 64)), lambda s: None)
        with pytest.raises(ValueError, match="recalled block of 64 tokens"):
            llm.engine.decode([100, 101], block=too_long)
