"""Bad input raises a clear error naming the bad value, and leaves the object usable."""

import pytest

from pymorph_edge import EngineConfig, Llama, MorphKV
from pymorph_edge.policies import make_policy


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Llama(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("this is not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Llama(p)


def test_corrupt_gguf(tmp_path, mha_model):
    p = tmp_path / "truncated.gguf"
    p.write_bytes(open(mha_model, "rb").read()[:5000])
    with pytest.raises(ValueError, match="corrupt"):
        Llama(p, kv_budget=64)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        Llama(tmp_path)


@pytest.mark.parametrize(
    "budget, match",
    [
        (16, "kv_budget=16 must be larger than the policy's recent window \\(32\\)"),
        (32, "kv_budget=32 must be larger"),
        (0, "kv_budget must be a positive int"),
        (-5, "kv_budget must be a positive int"),
        (1.5, "kv_budget must be a positive int"),
    ],
)
def test_impossible_budget(mha_model, budget, match):
    with pytest.raises(ValueError, match=match):
        Llama(mha_model, kv_budget=budget)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 0}, "window must be a positive int"),
        ({"fusion": "mean"}, "fusion must be one of"),
        ({"aggregate": "sum"}, "aggregate must be one of"),
        ({"policy": "h3o"}, "unknown policy 'h3o'"),
        ({"type_v": "q8_0", "flash_attn": False}, "type_v='q8_0' needs flash attention"),
        ({"type_k": "q3_k"}, "type_k must be one of f16, "),
        ({"type_v": 999}, "type_v must be one of"),
        ({"flash_attn": "yes"}, "flash_attn must be True, False or None, got 'yes'"),
        # the synthetic MHA model's heads are 16 wide: no whole 32-element blocks
        ({"type_k": "q8_0"}, "type_k='q8_0' stores 32-element blocks, which do not divide this model's head size 16"),
    ],
)
def test_bad_parameters(mha_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Llama(mha_model, kv_budget=256, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_ubatch": 0}, "n_ubatch must be a positive int, got 0"),
        ({"n_ctx": -1}, "n_ctx must be"),
        ({"n_threads": 0}, "n_threads must be"),
    ],
)
def test_bad_engine_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_bad_policy_parameters():
    with pytest.raises(ValueError, match="prefill_decay"):
        MorphKV(prefill_decay=2.0)


@pytest.fixture(scope="module")
def llm(mha_model):
    with Llama(mha_model, kv_budget=128) as m:
        yield m


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": "10"}, "max_tokens must be an int or None"),
        ({"max_tokens": 2.5}, "max_tokens must be an int or None"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"typical_p": -0.1}, "typical_p must be in"),
        ({"top_k": 1.5}, "top_k must be an int"),
        ({"mirostat_mode": 3}, "mirostat_mode must be 0"),
        ({"mirostat_tau": 0}, "mirostat_tau must be > 0"),
        ({"grammar": 42}, "grammar must be a llama_cpp.LlamaGrammar"),
        ({"grammar": "root ::= ("}, "grammar failed to parse"),
        ({"logprobs": -1}, "logprobs must be a non-negative int"),
        ({"echo": "yes"}, "echo must be a bool"),
        ({"suffix": "x"}, "suffix .* is not supported"),
        ({"stopping_criteria": 5}, "stopping_criteria must be a callable"),
        ({"seed": -3}, "seed must be"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias key 'abc'"),
        ({"logit_bias": {999999: 1.0}}, "logit_bias token id 999999 outside"),
        ({"stop": 5}, "stop must be a string"),
    ],
)
def test_bad_completion_arguments(llm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llm.create_completion("hello", **kwargs)
    # nothing was lost: the model still answers
    assert llm.create_completion("hello", max_tokens=3, temperature=0)["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("max_tokens", [0, -1])
def test_max_tokens_of_zero_or_less_means_no_limit_as_in_llama_cpp(llm, max_tokens):
    ban = {llm.token_eos(): -1e9}  # the random model must not end by itself
    chunks = llm.create_completion("hello", max_tokens=max_tokens, temperature=0, logit_bias=ban, stream=True)
    for i, c in enumerate(chunks):
        assert c["choices"][0]["finish_reason"] is None
        if i == 40:
            break
    chunks.close()


def test_llama_cpp_sampling_values_that_were_refused_before_now_sample(llm):
    """A negative temperature samples from the raw distribution and top_k <= 0 disables top-k, as in llama_cpp."""
    for kw in ({"temperature": -0.5}, {"top_k": -1}, {"top_k": 0}):
        assert llm.create_completion("hello", max_tokens=3, seed=1, **kw)["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "wizard", "content": "x"}], "role must be one of"),
        ([{"role": "user", "content": 5}], "content must be a string"),
        ([["user", "hi"]], "must be a dict"),
    ],
)
def test_bad_messages(llm, messages, match):
    with pytest.raises(ValueError, match=match):
        llm.create_chat_completion(messages)


def test_bad_prompt_tokens(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.create_completion([1, 2, 10**6], max_tokens=2)
    with pytest.raises(ValueError, match="prompt must be a string or a list of token ids"):
        llm.create_completion(3.5, max_tokens=2)


def test_full_cache_overflow_is_a_clear_error(mha_model):
    with Llama(mha_model, kv_budget=None, n_ctx=256) as m:
        with pytest.raises(ValueError, match="exceed the full cache's n_ctx=256"):
            m.create_completion([5] * 300, max_tokens=2)
        # a full cache stops at n_ctx with finish_reason "length" instead of failing mid-answer
        out = m.create_completion([5] * 200, max_tokens=None, temperature=0, logit_bias={m.token_eos(): -1e9})
        assert out["choices"][0]["finish_reason"] == "length"
        assert m.stats.next_pos == 255  # the last sampled token is returned but never needs decoding


def test_settings_a_policy_or_config_would_ignore_are_errors(mha_model):
    with pytest.raises(ValueError, match="bad parameters for policy 'h2o'"):
        Llama(mha_model, kv_budget=64, policy="h2o", fusion="max")
    with pytest.raises(ValueError, match="bad parameters for policy 'streaming'"):
        Llama(mha_model, kv_budget=64, policy="streaming", aggregate="max")
    for forget in (0, 1.5, "0.9", True):
        with pytest.raises(ValueError, match=f"forget must be a number in \\(0, 1\\], got {forget!r}"):
            make_policy("h2o", forget=forget)
    with pytest.raises(ValueError, match="contradicts config"):
        Llama(mha_model, kv_budget=None, n_ctx=1024, config=EngineConfig(n_ctx=512))
    with Llama(mha_model, kv_budget=None, n_ctx=1024, config=EngineConfig(n_ubatch=64)) as llm:
        assert llm.n_ctx() == 1024  # merged, not dropped
