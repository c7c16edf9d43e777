"""Seeded request bodies for the two generation endpoints, valid and invalid, to check that the server
answers every one with 2xx or 4xx (never 5xx) and stays up. A seeded generator rather than hypothesis,
so the short form in CI and the full campaign (benchmarks/fuzz.py) replay exactly."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

ODD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    1,
    2**31,
    2**63,
    -(2**63),
    1e308,
    -0.0,
    0.5,
    "",
    "x",
    "\u0000",
    "😀" * 3,
    "<|im_end|>",
    [],
    [1, 2],
    ["a", None],
    {},
    {"a": 1},
    [[]],
]
FIELDS = [
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "stream",
    "stream_options",
    "model",
]


def _valid_value(rng: random.Random, field: str) -> Any:
    return {
        "max_tokens": rng.randint(1, 8),
        "max_completion_tokens": rng.randint(1, 8),
        "temperature": rng.choice([0, 0.5, 1.0, 2]),
        "top_p": rng.choice([0.1, 1.0]),
        "top_k": rng.choice([0, 1, 40]),
        "stop": rng.choice([None, "\n", ["a", "b"]]),
        "seed": rng.randint(0, 2**31),
        "logit_bias": rng.choice([None, {"5": 2.0}, {"2": -100}]),
        "frequency_penalty": rng.uniform(-2, 2),
        "presence_penalty": rng.uniform(-2, 2),
        "stream": rng.random() < 0.3,
        "stream_options": rng.choice([None, {"include_usage": True}]),
        "model": "any",
    }[field]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice("abc xyz.\n😀\u00e9<>{}\"'\\") for _ in range(rng.randint(0, 40)))


def _messages(rng: random.Random) -> Any:
    if rng.random() < 0.15:
        return rng.choice(ODD_VALUES)
    out = []
    for _ in range(rng.randint(0, 4)):
        if rng.random() < 0.1:
            out.append(rng.choice(ODD_VALUES))
            continue
        role = rng.choice(["user", "assistant", "system"] if rng.random() < 0.9 else ["robot", "", None, 3])
        content = _text(rng) if rng.random() < 0.9 else rng.choice(ODD_VALUES)
        out.append({"role": role, "content": content})
    return out


def request_bodies(rng: random.Random, n: int) -> Iterator[tuple[str, bytes]]:
    """n (path, body) pairs: mostly well-formed JSON with some fields odd, some raw garbage."""
    for _ in range(n):
        chat = rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if rng.random() < 0.08:  # not JSON, or not an object
            yield path, rng.choice([b"", b"{", b"[]", b"null", b'"x"', bytes(rng.randrange(256) for _ in range(20))])
            continue
        body: dict[str, Any] = {}
        if chat:
            body["messages"] = _messages(rng)
        else:
            body["prompt"] = (
                _text(rng)
                if rng.random() < 0.7
                else rng.choice([[rng.randrange(-5, 400) for _ in range(rng.randint(0, 5))], *ODD_VALUES])
            )
        for field in rng.sample(FIELDS, rng.randint(0, 5)):
            body[field] = _valid_value(rng, field) if rng.random() < 0.6 else rng.choice(ODD_VALUES)
        if "max_tokens" not in body and rng.random() < 0.5:
            body["max_tokens"] = rng.randint(1, 4)
        if rng.random() < 0.1:
            body[_text(rng) or "extra"] = rng.choice(ODD_VALUES)
        yield path, json.dumps(body).encode()


def post_body(port: int, path: str, body: bytes, timeout: float = 120) -> int:
    """POST raw bytes as JSON to the local server; the HTTP status, error statuses included."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code
