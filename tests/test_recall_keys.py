"""Recall by attention: the key log (native/pme_keylog.c, engine/key_log.py), the query probe, and the ranking
(engine/recall_keys.py)."""

from collections import Counter

import numpy as np
import pytest
from test_recall import FACTS, FILLER, NATIVE, in_cache, recalled_text

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.engine.key_log import KeyLog
from pymorph_edge.engine.recall_keys import attention_mass, key_layers, rank_by_attention
from pymorph_edge.engine.recall_select import Span

ATTENTION = EngineConfig(n_ubatch=64, recall_by="attention")


# -- without a model ----------------------------------------------------------------------------------------------
def test_key_log_is_bounded_and_follows_truncation():
    log = KeyLog([3, 5], n_head_kv=2, d_k=4, max_bytes=2 * 2 * 4 * 2 * 100)  # 100 tokens
    rows = np.arange(1000 * 16, dtype=np.float16).reshape(1000, 2, 2, 4)
    for i in range(0, 1000, 50):
        log.append(i, rows[i : i + 50])
    assert log.nbytes <= 100 * log.token_bytes and log.end == 1000
    assert np.array_equal(log.keys()[-1], rows[999])
    log.truncate(990)
    assert log.end == 990 and np.array_equal(log.keys()[-1], rows[989])
    log.append(990, rows[:1])  # a rewritten index replaces what was there
    assert log.end == 991 and np.array_equal(log.keys()[-1], rows[0])


def test_key_layers_are_spread_over_the_upper_two_thirds():
    assert key_layers(list(range(30)), 4) == [10, 16, 23, 29]
    assert key_layers([5, 11, 17], 4) == [11, 17]


def test_the_key_a_query_points_at_draws_the_attention():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(200, 1, 2, 16)).astype(np.float16)
    q = np.zeros((1, 3, 4, 16), np.float32)
    q[0, :, :2] = keys[120, 0, 0].astype(np.float32) * 3  # heads 0-1 share KV head 0
    q[0, :, 2:] = keys[40, 0, 1].astype(np.float32) * 3
    mass = attention_mass(q, np.array([1.0], np.float32), keys)
    assert mass.sum() == pytest.approx(1.0, rel=1e-5)
    assert set(np.argsort(mass)[-2:]) == {40, 120}
    only_second = attention_mass(q, np.array([1.0], np.float32), keys, np.array([[0.0, 1.0]]))
    assert only_second.sum() == pytest.approx(1.0, rel=1e-5) and np.argmax(only_second) == 40
    spans = [Span(0, 100, Counter()), Span(100, 150, Counter()), Span(150, 200, Counter())]
    assert [s.lo for _, s in rank_by_attention(spans, mass, 0)][0] in (0, 100)
    assert rank_by_attention(spans, np.full(200, 1 / 200), 0) == []  # nothing stands out: nothing recalled


# -- on the synthetic model ---------------------------------------------------------------------------------------
def test_logged_keys_are_the_same_whether_a_text_comes_in_one_chunk_or_token_by_token(gqa_model):
    """Each token's logged keys are its own K rows, whatever cell and ubatch it landed in."""
    cfg = EngineConfig(n_ubatch=64, recall_by="attention")
    with (
        Llama(gqa_model, kv_budget=192, recall=True, config=cfg) as a,
        Llama(gqa_model, kv_budget=192, recall=True, config=cfg) as b,
    ):
        toks = a.tokenize(FACTS)[:40]
        a.engine.decode(toks)
        for t in toks:
            b.engine.decode([t])
        ka, kb = a.engine.keys.keys().astype(np.float32), b.engine.keys.keys().astype(np.float32)
        assert a.engine.keys.end == b.engine.keys.end == 40 and len(a.engine.keys.layers) > 0
        assert np.abs(ka).max() > 0
        np.testing.assert_allclose(ka, kb, atol=2e-2 * np.abs(ka).max())


def test_a_query_probe_leaves_no_trace(gqa_model):
    with Llama(gqa_model, kv_budget=128, recall=True, config=ATTENTION) as llm:
        text = FACTS + FILLER
        llm.create_completion(text, max_tokens=1, temperature=0.0)
        eng = llm.engine
        before = (eng.scorer.cell_lpos(), eng.n_past, eng.next_pos, eng.keys.end)
        q, scales = eng.query_probe(llm.tokenize(" the code for Tom is", add_bos=False))
        assert q.shape[0] == len(eng.keys.layers) and q.shape[2] == eng.model.info.n_head and np.isfinite(q).all()
        assert (eng.scorer.cell_lpos(), eng.n_past, eng.next_pos, eng.keys.end) == before
        with Llama(gqa_model, kv_budget=128, recall=True, config=ATTENTION) as ref:
            ref.create_completion(text, max_tokens=1, temperature=0.0)
            more = text + " More text."
            assert (
                llm.create_completion(more, max_tokens=8, temperature=0.0)["choices"][0]["text"]
                == ref.create_completion(more, max_tokens=8, temperature=0.0)["choices"][0]["text"]
            )


