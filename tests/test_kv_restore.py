"""Evicted tokens' K/V rows saved at eviction and written back into cells llama.cpp allocates (native/pme_kvstore.c,
KVEngine.restore_run, EngineConfig(recall_kv_bytes))."""

import llama_cpp.llama_cpp as C
import numpy as np
import pytest
from chat_helpers import locker_number_then_two_stories, recalled_text

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.engine import recall, recall_decoding
from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

TEXT = [(i * 7919) % 200 + 10 for i in range(100)]


def _logits(llm, n_vocab):
    return np.ctypeslib.as_array(C.llama_get_logits_ith(llm.engine.ctx, -1), shape=(n_vocab,)).copy()


@pytest.mark.parametrize("flash_attn", [False, True])
def test_restoring_every_evicted_token_in_place_gives_the_full_caches_logits(gqa_model, flash_attn):
    with Llama(gqa_model, kv_budget=None, n_ctx=256, config=EngineConfig(flash_attn=flash_attn)) as ref:
        ref.engine.decode(TEXT + [77])
        want = _logits(ref, ref.n_vocab())
    # one ubatch: every token's KV is computed with the whole text in view, as the full cache's is, and the
    # eviction after it is the only one
    cfg = EngineConfig(n_ubatch=128, flash_attn=flash_attn, recall_kv_bytes=1 << 22)
    with Llama(gqa_model, kv_budget=48, config=cfg, recall=False) as llm:
        eng = llm.engine
        eng.decode(TEXT, logits_last=False)
        live = {p for p in eng.scorer.cell_lpos() if p >= 0}
        gone = [i for i in range(len(TEXT)) if i not in live]
        assert gone and eng.scorer.kvstore_bytes() > 0
        runs, run = [], [gone[0]]
        for i in gone[1:]:
            if i == run[-1] + 1:
                run.append(i)
            else:
                runs.append(run)
                run = [i]
        runs.append(run)
        for r in runs:  # back where they were: no compaction ran, so the logical positions are the positions
            assert eng.restore_run(r, [TEXT[i] for i in r], r[0])
        assert sorted(p for p in eng.scorer.cell_positions() if p >= 0) == list(range(len(TEXT)))
        assert C.llama_memory_seq_pos_max(eng.mem, 1) == -1 and C.llama_memory_seq_pos_max(eng.mem, 0) == 99
        eng.decode([77])
        got = _logits(llm, llm.n_vocab())
    # the restored cells sit elsewhere in the cache, so the sums over cells run in another order; flash attention's
    # blockwise softmax (f16 K/V products) moves more with that than the plain one. Without the restore: 0.45.
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-3 if flash_attn else 2e-4)


def test_without_the_restore_the_logits_differ(gqa_model):
    """The control: the evicted tokens matter to the next token's logits, so the test above can fail."""
    with Llama(gqa_model, kv_budget=None, n_ctx=256) as ref:
        ref.engine.decode(TEXT + [77])
        want = _logits(ref, ref.n_vocab())
    with Llama(gqa_model, kv_budget=48, config=EngineConfig(n_ubatch=128), recall=False) as llm:
        llm.engine.decode(TEXT, logits_last=False)
        llm.engine.decode([77])
        got = _logits(llm, llm.n_vocab())
    assert np.abs(got - want).max() > 1e-2


def test_a_run_restored_elsewhere_and_moved_back_is_rerotated_both_ways(gqa_model):
    """restore_run at the next positions (llama.cpp re-rotates the K rows by the move at the next decode), then
    moved back in place by hand: the logits come back to the full cache's within two f16 rotations' rounding."""
    with Llama(gqa_model, kv_budget=None, n_ctx=256) as ref:
        ref.engine.decode(TEXT + [77])
        want = _logits(ref, ref.n_vocab())
    cfg = EngineConfig(n_ubatch=128, recall_kv_bytes=1 << 22)
    with Llama(gqa_model, kv_budget=48, config=cfg, recall=False) as llm:
        eng, mem = llm.engine, llm.engine.mem
        eng.decode(TEXT, logits_last=False)
        live = {p for p in eng.scorer.cell_lpos() if p >= 0}
        gone = [i for i in range(len(TEXT)) if i not in live]
        end = len(TEXT) + len(gone)
        for k, i in enumerate(gone):  # one token a run, each to the next position after the text
            assert eng.restore_run([i], [TEXT[i]], len(TEXT) + k)
        assert C.llama_memory_seq_pos_max(mem, 0) == end - 1
        assert _raw_decode(eng, 5, end) == 0  # applies the pending K shift to the restored cells
        assert C.llama_memory_seq_rm(mem, 0, end, end + 1)
        for k, i in enumerate(gone):
            C.llama_memory_seq_add(mem, 0, len(TEXT) + k, len(TEXT) + k + 1, i - len(TEXT) - k)
        assert C.llama_memory_seq_pos_max(mem, 0) == len(TEXT) - 1
        assert _raw_decode(eng, 77, len(TEXT)) == 0  # the K shift back, then the token
        got = _logits(llm, llm.n_vocab())
    # each move re-rotates an f16 K row and rounds it again (measured 5.8e-3 at most); without the restore, 0.45
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2)


