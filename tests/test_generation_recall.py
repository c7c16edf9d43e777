"""Recall inside one generation (generation/generation_recall.py): a word the generation completes whose earlier
mentions are all evicted brings their sentences back, just before the sentence in progress, without changing the
text generated."""

import numpy as np
import pytest
from test_recall import FACTS, FILLER, NATIVE, recalled_text

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.engine.recall import BLOCK_LPOS, evicted_runs
from pymorph_edge.generation import generation_recall
from pymorph_edge.generation.generation_recall import GenerationRecall

CUE = " As recorded at the start, the code for Tom is"
# prose whose every word is new: no word in it has an earlier mention to ask for (the synthetic vocabulary spells
# text byte by byte, so each sentence is ~100 tokens and the budget holds about one)
WORDS = (
    "amber basil cedar delta ember fable garnet harbor ivory jasper kettle lantern meadow nectar orchard pebble quartz "
    "raven saddle thistle umber velvet willow yonder zephyr acorn bramble candle dune eagle fennel glacier hazel "
    "island juniper kelp lagoon marble nutmeg oyster prairie quill river sorrel tundra urchin valley walnut yarrow "
    "zinnia anchor beacon canyon dagger estuary falcon gravel heron igloo jungle kayak ledge mortar nomad otter "
    "parrot quiver rampart summit tannin upland vessel wharf yeoman zircon"
).split()
PROSE = "".join(f" {' '.join(WORDS[k : k + 8]).capitalize()}." for k in range(0, len(WORDS), 8))


def forcing(tokens):
    """A logits processor that makes greedy sampling write exactly these tokens, one per step (teacher forcing
    through the generation loop itself)."""
    it = iter(list(tokens))

    def proc(input_ids, scores):
        out = np.full_like(scores, -1e30)
        out[next(it)] = 0.0
        return out

    return proc


def forced_completion(llm, prompt, text):
    forced = llm.tokenize(text.encode(), add_bos=False)
    out = llm.create_completion(
        prompt, max_tokens=len(forced), temperature=0.0, logits_processor=forcing(forced), logprobs=1
    )
    return forced, out


def _tom_evicted(llm):
    """Whether every token of "Tom" in the facts (the prompt's first line) is out of the cache."""
    head = FACTS[: FACTS.index("Tom")]
    lo, hi = len(llm.tokenize(head.encode())), len(llm.tokenize((head + "Tom").encode()))
    runs = evicted_runs(llm.engine)
    return lo < hi and all(any(a <= i < b for a, b in runs) for i in range(lo, hi))


@pytest.mark.parametrize("on", [True, False])
def test_a_word_that_names_an_evicted_fact_brings_it_back_inside_one_generation(gqa_model, on):
    cfg = EngineConfig(n_ubatch=64, recall_in_generation=on)
    with Llama(gqa_model, kv_budget=128, recall=True, config=cfg) as llm:
        forced, out = forced_completion(llm, FACTS, PROSE + CUE)
        # the generation wrote what it was made to write, recall or not: the block is in the cache only
        assert out["choices"][0]["text"] == llm.detokenize(forced).decode()
        st = llm.stats
        assert st.peak_cells <= 128 + 64
        if not on:
            assert st.generation_recalls == 0 and _tom_evicted(llm)
            return
        assert st.generation_recalls == 1 and st.recalls == 1
        assert any("The code for Tom is 90517." in t for t in recalled_text(llm))
        # the block sits right before the cue it answers: the text decoded again after it is the newest (at most
        # one ubatch), and ends with "Tom is"
        sc, n_past = llm.engine.scorer, llm.engine.n_past
        pos = dict(zip(sc.cell_lpos(), sc.cell_positions(), strict=True))
        block = [p for lp, p in pos.items() if lp >= BLOCK_LPOS]
        before = [lp for lp, p in pos.items() if lp < BLOCK_LPOS and p < min(block)]
        after = [lp for lp, p in pos.items() if lp < BLOCK_LPOS and p > max(block)]
        assert block and before and after and max(before) < min(after)
        assert n_past - 64 <= min(after) and n_past - 1 in after


def _evict_then_force(llm, ranges, text):
    """Generate `text` after FACTS + FILLER (teacher-forced), with the prompt's sequence indices in `ranges` ([lo, hi) each)
    taken out of the cache once it is decoded (a test hook; the budget is large enough that the policy evicts nothing
    itself). Recall's words need several evicted sentences: their rarity is measured among those (MIN_IDF)."""
    sc, n_prompt = llm.engine.scorer, len(llm.tokenize((FACTS + FILLER).encode()))
    forced = llm.tokenize(text.encode(), add_bos=False)
    it, evicted = iter(forced), []

    def proc(input_ids, scores):
        if len(input_ids) == n_prompt:
            mem = sc._mem(llm.engine.mem)
            evicted.extend(sc._lib.pme_test_evict_range(sc._state, mem, 0, lo, hi) for lo, hi in ranges)
        out = np.full_like(scores, -1e30)
        out[next(it)] = 0.0
        return out

    out = llm.create_completion(FACTS + FILLER, max_tokens=len(forced), temperature=0.0, logits_processor=proc)
    assert evicted == [hi - lo for lo, hi in ranges] and out["choices"][0]["text"] == llm.detokenize(forced).decode()


