"""Validation shared by every OpenAI-shaped request (completion and chat): one place, so both accept the
same parameters and reject bad ones with the same messages."""

from __future__ import annotations

from collections.abc import Sequence


def check_max_tokens(max_tokens: int | None) -> int | None:
    """The answer's token limit: None (or, as in llama_cpp, 0 or less) means no limit; anything else is a
    ValueError naming it."""
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ValueError(f"max_tokens must be an int or None (no limit), got {max_tokens!r}")
    return max_tokens if max_tokens > 0 else None


def check_stop(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return [s for s in stops if s]


def check_logprobs(logprobs: int | None, name: str = "logprobs") -> int | None:
    """How many alternatives each token's logprob entry lists (None: no logprobs)."""
    if logprobs is None:
        return None
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {logprobs!r}")
    return logprobs
