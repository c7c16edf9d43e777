"""The server's drop-in surface through the official openai client: JSON mode, tool calls (streamed and not),
logprobs on chat and completions, seed, and /v1/embeddings, on SmolLM2 under a budget."""

import json

import openai
import pytest
from test_dropin import TOOLS, WEATHER
from test_server import start_server

pytestmark = pytest.mark.slow

FORCED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def port(smollm2_path):
    proc, port = start_server(smollm2_path, "--kv-budget", "256", "--embedding")
    yield port
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture()
def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=300, max_retries=0)


def test_json_mode_and_schema(client):
    msgs = [{"role": "user", "content": "Describe a cat as JSON with a name and an age."}]
    r = client.chat.completions.create(
        model="x", messages=msgs, max_tokens=120, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    r = client.chat.completions.create(
        model="x",
        messages=msgs,
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
    )
    cat = json.loads(r.choices[0].message.content)
    assert isinstance(cat["name"], str) and isinstance(cat["age"], int)


def test_tool_call_streamed_and_not(client):
    r = client.chat.completions.create(
        model="x", messages=WEATHER, tools=TOOLS, tool_choice=FORCED, max_tokens=80, temperature=0
    )
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) >= {"city", "unit"}
    stream = client.chat.completions.create(
        model="x", messages=WEATHER, tools=TOOLS, tool_choice=FORCED, max_tokens=80, temperature=0, stream=True
    )
    arguments = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in stream
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert json.loads(arguments) == args
    # the model's answer to the tool result goes through the template (an assistant message without content)
    follow = [
        *WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    r = client.chat.completions.create(model="x", messages=follow, max_tokens=30, temperature=0)
    assert r.choices[0].message.content


def test_logprobs_on_chat_and_completions(client):
    r = client.chat.completions.create(
        model="x", messages=WEATHER, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 5 for t in content)
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    c = client.completions.create(model="x", prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and all(len(t) >= 3 for t in lp.top_logprobs)
    echo = client.completions.create(model="x", prompt="The capital of France is", max_tokens=1, logprobs=1, echo=True)
    assert (
        echo.choices[0].text.startswith("The capital of France is")
        and echo.choices[0].logprobs.token_logprobs[0] is None
    )


def test_seed_repeats_a_sampled_answer(client):
    a, b = (
        client.completions.create(model="x", prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=99)
        for _ in range(2)
    )
    assert a.choices[0].text == b.choices[0].text


def test_embeddings(client, port):
    r = client.embeddings.create(model="x", input=["Hello world", "A lighthouse"])
    assert len(r.data) == 2 and r.usage.prompt_tokens > 0
    assert len(r.data[0].embedding) == 2  # SmolLM2 has no pooling: one 576-wide vector per token ("Hello world")
    assert len(r.data[0].embedding[0]) == 576


def test_bad_structured_requests_are_400(client):
    with pytest.raises(openai.BadRequestError, match="tool_choice 'nope' is not one of the tools"):
        client.chat.completions.create(
            model="x", messages=WEATHER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}
        )
    with pytest.raises(openai.BadRequestError, match="response_format.type must be"):
        client.chat.completions.create(model="x", messages=WEATHER, response_format={"type": "yaml"})
    with pytest.raises(openai.BadRequestError, match="grammar failed to parse"):
        client.completions.create(model="x", prompt="x", max_tokens=2, extra_body={"grammar": "root ::= ("})
