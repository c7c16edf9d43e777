"""Recall of evicted text and pinning (engine/recall.py, engine/evicted_log.py, native/pme_pins.c)."""

import pytest
from chat_helpers import locker_number_then_two_stories, recalled_text

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.engine import recall_select
from pymorph_edge.engine.evicted_log import EvictedLog
from pymorph_edge.engine.recall import BLOCK_LPOS, recalled_live
from pymorph_edge.engine.recall_select import (
    NUMERAL,
    HeldCover,
    adds_a_word,
    choose,
    held_runs,
    is_rival,
    last_sentence,
    on_cue,
    query_weights,
    rank,
    sentences,
    with_next,
)
from pymorph_edge.policies import POLICIES

FILLER = "The tired traveller walked slowly along the narrow harbour road while the rain kept falling. " * 6
FACTS = "The code for Maria is 48213. The code for Tom is 90517. The code for Aiko is 27364.\n"
NATIVE = sorted(n for n, cls in POLICIES.items() if cls().evicts and not cls.shifts and not cls.grows)


def in_cache(llm, lo, hi):
    """Whether every token of sequence indices [lo, hi) is in the cache: kept there, or recalled."""
    eng = llm.engine
    held = {p for p in eng.scorer.cell_lpos() if 0 <= p < BLOCK_LPOS} | recalled_live(eng)
    return set(range(lo, hi)) <= held


# -- the log and the relevance ranking, without a model -------------------------------------------------
def test_log_is_bounded_in_bytes_and_keeps_indices():
    log = EvictedLog(max_bytes=4 * 100)
    log.extend(range(1000))
    assert log.nbytes <= 400 and log.end == 1000 and log.tokens(990, 1000) == list(range(990, 1000))
    assert log.tokens(0, 10) == []  # dropped, oldest first
    log.truncate(995)
    assert log.end == 995
    copy = EvictedLog(400)
    copy.load_state(log.state())
    assert copy.tokens(900, 995) == log.tokens(900, 995)
    with pytest.raises(ValueError, match="recall log"):
        copy.load_state({"start": "x", "ids": "!!"})
    with pytest.raises(ValueError, match="recall_log_bytes"):
        EvictedLog(-1)


def test_the_last_sentence_of_the_new_text_is_the_query():
    text = FACTS + FILLER
    pieces = list(text)  # one character per token
    spans = sentences([(0, len(pieces))], lambda lo, hi: list(range(lo, hi)), lambda i: pieces[i], 48)
    query = query_weights(FILLER + " As recorded at the start, the code for Tom is")
    best = choose(rank(spans, query), 40)
    assert ["".join(pieces[s.lo : s.hi]).strip() for s in best] == ["The code for Tom is 90517."]
    assert rank(spans, query_weights("Nothing here matches.")) == []


def test_a_cue_worded_like_earlier_reminders_finds_the_fact_its_name_points_at():
    """Earlier reminders share the cue's wording ("earlier", "noted"), which always come together: one piece of
    evidence, counted once. Counted twice, they outscored the fact the name points at (the 'fresh' continuation set:
    7/40 digits on SmolLM2 and 14/40 on Gemma 3, 29/40 and 35/40 once counted once)."""
    text = (
        "Nadia's ticket number is 41190. Camille's ticket number is 81333. Tariq's ticket number is 27094.\n"
        + FILLER
        + "Earlier we noted that Tariq's ticket number is 27094. "
        + FILLER
        + "Earlier we noted that Nadia's ticket number is 41190. "
    )
    pieces = list(text)
    spans = sentences([(0, len(pieces))], lambda lo, hi: list(range(lo, hi)), lambda i: pieces[i], 64)
    best = rank(spans, query_weights(FILLER + " Earlier we noted that Camille's ticket number is"))[0][1]
    assert "".join(pieces[best.lo : best.hi]).strip() == "Camille's ticket number is 81333."


def _spans_of(text):
    pieces = list(text)  # one character per token
    spans = sentences([(0, len(pieces))], lambda lo, hi: list(range(lo, hi)), lambda i: pieces[i], 96)
    return {"".join(pieces[s.lo : s.hi]).strip(): s for s in spans}