def _restored_at_the_next_positions(path, rotate, monkeypatch, n_text=100, flash_attn=False, n_restore=48):
    """Evict part of the text, restore each evicted run at the positions after it, then decode one token: its
    logits. rotate: the scorer re-rotates the saved K rows as it writes them; else llama.cpp's K shift moves them."""
    monkeypatch.setattr(recall_decoding, "ROTATE_ON_RESTORE", rotate)
    text = (TEXT * (n_text // len(TEXT) + 1))[:n_text]
    cfg = EngineConfig(n_ubatch=128, flash_attn=flash_attn, recall_kv_bytes=1 << 24)
    with Llama(path, kv_budget=n_text // 2, config=cfg, recall=False) as llm:
        eng = llm.engine
        for i in range(0, n_text, 128):
            eng.decode(text[i : i + 128], logits_last=False)
        assert eng.scorer.kvstore_rotates()  # f16 K, normal RoPE, no sliding window
        live = {p for p in eng.scorer.cell_lpos() if p >= 0}
        gone = [i for i in range(n_text) if i not in live][:n_restore]  # room in the cache beside the budget
        runs, at = [], n_text
        for i in gone:
            if runs and i == runs[-1][-1] + 1 and len(runs[-1]) < 16:
                runs[-1].append(i)
            else:
                runs.append([i])
        for r in runs:
            assert eng.restore_run(r, [text[i] for i in r], at)
            at += len(r)
        assert C.llama_memory_seq_pos_max(eng.mem, 0) == at - 1
        assert _raw_decode(eng, 77, at) == 0
        return _logits(llm, llm.n_vocab())


@pytest.mark.parametrize("flash_attn", [False, True])
def test_a_run_restored_at_new_positions_is_rotated_as_llama_cpps_shift_rotates_it(gqa_model, monkeypatch, flash_attn):
    """native/pme_kvrotate.c turns each restored K row by the position difference with the layer's own RoPE (read off
    the graph), instead of llama_memory_seq_add, whose K shift re-rotates every cell of the cache at the next decode.
    Same arithmetic: the next token's logits are the same floats."""
    shifted = _restored_at_the_next_positions(gqa_model, False, monkeypatch, flash_attn=flash_attn)
    rotated = _restored_at_the_next_positions(gqa_model, True, monkeypatch, flash_attn=flash_attn)
    np.testing.assert_array_equal(rotated, shifted)


def test_a_quantized_k_keeps_llama_cpps_shift(synthetic_dir):
    """llama.cpp dequantises, rotates and requantises a q8_0 K (with a Hadamard product around it): not redone here."""
    path = write_synthetic_llama(synthetic_dir / "head32.gguf", n_head=4, n_head_kv=2, n_embd=128)  # 32-value heads
    cfg = EngineConfig(n_ubatch=128, recall_kv_bytes=1 << 24, type_k="q8_0", flash_attn=True)
    with Llama(str(path), kv_budget=48, config=cfg, recall=False) as llm:
        llm.engine.decode(TEXT, logits_last=False)
        assert llm.engine.scorer.kvstore_bytes() > 0 and not llm.engine.scorer.kvstore_rotates()


def test_iswa_models_keep_llama_cpps_shift(iswa_model, monkeypatch):
    """Not on iSWA models yet: on Gemma 3 two single-token runs restored one after the other came out up to 1.35 apart
    in a logit from llama.cpp's shift (one run of any length matched to the bit); so the run is moved as before."""
    cfg = EngineConfig(n_ubatch=128, recall_kv_bytes=1 << 24)
    with Llama(iswa_model, kv_budget=64, config=cfg, recall=False) as llm:
        llm.engine.decode(TEXT, logits_last=False)
        assert not llm.engine.scorer.kvstore_rotates()


@pytest.mark.slow
def test_smollm2_restored_at_new_positions_matches_llama_cpps_shift(smollm2_path, monkeypatch):
    """48 evicted tokens in runs of up to 16, each restored after the text: the same floats as llama.cpp's shift."""
    shifted = _restored_at_the_next_positions(smollm2_path, False, monkeypatch, n_text=600)
    rotated = _restored_at_the_next_positions(smollm2_path, True, monkeypatch, n_text=600)
    np.testing.assert_array_equal(rotated, shifted)


def test_a_marked_kv_store_answers_again_after_a_load_state(gqa_model):
    """The benchmark hook (recall_latency.py --repeats): a load_state forgets the saved rows, a rewind to the mark
    taken with the state brings them back, and rows saved after the mark are dropped."""
    cfg = EngineConfig(n_ubatch=128, recall_kv_bytes=1 << 24)
    with Llama(gqa_model, kv_budget=48, config=cfg, recall=False) as llm:
        eng = llm.engine
        eng.decode(TEXT, logits_last=False)
        live = {p for p in eng.scorer.cell_lpos() if p >= 0}
        gone = [i for i in range(len(TEXT)) if i not in live]
        state, mark, bytes_then = llm.save_state(), eng.scorer.kvstore_mark(), eng.scorer.kvstore_bytes()
        assert mark is not None and eng.restorable([(gone[0], gone[0] + 1)])
        eng.decode(TEXT[:40], logits_last=False)  # evicts more after the mark
        assert eng.scorer.kvstore_bytes() > bytes_then
        llm.load_state(state)
        assert not eng.restorable([(gone[0], gone[0] + 1)])  # forgotten
        eng.scorer.kvstore_rewind(mark)
        assert eng.scorer.kvstore_bytes() == bytes_then and eng.restorable([(gone[0], gone[0] + 1)])


def _raw_decode(eng, tok, pos):
    """One token on sequence 0 straight through llama.cpp (these positions moved behind the scorer's map)."""
    b = C.llama_batch_init(1, 0, 1)
    b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0] = tok, pos, 1, 1
    b.seq_id[0][0] = 0
    b.n_tokens = 1
    eng.scorer.begin(pos, 1, False)
    rc = C.llama_decode(eng.ctx, b)
    C.llama_batch_free(b)
    return rc


@pytest.mark.slow
def test_smollm2_chat_restores_the_recalled_fact_instead_of_recomputing_it(smollm2_path, tmp_path):
    cfg = EngineConfig(recall_kv_bytes=64 << 20)
    with Llama(smollm2_path, kv_budget=256, keep="system", config=cfg) as llm:
        locker_number_then_two_stories(llm)
        llm.save_session(tmp_path / "chat.pme")
        before = llm.stats.restored_tokens
        question = [{"role": "user", "content": "What is my locker number?"}]
        llm.continue_chat(question, max_tokens=20, temperature=0.0)
        s = llm.stats
        # the fact is back, restored; whether SmolLM2 then says it follows the machine's rounding with restored rows
        # (it did on the machines before stop 44, not on an AMD EPYC: docs/recall.md, "Why it is not the default")
        assert s.recalls >= 1 and s.restored_tokens > before and any("90517" in t for t in recalled_text(llm))
        assert s.restored_tokens < s.recalled_tokens  # the wrap's own tokens are decoded
        assert s.peak_cells <= 256 + 512
    with Llama(smollm2_path, kv_budget=256, keep="system", config=cfg) as again:  # recall works after a reload
        again.load_session(tmp_path / "chat.pme")
        again.continue_chat(question, max_tokens=20, temperature=0.0)
        assert again.stats.recalls >= 1
        assert any("90517" in t for t in recalled_text(again))


def _restored_question_turn(smollm2_path, ride, monkeypatch):
    monkeypatch.setattr(recall, "RIDE_RESTORED_WRAP", ride)
    with Llama(smollm2_path, kv_budget=256, keep="system", config=EngineConfig(recall_kv_bytes=64 << 20)) as llm:
        locker_number_then_two_stories(llm)
        before = (llm.stats.ubatches, llm.stats.restored_tokens)
        question = [{"role": "user", "content": "What is my locker number?"}]
        ans = llm.continue_chat(question, max_tokens=20, temperature=0.0)["choices"][0]["message"]["content"]
        n_answer = len(llm.tokenize(ans.encode(), add_bos=False, special=True))
        assert llm.stats.peak_cells <= 256 + 512
        return ans, llm.stats.ubatches - before[0] - n_answer, llm.stats.restored_tokens - before[1]


@pytest.mark.slow
def test_smollm2_restored_blocks_wrap_rides_in_the_turns_own_ubatches(smollm2_path, monkeypatch):
    """recall._restore_riding: the label goes in with the new message's header, the text after the restored runs with
    the question's first chunk, so a restore adds no ubatch of its own (two fewer than decoding them apart), and the
    answer still has the number."""
    ans, ubatches, restored = _restored_question_turn(smollm2_path, True, monkeypatch)
    ans_apart, ubatches_apart, restored_apart = _restored_question_turn(smollm2_path, False, monkeypatch)
    assert "90517" in ans and "90517" in ans_apart
    assert restored > 0 and restored == restored_apart
    assert ubatches_apart - ubatches == 2


@pytest.fixture(scope="module")
def iswa_model(synthetic_dir):
    """Gemma 3's layout in miniature: layers 0-4 see the last 16 tokens, layer 5 all of them."""
    return str(
        write_synthetic_llama(
            synthetic_dir / "iswa.gguf", n_head=4, n_head_kv=1, n_embd=128, n_layer=6, arch="gemma3", n_swa=16
        )
    )


def _evicted_inside_the_window(path, n_text, lo, hi, restore, flash_attn):
    """Decode the text, evict [lo, hi) (inside the sliding window of what comes next) from both caches as the policy
    would, optionally restore it in place from the saved rows, then decode one token: its logits."""
    text = (TEXT * 8)[:n_text]
    cfg = EngineConfig(n_ubatch=128, flash_attn=flash_attn, recall_kv_bytes=1 << 24)
    with Llama(path, kv_budget=n_text + 32, config=cfg, recall=False, window=4) as llm:
        eng = llm.engine
        for i in range(0, n_text, 128):
            eng.decode(text[i : i + 128], logits_last=False)
        assert eng.scorer._lib.pme_test_evict_range(eng.scorer._state, eng.scorer._mem(eng.mem), 0, lo, hi) == hi - lo
        if restore:
            assert eng.restore_run(list(range(lo, hi)), text[lo:hi], lo)
            assert sorted(p for p in eng.scorer.cell_positions() if p >= 0) == list(range(n_text))
        eng.decode([77])
        return _logits(llm, llm.n_vocab())


def _full_cache(path, n_text, flash_attn, n_ctx=256):
    with Llama(path, kv_budget=None, n_ctx=n_ctx, config=EngineConfig(n_ubatch=128, flash_attn=flash_attn)) as ref:
        text = (TEXT * 8)[:n_text]
        for i in range(0, n_text, 128):
            ref.engine.decode(text[i : i + 128], logits_last=False)
        ref.engine.decode([77])
        return _logits(ref, ref.n_vocab())


@pytest.mark.parametrize("flash_attn", [False, True])
def test_iswa_tokens_restored_inside_the_window_give_the_full_caches_logits(iswa_model, flash_attn):
    """The sliding-window layers' rows come from the ring captured as each ubatch ended (llama.cpp drops them from
    its own cache once a token leaves the window), the global layer's from the eviction: with both written back,
    the next token sees what the full cache shows it. Tokens 90-95 are inside the window of token 100."""
    want = _full_cache(iswa_model, 100, flash_attn)
    got = _evicted_inside_the_window(iswa_model, 100, 90, 96, True, flash_attn)
    lost = _evicted_inside_the_window(iswa_model, 100, 90, 96, False, flash_attn)
    assert np.abs(lost - want).max() > 1e-2  # the control: the evicted tokens matter, so this test can fail
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-3 if flash_attn else 2e-4)


@pytest.mark.slow
def test_gemma_tokens_restored_inside_the_window_give_the_full_caches_logits(gemma_path):
    """The same on Gemma 3 270M (15 sliding-window layers, 3 global), 700 tokens: 600-629 evicted and restored."""
    want = _full_cache(gemma_path, 700, False, 1024)
    got = _evicted_inside_the_window(gemma_path, 700, 600, 630, True, False)
    lost = _evicted_inside_the_window(gemma_path, 700, 600, 630, False, False)
    assert np.abs(lost - want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2)  # measured 0.0 (the same cells); lost: 4.2