@pytest.mark.parametrize("policy", NATIVE)
def test_recall_by_attention_works_for_every_native_policy(gqa_model, policy):
    with Llama(gqa_model, kv_budget=192, policy=policy, recall=True, config=ATTENTION) as llm:
        text = FACTS + FILLER
        llm.create_completion(text, max_tokens=2, temperature=0.0)
        text += FILLER + " As recorded at the start, the code for Tom is"
        llm.create_completion(text, max_tokens=2, temperature=0.0)
        s = llm.stats
        assert s.peak_cells <= 192 + 64
        assert llm.engine.keys.end == llm.engine.n_past  # the keys of every decoded token
        assert len(llm.engine.history) == len(llm.tokenize(text)) + 1
        lo = len(llm.tokenize(FACTS.split(" The code for Tom")[0]))
        hi = len(llm.tokenize(FACTS.split(" The code for Aiko")[0]))
        # the synthetic model's attention means nothing, so only the mechanism is asserted: what came back is
        # whole logged sentences, and the fact is in the cache whenever recall chose it
        assert all(t.strip() for t in recalled_text(llm))
        assert not any("The code for Tom is 90517." in t for t in recalled_text(llm)) or in_cache(llm, lo, hi)


def test_recall_time_counts_a_look_that_found_nothing(gqa_model):
    """(The split of a look that recalled something: test_recall.py::test_morphkv_recalls_an_evicted_fact.)"""
    with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64, recall_by="bm25")) as llm:
        text = FACTS + FILLER
        llm.create_completion(text, max_tokens=1, temperature=0.0)  # longer than the cache: may recall inside
        s = llm.stats
        # no evicted word is rarer than the filler's: a look that finds nothing, and no probe by the words alone
        llm.create_completion(text + " Zzqx qqv wwvx.", max_tokens=1, temperature=0.0)
        t = llm.stats
        assert llm.stats.tokens_evicted > 0
        looked = (t.recall_checks - s.recall_checks, t.recalls - s.recalls)
        assert looked == (1, 0) and (t.recall_probe_s, t.recall_block_s) == (s.recall_probe_s, s.recall_block_s)
        assert t.recall_s > s.recall_s


def test_recall_by_is_checked_by_name():
    with pytest.raises(ValueError, match="recall_by"):
        EngineConfig(recall_by="embeddings")
    with pytest.raises(ValueError, match="recall_key_bytes"):
        EngineConfig(recall_key_bytes=-5)


def test_queries_read_with_flash_attention_off_are_those_it_reads_with_it_on(gqa_model):
    """Off, Q is read through kq = mul_mat(K, Q) after the softmax node ran: this checks ggml-alloc had not yet
    reused Q's memory, against the flash attention node, whose sources are intact when it ran."""
    qs = []
    for fa in (False, True):
        cfg = EngineConfig(n_ubatch=64, recall_by="attention", flash_attn=fa)
        with Llama(gqa_model, kv_budget=128, recall=True, config=cfg) as llm:
            llm.create_completion(FACTS, max_tokens=1, temperature=0.0)
            qs.append(llm.engine.query_probe(llm.tokenize(" the code for Tom is", add_bos=False))[0])
    off, on = qs
    assert off.shape == on.shape
    for layer in range(off.shape[0]):
        assert np.corrcoef(off[layer].ravel(), on[layer].ravel())[0, 1] > 0.999


def test_a_kept_conversation_keeps_its_keys_and_a_session_file_starts_them_afresh(gqa_model, tmp_path):
    from pymorph_edge.engine import engine_snapshot

    with Llama(gqa_model, kv_budget=128, recall=True, config=ATTENTION) as llm:
        llm.create_completion(FACTS + FILLER, max_tokens=1, temperature=0.0)
        eng = llm.engine
        snap = engine_snapshot.capture(eng)
        keys = eng.keys.keys().copy()
        assert snap.nbytes >= eng.keys.nbytes > 0
        llm.reset()
        llm.create_completion("Something else entirely.", max_tokens=1, temperature=0.0)
        engine_snapshot.restore(eng, snap)  # what the server does when a kept conversation comes back
        assert eng.keys.start == 0 and np.array_equal(eng.keys.keys(), keys)
        llm.save_session(tmp_path / "s.pme")
    with Llama(gqa_model, kv_budget=128, recall=True, config=ATTENTION) as again:
        again.load_session(tmp_path / "s.pme")
        e = again.engine
        assert e.keys is None or (e.keys.start == e.n_past and e.keys.end == e.n_past)
