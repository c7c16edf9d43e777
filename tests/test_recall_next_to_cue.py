"""A completion's recalled block goes just before the new text's last sentence, the cue it stops on
(recall_placement.BEFORE_LAST_SENTENCE, docs/recall.md "Next to the cue")."""

from collections import Counter

import pytest
from test_recall import FACTS, FILLER, recalled_text

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.engine.recall import BLOCK_LPOS
from pymorph_edge.generation import recall_placement, request_recall
from pymorph_edge.generation.recall_placement import last_sentence_start

CUE = " As recorded at the start, the code for Tom is"


def test_the_last_sentence_starts_after_the_last_sentence_end_that_words_follow():
    pieces = ["Rain", " fell", ".", " The", " code", " is", ":"]
    assert last_sentence_start(list(range(len(pieces))), lambda t: pieces[t]) == 3
    # a sentence end with no words after it is the text's own end, not the start of a last sentence
    pieces = ["Rain", " fell", ".", " Then", " it", " stopped", ".", "\n"]
    assert last_sentence_start(list(range(len(pieces))), lambda t: pieces[t]) == 3
    # one sentence: nothing comes before it
    assert last_sentence_start([0, 1], lambda t: ["The", " code"][t]) == 0
    assert last_sentence_start([], str) == 0


def _positions(llm):
    """llama.cpp position of each sequence index (block cells under BLOCK_LPOS + k) in the cache."""
    sc = llm.engine.scorer
    return dict(zip(sc.cell_lpos(), sc.cell_positions(), strict=True))


@pytest.mark.parametrize("next_to_cue", [True, False])
def test_a_completions_block_sits_between_the_new_text_and_its_cue(gqa_model, monkeypatch, next_to_cue):
    monkeypatch.setattr(recall_placement, "BEFORE_LAST_SENTENCE", next_to_cue)
    monkeypatch.setattr(request_recall, "RECALL_INSIDE_PROMPT", False)  # recall at the request boundary only
    with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        text = FACTS + FILLER
        llm.create_completion(text, max_tokens=1, temperature=0.0)
        new_from = len(llm.tokenize(text.encode())) + 1  # past the first request and its answer's token
        prompt = llm.tokenize((text + FILLER + CUE).encode())
        cue_at = last_sentence_start(prompt, llm._piece_text)
        assert new_from < cue_at < len(prompt)
        llm.create_completion(text + FILLER + CUE, max_tokens=1, temperature=0.0)
        assert llm.stats.recalls == 1 and any("The code for Tom is 90517." in t for t in recalled_text(llm))
        pos = _positions(llm)
        block = [p for lp, p in pos.items() if lp >= BLOCK_LPOS]
        new_text = [p for lp, p in pos.items() if new_from <= lp < cue_at]
        cue = [p for lp, p in pos.items() if cue_at <= lp < BLOCK_LPOS]
        assert block and new_text and cue
        if next_to_cue:
            assert max(new_text) < min(block) and max(block) < min(cue)
        else:
            assert max(block) < min(new_text)


def test_the_block_is_chosen_by_the_whole_new_text_either_way(gqa_model, monkeypatch):
    """The same sentences come back, by the same query; only their place and order change."""
    got = []
    monkeypatch.setattr(request_recall, "RECALL_INSIDE_PROMPT", False)
    for next_to_cue in (True, False):
        monkeypatch.setattr(recall_placement, "BEFORE_LAST_SENTENCE", next_to_cue)
        with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
            llm.create_completion(FACTS + FILLER, max_tokens=1, temperature=0.0)
            llm.create_completion(FACTS + FILLER + FILLER + CUE, max_tokens=1, temperature=0.0)
            got.append(recalled_text(llm))
    assert sorted(got[0]) == sorted(got[1]) and got[0]


def test_next_to_the_cue_the_best_ranked_sentence_comes_last():
    """A model copies what is nearest: the sentence the cue matches best goes right before it, and an earlier
    reminder about someone else, which also matches, further away (Gemma 3 copied such a reminder's value when it
    came last)."""
    from pymorph_edge.engine.recall_select import Span, choose

    spans = [Span(lo, lo + 5, Counter()) for lo in (10, 40, 90)]
    ranked = [(3.0, spans[0]), (2.0, spans[2]), (1.5, spans[1])]
    assert choose(ranked, 100) == spans  # sequence order, as before a cue
    assert choose(ranked, 100, best_last=True) == [spans[1], spans[2], spans[0]]