def test_a_sentence_that_says_the_cue_about_someone_else_is_a_rival():
    """A reminder worded like the cue but about another name offers a rival value for the same slot: Gemma 3 copied
    Kenji's 49753 for Amara when it came back with Amara's fact ('final' continuation set). Where the cue's wording
    is as rare as the name ('sealed': "As stated before, ..." once evicted), BM25 even ranks that reminder above the
    fact, so the test cannot lean on the ranking: it aligns each sentence with the cue."""
    said = _spans_of(
        "Amara was given the PIN 23522. Kenji was given the PIN 49753.\n"
        "To repeat what was written above, Kenji was given the PIN 49753. "
        "The locker assigned to Ines opens with 95463. As stated before, the locker assigned to Tomasz opens with 79473. "
        "My locker number is 90517. Her locker number was 4. The number of my locker is 11. My city is Riga. "
    )
    cue = last_sentence(FILLER + " To repeat what was written above, Amara was given the PIN")
    assert is_rival(said["To repeat what was written above, Kenji was given the PIN 49753."], cue)
    assert not is_rival(said["Amara was given the PIN 23522."], cue)
    assert not is_rival(said["Kenji was given the PIN 49753."], cue)  # no shared word on the name's left: not the slot
    cue = last_sentence(FILLER + " As stated before, the locker assigned to Ines opens with")
    assert is_rival(said["As stated before, the locker assigned to Tomasz opens with 79473."], cue)
    assert not is_rival(said["The locker assigned to Ines opens with 95463."], cue)
    # a chat question: the fact and other sentences about lockers leave words out, they substitute none
    cue = last_sentence("Thanks for the story. What is my locker number?")
    assert cue == ["locker", "number", NUMERAL]  # it asks for a number: numerals match it too
    for s in (
        "My locker number is 90517.",
        "Her locker number was 4.",
        "The number of my locker is 11.",
        "My city is Riga.",
    ):
        assert not is_rival(said[s], cue)


def test_a_fragment_that_only_echoes_the_question_is_passed_over_for_the_fact():
    """Gemma 3 270M's story echoed the first message and cut it with a newline after "The pickup code for" (stop 42,
    the held-out set "last"). BM25's length normalisation ranks those four words, which match the question's
    "pickup" and "code", above the fact's whole sentence; they hold no value, so the fact is chosen instead."""
    fact = "Hi, I am Ines from Porto and the pickup code at the post office is 48213."
    pieces = list(fact + "\n" + FILLER + "A courier came to Porto. The pickup code for\nthe parcel was lost. " + FILLER)
    spans = sentences([(0, len(pieces))], lambda lo, hi: list(range(lo, hi)), lambda i: pieces[i], 96)

    def text(s):
        return "".join(pieces[s.lo : s.hi]).strip()

    question = "Thanks for the stories. What was my pickup code?"
    query, cue = query_weights(question), last_sentence(question)
    ranked = [s for _, s in rank(spans, query)]
    assert [text(s) for s in ranked[:2]] == ["The pickup code for", fact]  # the words alone prefer the echo
    assert not adds_a_word(ranked[0], query.keys()) and adds_a_word(ranked[1], query.keys())
    best = choose(rank(spans, query), 200, lambda s: on_cue(s, cue) and adds_a_word(s, query.keys()))
    assert [text(s) for s in best] == [fact]


def test_the_text_still_cached_is_the_complement_of_the_evicted_runs():
    assert held_runs([(2, 4), (6, 8)], (0, 10)) == [(0, 2), (4, 6), (8, 10)]
    assert held_runs([(0, 3), (7, 10)], (0, 10)) == [(3, 7)]
    assert held_runs([], (5, 9)) == [(5, 9)]


