"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn process."""

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

BAN = {"2": -1e9, "3": -1e9}  # end of sequence, and NUL (llama.cpp's built-in templates are C strings)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, *extra):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pymorph_edge.cli",
            "serve",
            "-m",
            model,
            "--kv-budget",
            "128",
            "--port",
            str(port),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, port
        except urllib.error.HTTPError:
            return proc, port  # answering (e.g. 401 without a key)
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server(gqa_model):
    proc, port = start_server(gqa_model, "--max-queue", "8")
    yield port
    proc.terminate()
    proc.wait(10)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", max_retries=0)


def post(port, path, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_chat(client):
    assert client.models.list().data[0].id == "gqa.gguf"
    r = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0, logit_bias=BAN
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content


def test_chat_streaming_matches_non_streaming(client):
    kw = dict(
        model="x", messages=[{"role": "user", "content": "stream please"}], max_tokens=40, temperature=0, logit_bias=BAN
    )
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == whole
    assert parts[-1].usage.completion_tokens == 40


def test_completions(client):
    r = client.completions.create(model="x", prompt="once upon", max_tokens=20, temperature=0, logit_bias=BAN)
    assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens > 1
    parts = list(
        client.completions.create(
            model="x", prompt="once upon", max_tokens=20, temperature=0, logit_bias=BAN, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text


def test_multi_turn_continues_on_the_cache(client):
    msgs = [{"role": "user", "content": "tell me a long story " * 10}]
    first = client.chat.completions.create(model="x", messages=msgs, max_tokens=150, temperature=0, logit_bias=BAN)
    msgs += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "more"}]
    second = client.chat.completions.with_raw_response.create(
        model="x", messages=msgs, max_tokens=10, temperature=0, logit_bias=BAN
    )
    usage = second.parse().usage
    cached = usage.prompt_tokens_details.cached_tokens
    # everything the first turn decoded is reused; only the new turn's tokens (and the answer's last token) are decoded
    assert cached == first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert usage.prompt_tokens - cached < usage.prompt_tokens / 4
    assert int(second.headers["x-kv-cells"]) <= 128
    assert int(second.headers["x-kv-evicted"]) > 0


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 3}, "top_p"),
    ],
)
def test_bad_parameters_are_400_in_openai_shape(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], **kwargs)
    assert e.value.body["param"] == param or param in e.value.body["message"]


def test_malformed_requests(server):
    code, body = post(server, "/v1/chat/completions", b"{not json")
    assert code == 400 and body["error"]["code"] == "invalid_json"
    code, body = post(server, "/v1/chat/completions", {"messages": "hi"})
    assert code == 400 and "messages" in body["error"]["message"]
    code, body = post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert code == 400 and body["error"]["type"] == "invalid_request_error"
    code, body = post(server, "/v1/completions", {"prompt": [1, 2, 10**7], "max_tokens": 2})
    assert code == 400 and "outside the vocabulary" in body["error"]["message"]
    code, body = post(server, "/v1/completions", {"prompt": "x" * (2 << 20)})
    assert code == 413 and body["error"]["code"] == "body_too_large"
    # unknown fields are ignored, as OpenAI clients send extras
    code, body = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "user": "me", "n": 1})
    assert code == 200


def _raw_post(port, head: bytes, body_parts, pause_s=0.0):
    """Send a request by hand (headers, then the body in parts with pauses) and return the status and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
            if pause_s:
                time.sleep(pause_s)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def test_oversized_body_from_a_slow_sender_gets_its_413(server):
    """The server reads and discards the rest of an oversized body before answering: a client still sending sees
    the 413, not a connection reset (which a busy machine made likely when the server closed at once)."""
    port = server
    size = 2 << 20
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    parts = [b"x" * (size // 16)] * 16
    status, body = _raw_post(port, head, parts, pause_s=0.05)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert str(size) in body["error"]["message"]


def test_oversized_chunked_body_gets_its_413(server):
    """No Content-Length (chunked transfer): the limit is found while reading, and the rest is drained."""
    port = server
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"y" * (256 << 10)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    status, body = _raw_post(port, head, [chunk] * 8 + [b"0\r\n\r\n"], pause_s=0.02)
    assert status == 413 and body["error"]["code"] == "body_too_large"


def test_concurrent_clients_get_complete_uncorrupted_answers(client):
    prompts = [f"client {i} says " + "abc" * i for i in range(6)]

    def ask(p):
        r = client.completions.create(model="x", prompt=p, max_tokens=60, temperature=0, logit_bias=BAN)
        return r.choices[0].text, r.usage.completion_tokens

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert all(n == 60 for _, n in together)


def test_queue_overflow_gets_429_not_a_crash(gqa_model):
    proc, port = start_server(gqa_model, "--max-queue", "0")
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)

        def ask(_):
            try:
                c.completions.create(model="x", prompt="go", max_tokens=3000, temperature=0, logit_bias=BAN)
                return 200
            except openai.RateLimitError as e:
                assert e.body["code"] == "queue_full"
                return 429

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(ask, range(4)))
        assert 200 in codes and 429 in codes
        assert post(port, "/v1/completions", {"prompt": "after", "max_tokens": 3})[0] == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_client_disconnect_frees_the_slot(server, client):
    stream = client.completions.create(
        model="x", prompt="long", max_tokens=8000, temperature=0, logit_bias=BAN, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    deadline = time.time() + 60  # returns as soon as idle; the cap only bounds a hang
    while time.time() < deadline:
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server}/health").read())
        if status["busy"] == 0:
            break
        time.sleep(0.1)
    assert status["busy"] == 0
    assert status["kv"]["tokens_decoded"] < 4000  # generation stopped instead of running to 8000 tokens


def test_remote_binding_needs_an_api_key_which_is_then_checked(gqa_model):
    r = subprocess.run(
        [sys.executable, "-m", "pymorph_edge.cli", "serve", "-m", gqa_model, "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--api-key" in r.stderr
    proc, port = start_server(gqa_model, "--api-key", "s3cret")
    try:
        code, body = post(port, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert code == 401 and body["error"]["code"] == "invalid_api_key"
        code, _ = post(port, "/v1/completions", {"prompt": "x", "max_tokens": 2}, {"Authorization": "Bearer s3cret"})
        assert code == 200
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_a_served_conversation_recalls_a_fact_across_turns(smollm2_path):
    """The openai client against `serve`: the number from the first turn is evicted by two long stories and
    recalled for the question (MorphKV's default)."""
    proc, port = start_server(smollm2_path, "--kv-budget", "256")
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=300)
        msgs = [
            {"role": "system", "content": "You are a helpful assistant."},
            {
                "role": "user",
                "content": "Hi, I'm Tom from Oslo. My locker number is 90517. Write me a long story about a dragon.",
            },
        ]
        for follow_up in ("Thanks! Now write another long story, about a pirate ship.", None):
            r = c.chat.completions.create(model="x", messages=msgs, max_tokens=250, temperature=0)
            msgs.append({"role": "assistant", "content": r.choices[0].message.content})
            if follow_up:
                msgs.append({"role": "user", "content": follow_up})
        msgs.append({"role": "user", "content": "What is my locker number?"})
        r = c.chat.completions.create(model="x", messages=msgs, max_tokens=20, temperature=0)
        assert "90517" in r.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=30)
