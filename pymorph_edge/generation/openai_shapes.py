"""OpenAI-shaped responses built from generation records: one-shot objects and streamed chunks, for
completions and chat alike, with llama_cpp's logprobs shapes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from pymorph_edge.generation.generation_record import GenerationChunk
from pymorph_edge.generation.logprobs import TokenLogprob, completion_logprobs
from pymorph_edge.generation.structured_output import chat_logprobs


def collect(chunks: Iterator[GenerationChunk]) -> tuple[str, str | None, int, list[TokenLogprob]]:
    """Drain a non-streaming answer: (text, finish_reason, tokens generated, logprob entries)."""
    text, last = "", None
    lps: list[TokenLogprob] = []
    for last in chunks:
        text += last.text
        lps.extend(last.logprobs)
    return text, last.finish_reason if last else None, len(last.tokens) if last else 0, lps


class CompletionView:
    """A completion's text and logprobs as llama_cpp shapes them: with echo, the prompt's text (and its tokens'
    logprobs) first; text offsets count characters from the start of the prompt."""

    def __init__(
        self,
        meta: dict[str, Any],
        echo_text: str,
        piece: Callable[[int], str],
        prompt_entries: Callable[[], list[TokenLogprob] | None] | None,
        prompt_chars: int = 0,
    ) -> None:
        """prompt_entries: called once the prompt is decoded, for the echoed prompt's logprob entries."""
        self.meta, self.echo_text, self.piece, self.prompt_entries = meta, echo_text, piece, prompt_entries
        self.offset = 0 if echo_text else prompt_chars

    def _logprobs(self, entries: list[TokenLogprob], first: bool) -> dict[str, Any]:
        echoed = self.prompt_entries() if first and self.prompt_entries is not None else None
        if echoed is not None:
            entries = echoed + entries
        out = completion_logprobs(entries, self.piece, self.offset)
        self.offset += sum(len(t) for t in out["tokens"])
        return out

    def completion(
        self, text: str, finish: str | None, usage: dict[str, Any], entries: list[TokenLogprob] | None
    ) -> dict[str, Any]:
        lps = self._logprobs(entries, True) if entries is not None else None
        return {
            **self.meta,
            "object": "text_completion",
            "choices": [{"text": self.echo_text + text, "index": 0, "logprobs": lps, "finish_reason": finish}],
            "usage": usage,
        }

    def chunks(self, chunks: Iterator[GenerationChunk], with_logprobs: bool) -> Iterator[dict[str, Any]]:
        first = True
        for c in chunks:
            text = (self.echo_text if first else "") + c.text
            lps = self._logprobs(c.logprobs, first) if with_logprobs else None
            first = False
            yield {
                **self.meta,
                "object": "text_completion",
                "choices": [{"text": text, "index": 0, "logprobs": lps, "finish_reason": c.finish_reason}],
            }


def chat_completion(
    meta: dict[str, Any], text: str, finish: str | None, usage: dict[str, Any], logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {
        **meta,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": chat_logprobs(logprobs), "finish_reason": finish}],
        "usage": usage,
    }


def chat_chunks(
    meta: dict[str, Any], chunks: Iterator[GenerationChunk], piece: Callable[[int], str] | None = None
) -> Iterator[dict[str, Any]]:
    """Streamed chat; with piece given, each chunk carries its tokens' logprobs."""
    yield {
        **meta,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}],
    }
    for c in chunks:
        delta = {"content": c.text} if c.text else {}
        lps = chat_logprobs(completion_logprobs(c.logprobs, piece, 0)) if piece is not None and c.logprobs else None
        yield {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": c.finish_reason}],
        }