def test_a_span_the_cache_already_covers_stays_out():
    """SmolLM2's continuation (stop 43): Sofia's fact was still cached, no evicted sentence had "sofia", and Yuki's
    fact, which matches only "code", came back next to the cue; SmolLM2 copied Yuki's code. A cached sentence that
    matches all a span matches and more covers it. A fact with its number is not covered by a sentence without
    one, nor by a cached reminder about someone else."""
    said = _spans_of(
        "The code for Sofia is 21124. As recorded at the start, the code for Fatima is 97782. "
        "The code for Yuki is 32162. I need the pickup code at the door. The pickup code for my groceries is 95319. "
    )
    cue = last_sentence(FILLER + " As recorded at the start, the code for Sofia is")
    sofia, reminder, yuki = (
        said["The code for Sofia is 21124."],
        said["As recorded at the start, the code for Fatima is 97782."],
        said["The code for Yuki is 32162."],
    )
    assert HeldCover([sofia], cue).covers(yuki)  # Sofia's fact is cached: Yuki's only matches "code"
    assert HeldCover([reminder], cue).covers(yuki)  # so does a cached reminder in the cue's own words
    assert not HeldCover([reminder], cue).covers(sofia)  # Sofia's evicted fact names her: it comes back
    assert not HeldCover([sofia], cue).covers(sofia)  # the same words are not more
    chat = last_sentence("Thanks! What is the code I need for the pickup?")
    fact, story = said["The pickup code for my groceries is 95319."], said["I need the pickup code at the door."]
    assert not HeldCover([story], chat).covers(fact)  # the story matches more words, but holds no number


def test_rivals_stay_out_of_the_choice_and_the_fact_comes_back():
    """The sealed set's shape: the cue's rare wording ("stated") scores another name's reminder near the fact
    (on the real set, above it); without the rival, the fact alone is chosen."""
    prose = "The bus driver repainted the marble staircase before the ferry left. " * 6
    text = (
        "The locker assigned to Ines opens with 95463. The locker assigned to Hiro opens with 56993.\n"
        + prose
        + "As stated before, the locker assigned to Tomasz opens with 79473. "
        + prose
    )
    pieces = list(text)
    spans = sentences([(0, len(pieces))], lambda lo, hi: list(range(lo, hi)), lambda i: pieces[i], 96)
    new = prose + " As stated before, the locker assigned to Ines opens with"
    ranked = rank(spans, query_weights(new))
    said = lambda s: "".join(pieces[s.lo : s.hi]).strip()  # noqa: E731
    assert any("Tomasz" in said(s) for s in choose(ranked, 200))  # BM25 alone brings the rival back too
    cue = last_sentence(new)
    kept = choose([(sc, s) for sc, s in ranked if not is_rival(s, cue)], 200)
    assert [said(s) for s in kept] == ["The locker assigned to Ines opens with 95463."]


def test_a_question_that_asks_for_a_number_finds_the_numeral_it_shares_no_word_with(monkeypatch):
    """ "Which 5-digit number did I give you earlier?" after "My customer ID is 22004." shares no word with it; the
    story's sentences share "give" and "earlier". A word asking for a number also matches every numeral, which is
    rare in the evicted text, so the fact ranks first; without that (TYPED_NUMBERS off, before stop 35) a story
    sentence did, and the fact was not on the cue at all."""
    prose = (
        "The old sailor would give his last coin for a warm meal. "
        "Earlier that morning the baker had sung by the window. "
        "The lighthouse keeper counted the gulls on the rocks. "
    )
    said = _spans_of("Hi, I'm Priya from Pune. My customer ID is 22004. Please write me a story.\n" + prose * 3)
    spans = list(said.values())
    text = lambda s: next(k for k, v in said.items() if v is s)  # noqa: E731
    question = "Thanks! Quick question: which 5-digit number did I give you earlier?"
    cue = last_sentence(question)
    assert NUMERAL in cue and on_cue(said["My customer ID is 22004."], cue)
    assert text(choose(rank(spans, query_weights(question)), 200)[0]) == "My customer ID is 22004."
    assert not is_rival(said["My customer ID is 22004."], cue)
    # a request that asks for no number is ranked as before: the numeral weighs nothing
    assert NUMERAL not in last_sentence("Now write another story about the sailor.")
    monkeypatch.setattr(recall_select, "TYPED_NUMBERS", False)
    cue = last_sentence(question)
    assert not on_cue(said["My customer ID is 22004."], cue)
    assert text(rank(spans, query_weights(question))[0][1]) != "My customer ID is 22004."


