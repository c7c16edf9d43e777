"""MorphKV's prefill probe: a prompt longer than the cache is scored chunk by chunk by its own last
tokens, which are decoded after each chunk and removed again (pymorph_edge/kv_engine.py)."""

import pytest

from pymorph_edge import EngineConfig, Llama, MorphKV


def prefill(path, policy, n, budget=256, ubatch=128):
    llm = Llama(path, kv_budget=budget, policy=policy, config=EngineConfig(n_ubatch=ubatch))
    prompt = [3 + (i * 7) % 250 for i in range(n)]
    llm.engine.decode(prompt)
    return llm, prompt


def test_probes_run_once_per_evicting_chunk_and_leave_no_trace(gqa_model):
    budget, ubatch, w = 256, 128, 32
    llm, prompt = prefill(gqa_model, MorphKV(window=w, head_weights="uniform"), 1024, budget, ubatch)
    with llm:
        s = llm.stats
        step = ubatch - w  # a chunk leaves room in the ubatch for the probe
        chunks = -(-1024 // step)
        # chunks 1 and 2 (96, 192 cells) fit the budget; every later chunk but the last is probed
        probes = sum(1 for k in range(1, chunks) if min(k * step, budget + step) > budget)
        assert s.ubatches == chunks + probes
        assert s.tokens_decoded == 1024  # probe tokens are not part of the sequence
        assert s.peak_cells <= budget + ubatch
        assert s.cells_in_use <= budget
        live = [p for p in llm.engine.cell_positions() if p >= 0]
        assert max(live) == 1023 and len(live) == len(set(live))  # nothing left at the probe's positions
        assert llm.engine.live_from() <= 1024 - w  # the window is whole
        assert llm.engine.history.tail(w) == prompt[-w:]


def test_without_probe_the_chunks_are_all_the_decodes(gqa_model):
    llm, _ = prefill(gqa_model, MorphKV(window=32, head_weights="uniform", prefill_probe=False), 1024)
    with llm:
        assert llm.stats.ubatches == 1024 // 128


def test_a_prompt_within_the_cache_needs_no_probe(gqa_model):
    llm, _ = prefill(gqa_model, MorphKV(window=32, head_weights="uniform"), 250)
    with llm:
        assert llm.stats.ubatches == -(-250 // 96)  # chunks only: nothing was evicted before the last


@pytest.mark.parametrize(
    "bad", [{"prefill_probe": 1}, {"pool_decode": "yes"}, {"pool_after": -1}, {"head_weights": "learned"}]
)
def test_bad_probe_and_head_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MorphKV(**bad)


def test_a_request_decoded_in_two_parts_is_probed_by_its_own_end(gqa_model):
    """decode(head, then=rest): a completion whose recalled block goes before its last sentence decodes the text
    before it first. Its chunks are sized and probed as the whole request's, by the request's last tokens, and the
    head's last chunk is probed too (the question is not in it)."""
    budget, ubatch, w = 256, 128, 32
    with Llama(
        gqa_model,
        kv_budget=budget,
        policy=MorphKV(window=w, head_weights="uniform"),
        config=EngineConfig(n_ubatch=ubatch),
    ) as llm:
        prompt = [3 + (i * 7) % 250 for i in range(1024)]
        head, rest = prompt[:1000], prompt[1000:]
        seen = []
        real = llm.engine._decode_ubatch

        def spy(chunk, *args, **kw):
            if kw.get("probe"):
                seen.append(list(chunk))
            return real(chunk, *args, **kw)

        llm.engine._decode_ubatch = spy
        llm.engine.decode(head, then=rest)
        step = ubatch - w
        chunks = -(-1000 // step)
        probes = sum(1 for k in range(1, chunks + 1) if min(k * step, budget + step) > budget)
        assert llm.stats.ubatches == chunks + probes and len(seen) == probes
        assert all(p == prompt[-w:] for p in seen)  # the request's end, not the head's
        assert llm.stats.tokens_decoded == 1000
        llm.engine.decode(rest)  # a single chunk: no probe
        assert len(seen) == probes and llm.engine.history.tail(w) == prompt[-w:]
