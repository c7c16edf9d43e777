"""Continuing a conversation on the compressed cache.

Re-tokenizing a rendered conversation rarely reproduces the tokens the model generated, so a token
comparison alone would miss most continuations. Instead the last turn is remembered at message
level: when a request's messages extend it, the new prompt is the exact token history plus the
tokens of the template text that follows the previous answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class ChatTurn:
    messages: list[dict[str, Any]]  # the conversation including the answer we returned
    prompt: str  # template text before the answer
    answer: str  # the answer text we returned
    tokens: list[int]  # prompt and answer tokens exactly as the model saw (or sampled) them


def continuation_tokens(
    turn: ChatTurn | None,
    messages: Sequence[dict[str, Any]],
    prompt_text: str,
    tokenize_suffix: Callable[[str], list[int]],
) -> list[int] | None:
    """Tokens for `messages` that extend `turn` exactly, or None when they do not extend it."""
    if turn is None or len(messages) <= len(turn.messages):
        return None
    if list(messages[: len(turn.messages)]) != turn.messages:
        return None
    # templates often trim the answer; the cache keeps the whitespace the model produced, which is harmless
    for answer in (turn.answer, turn.answer.rstrip(), turn.answer.strip()):
        rendered = turn.prompt + answer
        if prompt_text.startswith(rendered):
            return turn.tokens + tokenize_suffix(prompt_text[len(rendered) :])
    return None