def test_only_sentences_that_share_a_word_with_what_the_request_asks_come_back():
    """The 'closing' set's shape: the fact is still cached, so the cue matches nothing evicted, and the prose just
    before the cue matches evicted prose: nothing of it is on the cue."""
    prose = "The harbour master fixed a jar of honey as the evening train passed. "
    said = _spans_of(
        prose + "Their youngest son hid a jar of honey. For the record, Dara's bank card ends in 29081. "
        "Just a reminder that Marisol's bank card ends in 44291. "
    )
    cue = last_sentence(prose + "Just a reminder that Henrik's bank card ends in")
    assert cue == ["reminder", "henrik", "s", "bank", "card", "ends"]
    assert not on_cue(said["Their youngest son hid a jar of honey."], cue)
    assert not on_cue(said["The harbour master fixed a jar of honey as the evening train passed."], cue)
    # on the cue: another name's fact (its name has no shared word on its left, so it is no rival) and reminder
    # (a rival: 'marisol' sits between 'reminder' and 's', where the cue has 'henrik')
    assert on_cue(said["For the record, Dara's bank card ends in 29081."], cue)
    assert not is_rival(said["For the record, Dara's bank card ends in 29081."], cue)
    assert is_rival(said["Just a reminder that Marisol's bank card ends in 44291."], cue)


def test_a_recalled_fact_counts_as_held_token_by_token():
    """A recalled block's text is evicted like any other. A fact whose cells went while a word of its block stayed
    is evicted again, and a later question can recall it; counting the whole block as held while any cell lived
    hid it (SmolLM2: a fact recalled before a story, evicted during it, was never recalled for the question)."""
    from types import SimpleNamespace

    from pymorph_edge.engine.recall import RecallState, span_places

    b = BLOCK_LPOS
    state = RecallState(blocks=[[b, b + 10, [[5, 8, b + 2], [20, 23, b + 6]]], [b + 10, b + 12, [[40, 42, b + 10]]]])
    cells = [1, 2, b + 2, b + 3, b + 4, b + 9]  # the first span whole, the block's last (wrap) token
    engine = SimpleNamespace(scorer=SimpleNamespace(cell_lpos=lambda: cells), recall_state=state)
    assert recalled_live(engine) == {5, 6, 7}
    assert len(state.blocks) == 1  # the second block has no live cell left
    state.blocks[0][2][1] = [20, 23]  # a block saved before: its spans held while the block lives
    assert recalled_live(engine) == {5, 6, 7, 20, 21, 22}
    # where spans start in a block whose wrap retokenized their first token
    assert span_places([9, 9, 1, 2, 3, 7, 4, 5], [[100, 2, 3], [44, 5], [8, 8]]) == [2, 6, -1]


def test_a_recall_state_saved_before_the_time_split_still_loads():
    """Session files and kept conversations from before recall_checks / recall_probe_s / recall_block_s load,
    with those at zero; a state missing an older field is still refused by name."""
    from pymorph_edge.engine.recall import RecallState

    old = {"barrier": 3, "next_lpos": BLOCK_LPOS, "blocks": [], "recalls": 1, "recalled_spans": 1}
    old |= {"recalled_tokens": 9, "recall_s": 0.5}
    st = RecallState.from_json(old)
    assert (st.counters.recalls, st.counters.recall_checks, st.counters.recall_block_s) == (1, 0, 0.0)
    assert RecallState.from_json(st.to_json()) == st
    with pytest.raises(ValueError, match="recall_s"):
        RecallState.from_json({k: v for k, v in old.items() if k != "recall_s"})


