"""Drop-in for llama_cpp.Llama: one script of the calls apps make, run against llama_cpp.Llama and against
pymorph_edge.Llama on SmolLM2 (full cache, and a budget these short prompts never reach). Every call that works
there must work here, with the same result."""

from __future__ import annotations

import json
import math

import llama_cpp
import pytest

import pymorph_edge
from pymorph_edge.model.default_model import smollm2_model_path

pytestmark = pytest.mark.slow

COMMON = dict(n_ctx=2048, n_threads=2, verbose=False, seed=42, n_gpu_layers=-1)
CAT = [{"role": "user", "content": "Give me a JSON object describing a cat with a name and an age."}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
                "required": ["city", "unit"],
            },
        },
    }
]
CAT_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def text(r):
    return r["choices"][0]["text"]


def content(r):
    return r["choices"][0]["message"]["content"]


def args(r):
    return json.loads(r["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])


# name -> (call, how to read the comparable result)
SCRIPT = {
    "__call__ echo stop": (
        lambda m: m("The capital of France is", max_tokens=20, stop=["."], echo=True, temperature=0),
        text,
    ),
    "completion greedy": (lambda m: m.create_completion("Once upon a time", max_tokens=24, temperature=0), text),
    "completion seeded": (
        lambda m: m.create_completion("Once upon a time", max_tokens=16, temperature=0.8, seed=7),
        text,
    ),
    "typical_p": (lambda m: m.create_completion("Once upon a time", max_tokens=16, typical_p=0.9, seed=3), text),
    "mirostat 2": (lambda m: m.create_completion("Once upon a time", max_tokens=16, mirostat_mode=2, seed=3), text),
    "mirostat 1": (lambda m: m.create_completion("Once upon a time", max_tokens=16, mirostat_mode=1, seed=3), text),
    "penalties": (
        lambda m: m.create_completion(
            "List: apples, apples,",
            max_tokens=16,
            temperature=0,
            repeat_penalty=1.3,
            frequency_penalty=0.5,
            presence_penalty=0.5,
        ),
        text,
    ),
    "logit_bias": (
        lambda m: m.create_completion("Yes or no?", max_tokens=8, temperature=0, logit_bias={"5248": 5.0}),
        text,
    ),
    "grammar": (
        lambda m: m.create_completion(
            "Is the sky blue? Answer:",
            max_tokens=8,
            temperature=0,
            grammar=llama_cpp.LlamaGrammar.from_string('root ::= " yes" | " no"', verbose=False),
        ),
        text,
    ),
    "stream": (
        lambda m: "".join(
            c["choices"][0]["text"] for c in m.create_completion("Hello", max_tokens=12, temperature=0, stream=True)
        ),
        lambda r: r,
    ),
    "chat": (lambda m: m.create_chat_completion(CAT, max_tokens=40, temperature=0), content),
    "chat stream": (
        lambda m: "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in m.create_chat_completion(CAT, max_tokens=24, temperature=0, stream=True)
        ),
        lambda r: r,
    ),
    "json_object": (
        lambda m: m.create_chat_completion(CAT, max_tokens=80, temperature=0, response_format={"type": "json_object"}),
        lambda r: json.loads(content(r)),
    ),
    "json schema": (
        lambda m: m.create_chat_completion(
            CAT, max_tokens=80, temperature=0, response_format={"type": "json_object", "schema": CAT_SCHEMA}
        ),
        lambda r: json.loads(content(r)),
    ),
    "tool call": (
        lambda m: m.create_chat_completion(
            WEATHER,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=60,
            temperature=0,
        ),
        args,
    ),
    "legacy function call": (
        lambda m: m.create_chat_completion(
            WEATHER,
            functions=[TOOLS[0]["function"]],
            function_call={"name": "get_weather"},
            max_tokens=60,
            temperature=0,
        ),
        args,
    ),
    "tokens": (lambda m: m.tokenize(b"Hello world", add_bos=True, special=False), lambda r: r),
    "detokenize": (lambda m: m.detokenize(m.tokenize(b"Hello world")), lambda r: r),
    "sizes": (lambda m: (m.n_vocab(), m.n_embd(), m.token_bos(), m.token_eos(), m.token_nl()), lambda r: r),
    "metadata": (lambda m: m.metadata, lambda r: r),
    "tokenizer()": (lambda m: (m.tokenizer().encode("Hello world"), m.tokenizer().decode([19556, 905])), lambda r: r),
    "generate": (
        lambda m: [t for _, t in zip(range(10), m.generate(m.tokenize(b"Once upon a time"), temp=0), strict=False)],
        lambda r: r,
    ),
}


@pytest.fixture(scope="module")
def path():
    return str(smollm2_model_path())


@pytest.fixture(scope="module")
def ref(path):
    from pymorph_edge.model.model_file import default_model_params

    llama_cpp.llama_cpp.llama_model_default_params = default_model_params  # no AMX repacking where it crashes
    m = llama_cpp.Llama(path, logits_all=True, **COMMON)
    yield m
    m.close()


@pytest.fixture(scope="module", params=["full", "budget"])
def ours(request, path):
    m = pymorph_edge.Llama(path, kv_budget=None if request.param == "full" else 1024, **COMMON)
    yield m
    m.close()


def run(m, name):
    call, read = SCRIPT[name]
    return read(call(m))


@pytest.mark.parametrize("name", list(SCRIPT))
def test_every_call_that_works_on_llama_cpp_works_here_with_the_same_result(ref, ours, name):
    ref.set_seed(42)
    ours.set_seed(42)
    want = run(ref, name)  # a call that fails there is not part of the contract
    got = run(ours, name)
    assert got == want
    assert ours.stats.tokens_evicted == 0  # the budget variant never needed to evict on these prompts


def test_eval_and_sample_as_llama_cpp(path):
    """The low-level loop; on a fresh llama_cpp.Llama (its sample() reuses a sampler left over from an earlier
    generate, so it only matches from a clean start)."""
    from pymorph_edge.model.model_file import default_model_params

    llama_cpp.llama_cpp.llama_model_default_params = default_model_params
    toks = None
    got = []
    for make in (lambda: llama_cpp.Llama(path, **COMMON), lambda: pymorph_edge.Llama(path, kv_budget=512, **COMMON)):
        m = make()
        toks = m.tokenize(b"Once upon a time")
        m.eval(toks)
        first = m.sample(temp=0)
        m.eval([first])
        got.append((m.n_tokens, first, m.sample(temp=0)))
        m.close()
    assert got[0] == got[1] and got[0][0] == len(toks) + 1


def test_tool_call_arguments_carry_the_schemas_required_keys(ours):
    a = run(ours, "tool call")
    assert set(a) >= {"city", "unit"} and a["unit"] in ("C", "F")
    streamed = ours.create_chat_completion(
        WEATHER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    parts = [c["choices"][0]["delta"].get("tool_calls") for c in streamed]
    arguments = "".join(p[0]["function"]["arguments"] for p in parts if p)
    assert json.loads(arguments) == a


def test_logprobs_match_llama_cpp_without_logits_all(ref, path):
    want = ref.create_completion("The capital of France is", max_tokens=8, temperature=0, logprobs=5)["choices"][0][
        "logprobs"
    ]
    with pymorph_edge.Llama(path, kv_budget=512, n_threads=2) as m:  # logits_all not given: not needed here
        got = m.create_completion("The capital of France is", max_tokens=8, temperature=0, logprobs=5)["choices"][0][
            "logprobs"
        ]
        assert got["tokens"] == want["tokens"] and got["text_offset"] == want["text_offset"]
        for a, b in zip(got["token_logprobs"], want["token_logprobs"], strict=True):
            assert abs(a - b) < 1e-4
        for a, b in zip(got["top_logprobs"], want["top_logprobs"], strict=True):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
        chat = m.create_chat_completion(CAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
        ref_chat = ref.create_chat_completion(CAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
        got_c, want_c = chat["choices"][0]["logprobs"]["content"], ref_chat["choices"][0]["logprobs"]["content"]
        assert [c["token"] for c in got_c] == [c["token"] for c in want_c]
        assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(got_c, want_c, strict=True))
        assert all(len(c["top_logprobs"]) == 3 for c in got_c)
        json.dumps(chat)  # plain floats: it goes straight into a server's answer


def test_echoed_prompt_logprobs_are_the_models_own_predictions(path):
    """echo + logprobs scores the prompt chunk by chunk under the budget (a prompt longer than the cache): each
    prompt token's logprob is what the model gave it after the tokens before it. llama_cpp pairs them one row
    late on a model without BOS (SmolLM2), so the reference here is the model itself, token by token."""
    with pymorph_edge.Llama(path, kv_budget=None, n_ctx=512, n_threads=2) as full:
        prompt = "The capital of France is Paris. The capital of Italy is Rome."
        toks = full.tokenize(prompt, special=True)
        expect = []
        for j in range(1, len(toks)):
            full.reset()  # the prefix decoded as one batch, as the echo decodes it (same kernels, same sums)
            r = full.create_completion(toks[:j], max_tokens=1, temperature=0, logprobs=1, logit_bias={toks[j]: 100.0})
            # the bias makes toks[j] the answer; logprobs are read before any bias, so this is its raw logprob
            expect.append(r["choices"][0]["logprobs"]["token_logprobs"][0])
        full_echo = full.create_completion(prompt, max_tokens=2, temperature=0, logprobs=2, echo=True)["choices"][0]
        lp = full_echo["logprobs"]
        assert full_echo["text"].startswith(prompt) and "".join(lp["tokens"]) == full_echo["text"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        got = lp["token_logprobs"][1 : len(toks)]
        assert len(got) == len(expect)
        assert all(abs(a - b) < 1e-3 for a, b in zip(got, expect, strict=True)), [
            round(a - b, 4) for a, b in zip(got, expect, strict=True)
        ]
        long_prompt = " ".join(f"Line {i}: the keeper lit the lamp at dusk." for i in range(30))
        long_ref = full.create_completion(long_prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    with pymorph_edge.Llama(path, kv_budget=64, n_threads=2, n_ubatch=16) as small:
        out = small.create_completion(long_prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)["choices"][0]
        n = len(small.tokenize(long_prompt, special=True))
        assert n > 5 * 64 and small.stats.tokens_evicted > 0 and small.stats.peak_cells <= 64 + 16
        lps, ref_lps = out["logprobs"]["token_logprobs"], long_ref["choices"][0]["logprobs"]["token_logprobs"]
        assert len(lps) == len(ref_lps) == n + 1 and all(math.isfinite(x) for x in lps[1:])
        # before the first eviction (the first 64 + 16 tokens) the scores are the full cache's
        assert all(abs(a - b) < 1e-3 for a, b in zip(lps[1:64], ref_lps[1:64], strict=True))


def test_embeddings_match_llama_cpp(path):
    """Each input's vectors equal llama_cpp's. Compared input by input: for a list, llama_cpp 0.3.36 reads the
    second input's per-token vectors at the wrong offset on a model without pooling (its `ptr[pos + j * n_embd]`
    counts pos in tokens, not floats), so its list results past the first are not the model's."""
    from pymorph_edge.model.model_file import default_model_params

    llama_cpp.llama_cpp.llama_model_default_params = default_model_params
    texts = ["Hello world", "A lighthouse on a cliff"]
    ref = llama_cpp.Llama(path, embedding=True, **COMMON)
    want = [ref.embed(t, normalize=True) for t in texts]
    want_one = ref.create_embedding("Hello world")
    ref.close()
    with pymorph_edge.Llama(path, kv_budget=512, embedding=True, n_threads=2) as m:
        got = m.embed(texts, normalize=True)
        one = m.create_embedding("Hello world")
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert len(g) == len(w) and len(g[0]) == m.n_embd()  # SmolLM2 has no pooling: a vector per token
            assert max(abs(a - b) for rg, rw in zip(g, w, strict=True) for a, b in zip(rg, rw, strict=True)) < 1e-5
        assert one["usage"] == want_one["usage"] and one["object"] == "list"
        assert one["data"][0]["embedding"] == m.embed("Hello world")
        # the generation cache is untouched by embedding
        assert m.stats.cells_in_use == 0
        assert m.create_completion("Hi", max_tokens=2, temperature=0)["usage"]["completion_tokens"] >= 1
    with pymorph_edge.Llama(path, kv_budget=512, n_threads=2) as m:
        with pytest.raises(RuntimeError, match="embedding=True"):
            m.embed("x")


def test_constructor_takes_llama_cpps_common_keywords(path):
    kw = dict(
        n_gpu_layers=-1,
        main_gpu=0,
        split_mode=llama_cpp.LLAMA_SPLIT_MODE_LAYER,
        tensor_split=None,
        n_ctx=1024,
        n_batch=256,
        n_ubatch=128,
        n_threads=2,
        n_threads_batch=2,
        seed=1,
        verbose=False,
        chat_format=None,
        chat_handler=None,
        flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F16,
        type_v=llama_cpp.GGML_TYPE_F16,
        embedding=False,
        logits_all=True,
        use_mmap=True,
        use_mlock=False,
        rope_freq_base=0.0,
        rope_freq_scale=0.0,
        lora_path=None,
        offload_kqv=True,
        last_n_tokens_size=64,
    )
    with pymorph_edge.Llama(path, **kw) as m:
        # n_ctx without kv_budget is the ceiling: n_ctx - n_ubatch cells kept, never more than n_ctx in use
        assert m.kv_budget == 1024 - 128 and m.n_ctx() == 1024 and m.n_batch == 128
        out = m("Once upon a time", max_tokens=8, temperature=0)
        assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n_ctx": 100, "n_ubatch": 128}, "n_ctx=100 leaves no room"),
        ({"kv_budget": 1024, "n_ctx": 1024}, "kv_budget=1024 needs kv_budget \\+ n_ubatch"),
        ({"n_gpu_layers": "all"}, "n_gpu_layers must be an int"),
        ({"split_mode": 7}, "split_mode must be 0"),
        ({"tensor_split": [-1.0]}, "tensor_split must be"),
        ({"use_mmap": "yes"}, "use_mmap must be a bool"),
        ({"use_extra_bufts": 0}, "use_extra_bufts must be a bool"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"verbose": "loud"}, "verbose must be True, False or None"),
        ({"embedding": 1}, "embedding must be a bool"),
        ({"logits_all": "no"}, "logits_all must be a bool"),
        ({"n_threads_batch": 0}, "n_threads_batch must be a positive int"),
        ({"rope_freq_base": -1.0}, "rope_freq_base must be a number >= 0"),
        ({"last_n_tokens_size": -2}, "last_n_tokens_size must be an int >= 0"),
        ({"chat_format": "no-such-format"}, "unknown chat_format 'no-such-format'"),
        ({"chat_handler": 5}, "chat_handler must be"),
        ({"type_k": 12345}, "type_k must be one of"),
        ({"offload_kqv": False}, "offload_kqv=False is not supported"),
        ({"draft_model": object()}, "draft_model=.* is not supported"),
        ({"vocab_only": True}, "vocab_only=True is not supported"),
        ({"kv_overrides": {"a": 1}}, "kv_overrides=.* is not supported"),
        ({"lora_base": "base.gguf"}, "lora_base='base.gguf' is not supported"),
    ],
)
def test_constructor_keywords_it_cannot_honour_are_named(path, kw, match):
    with pytest.raises(ValueError, match=match):
        pymorph_edge.Llama(path, **kw)


def test_a_missing_lora_adapter_is_named(path, tmp_path):
    with pytest.raises(FileNotFoundError, match="lora_path not found: '/nonexistent/adapter.gguf'"):
        pymorph_edge.Llama(path, lora_path="/nonexistent/adapter.gguf")
    bad = tmp_path / "adapter.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ValueError, match="could not load the LoRA adapter"):
        pymorph_edge.Llama(path, lora_path=str(bad))


def test_unknown_keyword_is_a_type_error(path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_ctxx'"):
        pymorph_edge.Llama(path, n_ctxx=512)


def test_a_llama_cpp_chat_format_handler_runs_on_the_bounded_cache(path):
    """chat_format names a llama_cpp handler, called with this Llama: chatml-function-calling's auto tool choice."""
    with pymorph_edge.Llama(path, kv_budget=512, chat_format="chatml-function-calling", n_threads=2, seed=1) as m:
        r = m.create_chat_completion(
            WEATHER,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=0,
            max_tokens=60,
        )
        call = r["choices"][0]["message"]["tool_calls"][0]["function"]
        assert call["name"] == "get_weather" and set(json.loads(call["arguments"])) >= {"city", "unit"}
    with pymorph_edge.Llama(path, kv_budget=512, chat_format="chatml", n_threads=2) as m:
        r = m.create_chat_completion(CAT, max_tokens=8, temperature=0)
        assert r["object"] == "chat.completion" and r["choices"][0]["message"]["content"]


def test_seeded_model_repeats_itself_call_for_call_as_llama_cpp(path):
    outs = []
    for _ in range(2):
        with pymorph_edge.Llama(path, kv_budget=512, seed=1234, n_threads=2) as m:
            outs.append(
                [text(m.create_completion("Once upon a time", max_tokens=12, temperature=1.0)) for _ in range(2)]
            )
    assert outs[0] == outs[1]  # same seed, same sequence of answers
    assert outs[0][0] != outs[0][1]  # and the second call draws a new seed from the first


def test_stopping_criteria_and_logits_processor_are_called_as_in_llama_cpp(path):
    seen = []

    def stop_after_5(input_ids, logits):
        seen.append((len(input_ids), logits.shape))
        return len(seen) >= 5

    def ban_newline(input_ids, scores):
        scores[m.token_nl()] = -math.inf
        return scores

    with pymorph_edge.Llama(path, kv_budget=512, n_threads=2) as m:
        r = m.create_completion(
            "Once upon a time",
            max_tokens=50,
            temperature=0,
            stopping_criteria=[stop_after_5],
            logits_processor=[ban_newline],
        )
        assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "stop"
        assert seen[0][1] == (m.n_vocab(),) and seen[1][0] == seen[0][0] + 1
        assert "\n" not in text(r)


def test_json_answers_longer_than_the_budget_stay_valid_while_the_cache_evicts(path):
    """A schema with 6 required items makes the answer run past a 128-cell budget and still end: it parses, with
    every required key, although the cache evicted during it (json_object with a schema; the json_schema form
    takes the same path, tested with the openai client)."""
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "stations": {
                "type": "array",
                "minItems": 6,
                "maxItems": 6,
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "description": {"type": "string"}},
                    "required": ["name", "description"],
                },
            },
        },
        "required": ["title", "stations"],
    }
    msgs = [{"role": "user", "content": "Describe the stations of a long mountain railway as JSON, in detail."}]
    with pymorph_edge.Llama(path, kv_budget=128, n_ubatch=64, n_threads=2, seed=3) as m:
        fmt = {"type": "json_object", "schema": schema}
        r = m.create_chat_completion(msgs, response_format=fmt, temperature=0.7, max_tokens=1500, repeat_penalty=1.1)
        doc = json.loads(content(r))
        assert {"title", "stations"} <= set(doc) and len(doc["stations"]) == 6
        assert r["usage"]["completion_tokens"] > 128 and m.stats.tokens_evicted > 0
        assert m.stats.peak_cells <= 128 + 64
