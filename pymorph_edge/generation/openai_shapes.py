"""OpenAI-shaped responses built from generation records: one-shot objects and streamed chunks, for
completions and chat alike."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pymorph_edge.generation.generation_record import GenerationChunk


def collect(chunks: Iterator[GenerationChunk]) -> tuple[str, str | None, int]:
    """Drain a non-streaming answer: (text, finish_reason, tokens generated)."""
    text, last = "", None
    for last in chunks:
        text += last.text
    return text, last.finish_reason if last else None, len(last.tokens) if last else 0


def completion(meta: dict[str, Any], text: str, finish: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        **meta,
        "object": "text_completion",
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


def completion_chunks(meta: dict[str, Any], chunks: Iterator[GenerationChunk]) -> Iterator[dict[str, Any]]:
    for c in chunks:
        yield {
            **meta,
            "object": "text_completion",
            "choices": [{"text": c.text, "index": 0, "logprobs": None, "finish_reason": c.finish_reason}],
        }


def chat_completion(meta: dict[str, Any], text: str, finish: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {
        **meta,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


def chat_chunks(meta: dict[str, Any], chunks: Iterator[GenerationChunk]) -> Iterator[dict[str, Any]]:
    yield {
        **meta,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}],
    }
    for c in chunks:
        delta = {"content": c.text} if c.text else {}
        yield {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": c.finish_reason}],
        }