# -- mechanism on the synthetic model (byte tokens, so the text is real) --------------------------------
@pytest.mark.parametrize("policy", NATIVE)
def test_every_native_policy_has_the_fact_a_continuation_asks_for(gqa_model, policy):
    """Kept by the policy, or recalled for the request that asks for it, for every policy."""
    with Llama(gqa_model, kv_budget=192, policy=policy, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        text = FACTS + FILLER
        llm.create_completion(text, max_tokens=2, temperature=0.0)
        lo = len(llm.tokenize(FACTS.split(" The code for Tom")[0]))
        hi = len(llm.tokenize(FACTS.split(" The code for Aiko")[0]))
        assert llm.stats.tokens_evicted > 0
        s0 = llm.stats  # the first request is longer than the cache and may recall inside itself
        text += FILLER + " As recorded at the start, the code for Tom is"
        llm.create_completion(text, max_tokens=2, temperature=0.0)
        s = llm.stats
        # recalled this request (read before in_cache, which drops blocks whose cells all went since), or kept:
        # StreamingLLM and H2O evict the block once the new text that needed it is decoded
        recalled = any("The code for Tom is 90517." in t for t in recalled_text(llm))
        assert recalled or (s.recalls == s0.recalls and in_cache(llm, lo, hi))
        assert s.recall_log_bytes > 0 and s.peak_cells <= 192 + 64
        # a recalled block takes no index of the sequence: the history is exactly the text sent
        assert len(llm.engine.history) == len(llm.tokenize(text)) + 1


def ask_for_toms_code(llm):
    """The facts and filler, then more filler ending on the cue for Tom's code, as two requests. Returns the stats
    after the first, which is longer than the cache and may recall inside itself (request_recall.py)."""
    text = FACTS + FILLER
    llm.create_completion(text, max_tokens=2, temperature=0.0)
    before = llm.stats
    llm.create_completion(
        text + FILLER + " As recorded at the start, the code for Tom is", max_tokens=2, temperature=0.0
    )
    return before


def test_morphkv_recalls_an_evicted_fact(gqa_model):
    with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        s0 = ask_for_toms_code(llm)
        s = llm.stats
        assert s.recall_checks - s0.recall_checks == 1 and s.recalls - s0.recalls == 1
        assert s.recalled_tokens > s0.recalled_tokens
        # recall's time: the block's decode and choosing (the rest); the cue's words found the fact, so no probe
        assert s.recall_probe_s == s0.recall_probe_s
        assert 0 < s.recall_block_s - s0.recall_block_s < s.recall_s - s0.recall_s
        assert any("The code for Tom is 90517." in t for t in recalled_text(llm))
        assert any(p >= BLOCK_LPOS for p in llm.engine.scorer.cell_lpos())


def test_the_model_is_asked_only_when_no_evicted_word_is_on_the_cue(gqa_model):
    """recall_by="both": a query probe costs a decode, so attention is asked only when the words of what the request
    asks find no evicted sentence."""
    with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64, recall_by="both")) as llm:
        text = FACTS + FILLER
        llm.create_completion(text, max_tokens=1, temperature=0.0)
        s0 = llm.stats  # longer than the cache: it may recall inside itself
        llm.create_completion(text + FILLER + " Zzqx qqv wwvx", max_tokens=1, temperature=0.0)
        s = llm.stats
        assert s.tokens_evicted > 0 and s.recall_checks == s0.recall_checks + 1
        assert s.recall_probe_s > s0.recall_probe_s  # nothing on the cue: the model's attention was asked
        before = s.recall_probe_s
        llm.create_completion(
            text + FILLER + " Zzqx qqv wwvx. As recorded, the code for Tom is", max_tokens=1, temperature=0.0
        )
        assert llm.stats.recall_checks == s0.recall_checks + 2
        assert llm.stats.recall_probe_s == before  # the words found it: no probe
        assert any("The code for Tom is 90517." in t for t in recalled_text(llm))


def test_by_default_only_the_words_choose_and_no_key_is_logged(gqa_model):
    """recall_by="bm25" (the default since stop 47): a request whose words find no evicted sentence gets nothing
    back and costs no query probe, and no key log is kept (docs/recall.md, "The words alone")."""
    with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        assert llm.engine.config.recall_by == "bm25" and llm.engine.keys is None
        text = FACTS + FILLER
        llm.create_completion(text, max_tokens=1, temperature=0.0)
        s0 = llm.stats
        llm.create_completion(text + FILLER + " Zzqx qqv wwvx", max_tokens=1, temperature=0.0)
        s = llm.stats
        assert s.tokens_evicted > 0 and s.recall_checks == s0.recall_checks + 1
        assert s.recalls == s0.recalls and s.recall_probe_s == 0.0 and s.recall_key_bytes == 0
        llm.create_completion(
            text + FILLER + " Zzqx qqv wwvx. As recorded, the code for Tom is", max_tokens=1, temperature=0.0
        )
        assert llm.stats.recalls == s0.recalls + 1  # the words still find what the request names
        assert any("The code for Tom is 90517." in t for t in recalled_text(llm))


