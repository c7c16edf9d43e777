"""Restoring a chat turn's recalled block from saved K/V is the default where a restore is cheap
(engine_config.resolve_kv_store_bytes): a bounded cache with recall, no sliding-window layers, a float K, layers on
the host. A completion's raw block is still recomputed unless recall_restore="all" (docs/recall.md, "Chat blocks
restored by default"). A chat turn restoring by default on SmolLM2 is checked in
test_recall.py::test_smollm2_chat_recalls_a_number_from_the_first_turn_after_two_stories."""

import llama_cpp.llama_cpp as C
import pytest
from chat_helpers import recalled_text
from test_recall import ask_for_toms_code

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.engine.engine_config import DEFAULT_KV_BYTES, resolve_kv_store_bytes


@pytest.mark.parametrize(
    ("given", "recalls", "n_swa", "on_host", "want"),
    [
        ({}, True, 0, True, DEFAULT_KV_BYTES),
        ({}, False, 0, True, 0),  # no recall, nothing to restore
        ({}, True, 512, True, 0),  # iSWA: every token's window rows copied, the window cache doubled
        ({"type_k": "q8_0", "flash_attn": True}, True, 0, True, 0),  # llama.cpp re-rotates the whole cache
        ({"type_k": "bf16"}, True, 0, True, DEFAULT_KV_BYTES),
        ({}, True, 0, False, 0),  # off the host: the scorer does not copy the rows
        ({"recall_kv_bytes": 0}, True, 0, True, 0),  # asked for: as given
        ({"recall_kv_bytes": 1 << 20}, True, 512, False, 1 << 20),
    ],
)
def test_the_kv_store_is_on_by_default_only_where_a_restore_is_cheap(given, recalls, n_swa, on_host, want):
    assert resolve_kv_store_bytes(EngineConfig(**given), recalls, n_swa, on_host) == want


@pytest.mark.parametrize(
    ("kwargs", "want", "n_seq"),
    [
        ({}, DEFAULT_KV_BYTES, 2),  # restored runs come in on a second sequence of one unified cache
        ({"recall": False}, 0, 1),
        ({"config": EngineConfig(n_ubatch=64, recall_kv_bytes=0)}, 0, 1),
    ],
)
def test_a_default_bounded_engine_keeps_evicted_kv_for_restoring(gqa_model, kwargs, want, n_seq):
    kwargs = {"config": EngineConfig(n_ubatch=64)} | kwargs
    with Llama(gqa_model, kv_budget=128, **kwargs) as llm:
        assert llm.engine.kv_store_bytes == want
        assert C.llama_n_seq_max(llm.engine.ctx) == n_seq
    with Llama(gqa_model, kv_budget=None) as full:
        assert full.engine.kv_store_bytes == 0


def test_recall_restore_is_checked_by_name():
    with pytest.raises(ValueError, match="recall_restore must be 'chat' or 'all', got 'some'"):
        EngineConfig(recall_restore="some")
    with pytest.raises(ValueError, match="recall_kv_bytes must be a non-negative int, got -1"):
        EngineConfig(recall_kv_bytes=-1)


@pytest.mark.parametrize(("restore", "restored"), [("chat", False), ("all", True)])
def test_a_completions_block_is_recomputed_unless_every_block_is_restored(gqa_model, restore, restored):
    """Restored rows copied fewer digits than recomputed ones on the continuation task, so a completion's raw block
    is recomputed by default; recall_restore="all" restores it too. Either way the fact comes back."""
    with Llama(gqa_model, kv_budget=128, config=EngineConfig(n_ubatch=64, recall_restore=restore)) as llm:
        s0 = ask_for_toms_code(llm)
        s = llm.stats
        assert s.recalls - s0.recalls == 1 and any("The code for Tom is 90517." in t for t in recalled_text(llm))
        assert (s.restored_tokens > s0.restored_tokens) is restored
        assert s.recall_kv_bytes > 0  # the evicted rows were kept either way