def _index_of(llm, text: str) -> int:
    """The sequence index where the first `text` of FACTS + FILLER starts ("": 48 tokens before its end, the last
    ones kept so that the next token has a position to follow)."""
    prompt = FACTS + FILLER
    if not text:
        return len(llm.tokenize(prompt.encode())) - 48
    return len(llm.tokenize(prompt[: prompt.index(text)].encode()))


@pytest.mark.parametrize("whole", [True, False])
def test_a_kept_name_whose_value_was_evicted_asks_when_whole_sentences_count(gqa_model, monkeypatch, whole):
    """WHOLE_SENTENCE_HELD: a mention counts as held only while the rest of its sentence is live too, so "Tom", kept
    while the rest of the facts went (MorphKV keeps a name and drops its digits on the fact stream), still asks;
    counting the mention alone, nothing is asked for what the cache seems to hold."""
    monkeypatch.setattr(generation_recall, "WHOLE_SENTENCE_HELD", whole)
    cfg = EngineConfig(n_ubatch=64, recall_in_generation=True)
    with Llama(gqa_model, kv_budget=1024, recall=True, config=cfg) as llm:
        tom, after_tom, end = _index_of(llm, "Tom"), _index_of(llm, " is 90517"), _index_of(llm, "")
        _evict_then_force(llm, [(1, tom), (after_tom, end)], PROSE + CUE)
        assert tom + 1 <= after_tom and llm.engine.scorer.cell_lpos().count(tom) == 1  # "Tom" itself stayed
        assert llm.stats.generation_recalls == (1 if whole else 0)
        if whole:
            assert any("The code for Tom is 90517." in t for t in recalled_text(llm))


@pytest.mark.parametrize("back", [True, False])
def test_the_block_goes_before_the_recent_window_or_the_sentence_in_progress(gqa_model, monkeypatch, back):
    """BEFORE_WINDOW: the block goes before the last BACK tokens, so the recent window stays whole after it;
    otherwise before the sentence in progress (the cue, ~69 tokens in this byte-level vocabulary), at most one
    ubatch (64) back. Everything after the facts is live here, so only the setting decides where the block goes."""
    monkeypatch.setattr(generation_recall, "BEFORE_WINDOW", back)
    cfg = EngineConfig(n_ubatch=64, recall_in_generation=True)
    with Llama(gqa_model, kv_budget=1024, recall=True, config=cfg) as llm:
        _evict_then_force(llm, [(1, _index_of(llm, ""))], PROSE + CUE)
        assert llm.stats.generation_recalls == 1
        sc, n_past = llm.engine.scorer, llm.engine.n_past
        pos = dict(zip(sc.cell_lpos(), sc.cell_positions(), strict=True))
        block = [p for lp, p in pos.items() if lp >= BLOCK_LPOS]
        after = [lp for lp, p in pos.items() if lp < BLOCK_LPOS and p > max(block)]
        assert len(llm.tokenize(CUE.encode(), add_bos=False)) > 64 > generation_recall.BACK + 8
        # what came after the block: BACK tokens and the few completing "Tom is", or a whole ubatch of the cue
        assert sorted(after) == list(range(min(after), n_past))
        assert n_past - min(after) <= generation_recall.BACK + 4 if back else n_past - min(after) >= 64


def test_a_word_mentioned_often_or_still_in_the_cache_asks_for_nothing(gqa_model):
    """ "traveller" is in every filler sentence (more than MAX_MENTIONS), and the recent "Tom" is in the cache."""
    with Llama(
        gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64, recall_in_generation=True)
    ) as llm:
        forced_completion(llm, FACTS + FILLER, PROSE + " The tired traveller met Tom. Tom said hello.")
        assert llm.stats.generation_recalls == 1  # the first "Tom" only: the second finds the first in the cache


def test_the_word_index_after_a_rollback_equals_one_built_afresh(gqa_model):
    texts = [
        "The code for Maria is 48213. The code for Tom is 90517.",
        " Rain fell on the harbour all night, and the traveller waited.",
        " Then the ferry came.",
    ]
    with Llama(
        gqa_model, kv_budget=512, recall=True, config=EngineConfig(n_ubatch=64, recall_in_generation=True)
    ) as llm:
        eng = llm.engine
        watcher = GenerationRecall(eng, llm._piece_text)
        ids = [t for k, text in enumerate(texts) for t in llm.tokenize(text.encode(), add_bos=k == 0)]
        eng.decode(ids)
        watcher.after_token()
        for cut in (len(ids) - 3, len(ids) - 7, 20, 3):  # mid-word and at word boundaries
            eng.truncate(cut)
            eng.decode(ids[cut:-2])
            watcher.after_token()
            fresh = GenerationRecall(eng, llm._piece_text)
            fresh.after_token()
            assert watcher.mentions == fresh.mentions and watcher._sentences == fresh._sentences
            eng.decode(ids[-2:])
            watcher.after_token()
        assert watcher.mentions["tom"] and watcher.mentions["48213"] and "the" not in watcher.mentions
        assert len(watcher.mentions["code"]) == 2
        assert watcher.mentions["traveller"] == [watcher.mentions["traveller"][0]]