@pytest.mark.parametrize("inside", [True, False])
def test_a_fresh_completion_longer_than_the_cache_recalls_inside_itself(gqa_model, monkeypatch, inside):
    """No request boundary: the text before the cue is decoded (and evicted) first, then what the cue asks for comes
    back just before it (request_recall.RECALL_INSIDE_PROMPT)."""
    monkeypatch.setattr(request_recall, "RECALL_INSIDE_PROMPT", inside)
    with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        prompt = llm.tokenize((FACTS + FILLER + FILLER + CUE).encode())
        cue_at = last_sentence_start(prompt, llm._piece_text)
        llm.create_completion(FACTS + FILLER + FILLER + CUE, max_tokens=1, temperature=0.0)
        s = llm.stats
        assert s.tokens_evicted > 0 and s.recall_checks == int(inside) and s.recalls == int(inside)
        assert s.tokens_decoded == len(prompt) + s.recalled_tokens  # the prompt once, and the block
        assert len(llm.engine.history) == len(prompt)  # a block takes no sequence index
        if inside:
            assert any("The code for Tom is 90517." in t for t in recalled_text(llm))
            pos = _positions(llm)
            block = [p for lp, p in pos.items() if lp >= BLOCK_LPOS]
            before = [p for lp, p in pos.items() if lp < cue_at]
            cue = [p for lp, p in pos.items() if cue_at <= lp < BLOCK_LPOS]
            assert block and max(before) < min(block) and max(block) < min(cue)
        assert s.peak_cells <= 128 + 64


def test_a_completion_that_fits_the_cache_or_echoes_logprobs_is_not_cut(gqa_model):
    with Llama(gqa_model, kv_budget=4096, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        llm.create_completion(FACTS + CUE, max_tokens=1, temperature=0.0)
        assert llm.stats.recall_checks == 0  # not cut: recall is not even asked
    with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        out = llm.create_completion(FACTS + FILLER + FILLER + CUE, max_tokens=1, echo=True, logprobs=1)
        assert llm.stats.tokens_evicted > 0 and llm.stats.recall_checks == 0  # every prompt row was read in order
        assert len(out["choices"][0]["logprobs"]["tokens"]) > 100


@pytest.mark.parametrize("cue_tokens", [32, 0])
def test_a_long_chat_messages_block_sits_just_before_its_question(smollm2_path, monkeypatch, cue_tokens):
    """A user message longer than NEXT_TO_CUE_TOKENS (a pasted text, then the question) has the recalled sentence
    between its text and its question in the cache, as a completion does; with the setting at 0, at the message's
    start, before the pasted text, as before. (SmolLM2: the synthetic vocabulary's dummy space prefix refuses any
    cut inside a message, so its chats take a message of their own.)"""
    monkeypatch.setattr(recall_placement, "NEXT_TO_CUE_TOKENS", cue_tokens)
    with Llama(smollm2_path, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=256)) as llm:
        llm.create_chat_completion(
            [{"role": "user", "content": "My PIN is 48213. " + FILLER}], max_tokens=24, temperature=0.0
        )
        llm.continue_chat([{"role": "user", "content": "Tell me more. " + FILLER}], max_tokens=24, temperature=0.0)
        assert llm.stats.tokens_evicted > 100
        llm.continue_chat([{"role": "user", "content": FILLER + "What was my PIN?"}], max_tokens=1, temperature=0.0)
        lo, hi, spans = llm.engine.recall_state.blocks[-1]
        assert any("48213" in llm.detokenize(llm.engine.log.tokens(a, b)).decode() for a, b, _ in spans)
        pos = _positions(llm)
        block = [pos[lp] for lp in range(lo, hi) if lp in pos]
        at = {p: lp for lp, p in pos.items() if lp < BLOCK_LPOS}
        assert len(block) == hi - lo  # the whole block is live (pinned until the question was decoded)
        log = llm.engine.log
        spell = lambda lp: llm.detokenize(log.tokens(lp, lp + 3)).decode().strip()  # noqa: E731
        q = next(lp for lp in range(llm.engine.n_past - 1, 0, -1) if spell(lp).startswith("What was"))
        next_lp = at[min(p for p in at if p > max(block))]  # what the cache holds right after the block
        assert q in pos and pos[q] > max(block)
        assert next_lp == q if cue_tokens else next_lp < q  # the question itself, or the pasted text before it
