"""Continuing on the compressed cache: what is reused, what is rolled back, and that the cache stays consistent."""

from kv_introspect import llama_cell_positions

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.engine.prefix_reuse import reusable_prefix


def test_reusable_prefix_rules():
    h = [1, 2, 3, 4, 5]
    assert reusable_prefix(h, [1, 2, 3, 4, 5, 6, 7], live_from=3) == 5  # extends the history: keep it all
    assert reusable_prefix(h, [1, 2, 3, 9], live_from=3) == 3  # diverges in the live tail: roll back
    assert reusable_prefix(h, [1, 2, 9], live_from=3) == 0  # would need an evicted position
    assert reusable_prefix(h, [1, 2, 3, 4, 5], live_from=0) == 4  # same prompt: redo the last token
    assert reusable_prefix(h, [7, 8], live_from=0) == 0


def test_second_chat_turn_decodes_only_the_new_tokens(gqa_model):
    with Llama(gqa_model, kv_budget=128, config=EngineConfig(n_ubatch=32)) as llm:
        msgs = [{"role": "user", "content": "hello there " * 20}]
        # llama.cpp's built-in templates are C strings: keep the random model from emitting a NUL byte (token 3)
        ban = {llm.token_eos(): -1e9, 3: -1e9}
        first = llm.create_chat_completion(msgs, max_tokens=150, temperature=0, logit_bias=ban)
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        decoded_before = llm.stats.tokens_decoded
        assert llm.stats.tokens_evicted > 0  # the first turn already outgrew the budget
        msgs += [first["choices"][0]["message"], {"role": "user", "content": "and again"}]
        second = llm.create_chat_completion(msgs, max_tokens=20, temperature=0, logit_bias=ban)
        u = second["usage"]
        cached = u["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0.8 * u["prompt_tokens"]
        assert llm.stats.tokens_decoded - decoded_before == u["prompt_tokens"] - cached + u["completion_tokens"] - 1
        assert llm.stats.cells_in_use <= 128


def test_rollback_keeps_the_cell_map_true(gqa_model):
    with Llama(gqa_model, kv_budget=128, window=8, config=EngineConfig(n_ubatch=32)) as llm:
        eng = llm.engine
        base = llm.tokenize("abcdefgh" * 30)
        eng.decode(base)
        assert eng.live_from() <= len(base) - 8  # at least the window is whole
        keep = len(base) - 5
        eng.truncate(keep)
        assert eng.next_pos == keep and len(eng.history) == keep
        assert [p for p in eng.cell_positions() if p >= 0] == llama_cell_positions(eng.ctx)
        assert max(eng.cell_positions()) == keep - 1
        eng.decode([7, 8, 9])
        assert [p for p in eng.cell_positions() if p >= 0] == llama_cell_positions(eng.ctx)
        assert eng.history.tail(3) == [7, 8, 9] and eng.next_pos == keep + 3


def test_full_cache_continuation_equals_fresh_prefill(gqa_model):
    prompt = "the cat sat on the mat " * 10
    with Llama(gqa_model, kv_budget=None, n_ctx=2048) as llm:
        a = llm.create_completion(prompt, max_tokens=30, temperature=0)["choices"][0]["text"]
        longer = prompt + a + " and then"
        cont = llm.create_completion(longer, max_tokens=30, temperature=0)
    with Llama(gqa_model, kv_budget=None, n_ctx=2048) as fresh:
        ref = fresh.create_completion(longer, max_tokens=30, temperature=0)
    assert cont["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert cont["choices"][0]["text"] == ref["choices"][0]["text"]


def test_interrupted_stream_leaves_a_usable_cache(gqa_model):
    with Llama(gqa_model, kv_budget=64, config=EngineConfig(n_ubatch=16)) as llm:
        it = llm.create_completion("x" * 50, max_tokens=500, temperature=0, stream=True)
        for i, _ in enumerate(it):
            if i == 10:
                break
        it.close()
        out = llm.create_completion("y" * 20, max_tokens=5, temperature=0)
        assert out["usage"]["completion_tokens"] >= 1 and llm.stats.cells_in_use <= 64


def test_a_chat_answer_stopped_early_is_still_continued(gqa_model):
    with Llama(gqa_model, kv_budget=128, config=EngineConfig(n_ubatch=32)) as llm:
        ban = {llm.token_eos(): -1e9, 3: -1e9}  # no end of turn, no NUL (C-string templates)
        msgs = [{"role": "user", "content": "talk to me"}]
        stream = llm.create_chat_completion(msgs, max_tokens=1000, temperature=0.8, seed=3, logit_bias=ban, stream=True)
        reply = ""
        for i, chunk in enumerate(stream):
            reply += chunk["choices"][0]["delta"].get("content", "")
            if i == 60:
                stream.close()  # what the CLI does on Ctrl-C
                break
        in_cache = len(llm.engine.history)
        assert in_cache > 60
        msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "go on"}]
        out = llm.create_chat_completion(msgs, max_tokens=5, temperature=0, logit_bias=ban)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == in_cache  # everything decoded is reused