def test_recall_in_generation_is_validated_and_follows_recall(gqa_model):
    with pytest.raises(ValueError, match="recall_in_generation must be True, False or None, got 'yes'"):
        EngineConfig(recall_in_generation="yes")
    with Llama(gqa_model, kv_budget=128, recall=False) as llm:
        assert llm._generation_recall is None  # recall off: nothing to watch for
    with Llama(gqa_model, kv_budget=None) as llm:
        assert llm._generation_recall is None
    with Llama(gqa_model, kv_budget=128) as llm:  # MorphKV recalls by default; inside a generation, when asked
        assert (llm._generation_recall is not None) == generation_recall.RECALL_IN_GENERATION
    with Llama(gqa_model, kv_budget=128, config=EngineConfig(recall_in_generation=True)) as llm:
        assert llm._generation_recall is not None
    # asked for with recall off, or where the policy cannot recall: refused, not a watcher that never runs
    with pytest.raises(
        ValueError, match="recall_in_generation=True needs recall, and policy 'morphkv' has recall=False"
    ):
        Llama(gqa_model, kv_budget=128, recall=False, config=EngineConfig(recall_in_generation=True))
    with pytest.raises(ValueError, match="policy 'tova' has recall=False: pass recall=True"):
        Llama(gqa_model, kv_budget=128, policy="tova", config=EngineConfig(recall_in_generation=True))
    with pytest.raises(ValueError, match="policy 'context_shift' keeps no cell map"):
        Llama(
            gqa_model,
            kv_budget=128,
            policy="context_shift",
            config=EngineConfig(n_ubatch=64, recall_in_generation=True),
        )
    with Llama(gqa_model, kv_budget=None, config=EngineConfig(recall_in_generation=True)) as llm:
        assert llm._generation_recall is None  # the full cache evicts nothing, so there is nothing to recall


def test_a_reloaded_state_recalls_inside_the_next_generation(gqa_model):
    """The word index is not saved: it is read again from the reloaded log, and the next generation recalls from it."""
    cfg = EngineConfig(n_ubatch=64, recall_in_generation=True)
    with (
        Llama(gqa_model, kv_budget=128, recall=True, config=cfg) as a,
        Llama(gqa_model, kv_budget=128, recall=True, config=cfg) as b,
    ):
        forced_completion(a, FACTS, PROSE)
        assert a.stats.generation_recalls == 0 and _tom_evicted(a)
        b.load_state(a.save_state())
        text = FACTS + a.detokenize(a.tokenize(PROSE.encode(), add_bos=False)).decode()
        forced, out = forced_completion(b, text, CUE)  # extends the reloaded sequence
        assert out["choices"][0]["text"] == b.detokenize(forced).decode()
        assert b.stats.generation_recalls == 1
        assert any("The code for Tom is 90517." in t for t in recalled_text(b))


@pytest.mark.parametrize("policy", NATIVE)
def test_every_native_policy_recalls_inside_a_generation(gqa_model, policy):
    with Llama(
        gqa_model,
        kv_budget=128,
        policy=policy,
        recall=True,
        config=EngineConfig(n_ubatch=64, recall_in_generation=True),
    ) as llm:
        forced, out = forced_completion(llm, FACTS, PROSE + CUE)
        assert out["choices"][0]["text"] == llm.detokenize(forced).decode()
        st = llm.stats
        assert st.peak_cells <= 128 + 64
        if st.generation_recalls == 0:  # the policy kept the fact (H2O's heavy hitters): nothing to bring back
            assert not _tom_evicted(llm), policy
        else:
            assert st.generation_recalls == 1, policy
            assert any("The code for Tom is 90517." in t for t in recalled_text(llm))


def test_recall_inside_a_generation_spends_at_most_its_share_of_the_decoding(gqa_model):
    """A random model writes noise full of rare "words": recall inside the generation fires on it, but decodes at most
    one token in SPEND of those generated (plus the one recall that crossed the line), and every token it decodes is
    counted."""
    budget, ubatch = 512, 64
    with Llama(gqa_model, kv_budget=budget, config=EngineConfig(n_ubatch=ubatch, recall_in_generation=True)) as llm:
        prompt = llm.tokenize("The quick brown fox. " * 3)
        n = 3 * budget
        out = llm.create_completion(prompt, max_tokens=n, temperature=0, logit_bias={llm.token_eos(): -1e9})
        s = llm.stats
        assert out["usage"]["completion_tokens"] == n
        assert s.generation_recalls > 0  # it did fire on the noise
        assert s.tokens_decoded == len(prompt) + n - 1 + s.generation_recall_tokens
        assert s.generation_recall_tokens <= n / generation_recall.SPEND + ubatch + llm.engine.recall_tokens
        assert s.peak_cells <= budget + ubatch
