"""Validation shared by every OpenAI-shaped request (completion and chat): one place, so both accept the
same sampling parameters and reject bad ones with the same messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pymorph_edge.generation.sampling import SamplingParams


def check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is None:
        return
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int or None (no limit), got {max_tokens!r}")


def check_stop(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return [s for s in stops if s]


def sampling_params(
    n_vocab: int,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    seed: int | None,
    logit_bias: Mapping[int | str, float] | None,
    repeat_penalty: float,
    frequency_penalty: float,
    presence_penalty: float,
) -> SamplingParams:
    """SamplingParams for a request, validated against the vocabulary (ValueError names the bad value)."""
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        logit_bias=logit_bias or {},
        repeat_penalty=repeat_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )
    params.validate(n_vocab)
    return params