def test_without_recall_nothing_comes_back(gqa_model):
    with Llama(gqa_model, kv_budget=96, recall=False, config=EngineConfig(n_ubatch=64)) as llm:
        text = FACTS + FILLER
        llm.create_completion(text, max_tokens=2, temperature=0.0)
        llm.create_completion(text + FILLER + " the code for Tom is", max_tokens=2, temperature=0.0)
        assert llm.stats.recalls == 0
        assert all(p < BLOCK_LPOS for p in llm.engine.scorer.cell_lpos())


def test_a_pinned_prefix_survives_5k_generated_tokens(gqa_model):
    keep = 24
    with Llama(gqa_model, kv_budget=128, keep=keep, config=EngineConfig(n_ubatch=64)) as llm:
        prompt = "SYSTEM: always answer in French. " * 2
        tokens = llm.tokenize(prompt)
        assert len(tokens) > keep
        gen = llm.generate(tokens, temp=0.0, logit_bias={llm.token_eos(): -1e9})
        for _ in range(5000):
            next(gen)
        gen.close()
        assert llm.stats.tokens_evicted > 4000 and llm.stats.compactions >= 0
        live = set(llm.engine.scorer.cell_lpos())
        assert set(range(keep)) <= live  # the first keep tokens, by their sequence index
        assert llm.stats.peak_cells <= 128 + 64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep=200), "keep=200"),
        (dict(keep=-1), "keep"),
        (dict(keep="everything"), "keep"),
        (dict(recall="yes"), "recall"),
        (dict(config=dict(recall_tokens=-2)), "recall_tokens"),
        (dict(config=dict(recall_log_bytes=-1)), "recall_log_bytes"),
    ],
)
def test_bad_recall_and_keep_settings_are_refused_by_name(gqa_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        if "config" in kwargs:
            kwargs = dict(config=EngineConfig(**kwargs["config"]))
        Llama(gqa_model, kv_budget=128, **kwargs)


# -- the real chat model ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kv_bytes", [None, 0])
def test_smollm2_chat_recalls_a_number_from_the_first_turn_after_two_stories(smollm2_path, tmp_path, kv_bytes):
    """kv_bytes None: the default, where the question's block is restored from saved rows (SmolLM2 has no
    sliding-window layers: resolve_kv_store_bytes); 0: recomputed, as every block was before stop 50."""
    cfg = EngineConfig(recall_kv_bytes=kv_bytes)
    with Llama(smollm2_path, kv_budget=256, keep="system", config=cfg) as llm:
        locker_number_then_two_stories(llm)
        assert llm.stats.tokens_evicted > 200
        n_sys = llm.engine.n_keep
        assert n_sys > 5 and set(range(n_sys)) <= set(llm.engine.scorer.cell_lpos())  # the system prompt is pinned
        llm.save_session(tmp_path / "chat.pme")
        question = [{"role": "user", "content": "What is my locker number?"}]
        ans = llm.continue_chat(question, max_tokens=20, temperature=0.0)["choices"][0]["message"]["content"]
        assert "90517" in ans and llm.stats.recalls >= 1
        restored = llm.stats.restored_tokens
        assert (0 < restored < llm.stats.recalled_tokens) if kv_bytes is None else restored == 0
        assert llm.stats.peak_cells <= 256 + 512
    with Llama(smollm2_path, kv_budget=256, keep="system", config=cfg) as again:  # recall works after a reload
        again.load_session(tmp_path / "chat.pme")
        before = again.stats.restored_tokens  # the counters come back with the session
        ans = again.continue_chat(question, max_tokens=20, temperature=0.0)["choices"][0]["message"]["content"]
        assert again.stats.recalls >= 1 and any("90517" in t for t in recalled_text(again))
        # saved rows are not written to session files, so after a reload the block is recomputed
        assert again.stats.restored_tokens == before
        if kv_bytes == 0:
            # with the default the stories' blocks were restored before the save and the question's is recomputed
            # after it: a cache that no uninterrupted run has, and on this machine SmolLM2 then explains what a
            # locker number is (docs/recall.md, "Chat blocks restored by default"); so the answer is checked where
            # the run is the same throughout
            assert "90517" in ans


# Gemma 3's template in short: system text folded into the first user turn, and roles that must alternate
ALTERNATING = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@pytest.mark.slow
def test_a_template_that_wants_alternating_roles_gets_recall_inside_the_new_message(smollm2_path):
    """Gemma's and Mistral's templates raise on two user messages in a row. Recall used to place its block as
    one, so every later turn of such a chat failed; now the block opens the new user message."""
    with Llama(smollm2_path, kv_budget=256, keep="system", chat_template=ALTERNATING) as llm:
        msgs = locker_number_then_two_stories(llm)
        assert llm.stats.tokens_evicted > 50
        question = [{"role": "user", "content": "What is my locker number?"}]
        llm.continue_chat(question, max_tokens=20, temperature=0.0)
        # the fact came back inside the new message; whether SmolLM2 then says it under this foreign template
        # follows the machine's rounding (it did on the machines before stop 44, not on an AMD EPYC), so the
        # answer itself is checked under the model's own template
        # (test_smollm2_chat_recalls_a_number_from_the_first_turn_after_two_stories)
        assert llm.stats.recalls >= 1
        assert any("90517" in t for t in recalled_text(llm))
        # the whole conversation still renders: what the cache holds is a well-formed chat for this template
        llm.create_chat_completion([*msgs, *question], max_tokens=1, temperature=0.0)


@pytest.mark.slow
def test_smollm2_system_prompt_pinned_at_budget_256_survives_5k_generated_tokens(smollm2_path):
    """The issue's pinning check on a real model: keep="system", budget 256, one answer of 5,000 tokens (the end of
    turn banned), then the cell map still holds every token of the system prompt by its sequence index."""
    with Llama(smollm2_path, kv_budget=256, keep="system") as llm:
        msgs = [
            {"role": "system", "content": "You are Ada, a patient tutor who always answers in short sentences."},
            {"role": "user", "content": "Tell me everything you know about the history of bridges."},
        ]
        banned = {llm.token_eos(): -1e9} | {t: -1e9 for t in llm.tokenize(b"<|im_end|>", add_bos=False, special=True)}
        r = llm.create_chat_completion(msgs, max_tokens=5000, temperature=0.0, logit_bias=banned, repeat_penalty=1.1)
        assert r["usage"]["completion_tokens"] == 5000
        n_sys = llm.engine.n_keep
        assert n_sys > 10 and set(range(n_sys)) <= set(llm.engine.scorer.cell_lpos())
        s = llm.stats
        assert s.tokens_evicted > 4500 and s.peak_cells <= 256 + 512 and s.cells_in_use <= 256


def test_attentions_pick_comes_back_with_the_sentence_after_it():
    """recall_select.with_next: the evicted sentence right after a pick joins it (a passage, not one sentence),
    unless kept text lies between them, it does not fit, or it is not admitted (a rival)."""
    from collections import Counter

    from pymorph_edge.engine.recall_select import Span

    def span(lo: int, hi: int) -> Span:
        return Span(lo, hi, Counter({f"w{lo}": 1}))

    lead, fact, later, far = span(10, 20), span(21, 30), span(30, 40), span(60, 70)
    spans = [far, later, fact, lead]
    assert with_next([lead], spans, 96) == [lead, fact]  # one wordless token ("\n") between them
    assert with_next([later], spans, 96) == [later]  # 20 kept tokens between it and the next evicted sentence
    assert with_next([lead], spans, 15) == [lead]  # the pair would not fit
    assert with_next([lead], spans, 96, lambda s: s is not fact) == [lead]  # a rival stays out
    assert with_next([lead, fact], spans, 96) == [lead, fact, later]  # each pick once, each neighbour once
