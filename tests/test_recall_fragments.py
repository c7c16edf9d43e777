"""recall.DROP_KEPT_FRAGMENTS (off by default): a recalled sentence replaces what the policy kept of it where it first
stood (engine/recall_fragments.py)."""

import pytest
from chat_helpers import recalled_text

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.engine import recall as recall_module
from pymorph_edge.engine.recall import BLOCK_LPOS
from pymorph_edge.engine.recall_fragments import consecutive_runs

FILLER = "The tired traveller walked slowly along the narrow harbour road while the rain kept falling. "
FACTS = "The code for Maria is 48213. The code for Tom is 90517. The code for Aiko is 27364.\n"
CUE = " As recorded at the start, the code for Tom is"


def toms_sentence(llm) -> tuple[int, int]:
    """Sequence indices [lo, hi) of "The code for Tom is 90517." (the first request opens with BOS)."""
    lo = len(llm.tokenize(FACTS.split(" The code for Tom")[0].encode()))
    hi = len(llm.tokenize(FACTS.split(" The code for Aiko")[0].encode()))
    return lo, hi


def half_kept_then_asked(llm) -> tuple[list[int], dict[int, int]]:
    """The facts and filler fit the cache; the last three tokens of Tom's sentence (its digits' end and the full
    stop) are then evicted by the test hook, so the sentence is half kept where it stands, and so is most of the
    filler (BM25 needs other evicted sentences to weigh a word by). The next request, which adds too few tokens to
    evict anything, asks for Tom's code. Returns the indices of the sentence that were still cached before the
    request, and the map index -> position of the cache after it (original cells only)."""
    eng = llm.engine
    llm.create_completion(FACTS + FILLER, max_tokens=1, temperature=0.0)
    assert llm.stats.tokens_evicted == 0
    lo, hi = toms_sentence(llm)
    by_index = dict(zip(eng.scorer.cell_lpos(), eng.scorer.cell_positions(), strict=True))
    sc = eng.scorer

    def evict(a: int, b: int) -> int:
        return sc._lib.pme_test_evict_range(sc._state, sc._mem(eng.mem), 0, by_index[a], by_index[b - 1] + 1)

    assert evict(hi - 3, hi) == 3
    facts_end = len(llm.tokenize(FACTS.encode()))
    assert evict(facts_end, facts_end + 100) == 100
    kept = list(range(lo, hi - 3))
    llm.create_completion(FACTS + FILLER + CUE, max_tokens=1, temperature=0.0)
    after = {lp: p for lp, p in zip(eng.scorer.cell_lpos(), eng.scorer.cell_positions(), strict=True) if p >= 0}
    return kept, after


def test_the_kept_fragment_of_a_recalled_sentence_leaves_its_first_place(gqa_model, monkeypatch):
    monkeypatch.setattr(recall_module, "DROP_KEPT_FRAGMENTS", True)
    with Llama(gqa_model, kv_budget=384, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        kept, after = half_kept_then_asked(llm)
        s = llm.stats
        assert s.recalls == 1 and any("The code for Tom is 90517." in t for t in recalled_text(llm))
        assert s.tokens_evicted == 0  # nothing but the drop removed a cell in the request
        assert not set(kept) & set(after), "the fragment is still cached where the sentence first stood"
        assert s.recall_dropped_tokens == len(kept)
        assert any(lp >= BLOCK_LPOS for lp in after)  # the whole sentence is held by the block instead
        # the other facts, kept whole, are untouched
        assert all(i in after for i in range(1, toms_sentence(llm)[0]))


def test_by_default_both_copies_stay(gqa_model):
    """The default (the drop measured and left off): the check above fails without the drop."""
    assert recall_module.DROP_KEPT_FRAGMENTS is False
    with Llama(gqa_model, kv_budget=384, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        kept, after = half_kept_then_asked(llm)
        assert llm.stats.recalls == 1 and llm.stats.recall_dropped_tokens == 0
        assert set(kept) <= set(after)


def test_a_pinned_prefix_is_never_dropped(gqa_model, monkeypatch):
    """keep pins the first tokens: a recalled sentence that straddles them loses only its cells past the pin."""
    monkeypatch.setattr(recall_module, "DROP_KEPT_FRAGMENTS", True)
    with Llama(gqa_model, kv_budget=384, recall=True, keep=64, config=EngineConfig(n_ubatch=64)) as llm:
        kept, after = half_kept_then_asked(llm)
        assert llm.stats.recalls == 1 and kept[0] < 64 < kept[-1]
        assert {i for i in kept if i < 64} <= set(after) and not {i for i in kept if i >= 64} & set(after)
        assert llm.stats.recall_dropped_tokens == sum(i >= 64 for i in kept)


@pytest.mark.parametrize(
    ("positions", "runs"),
    [([], []), ([3], [(3, 4)]), ([1, 2, 3, 7, 9, 10], [(1, 4), (7, 8), (9, 11)])],
)
def test_consecutive_positions_are_removed_as_runs(positions, runs):
    assert consecutive_runs(positions) == runs
