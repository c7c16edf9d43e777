"""Sampling parameters (the llama-cpp-python / OpenAI names) and the llama.cpp sampler chain built from them."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import llama_cpp.llama_cpp as C


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: Mapping[int | str, float] = field(default_factory=dict)

    def validate(self, n_vocab: int) -> dict[int, float]:
        """Raise ValueError naming the bad value; return logit_bias with int keys."""

        def num(name: str, v: object) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"{name} must be a number, got {v!r}")
            return float(v)

        if num("temperature", self.temperature) < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 <= num("top_p", self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if not 0.0 <= num("min_p", self.min_p) <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if num("repeat_penalty", self.repeat_penalty) <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty!r}")
        num("frequency_penalty", self.frequency_penalty)
        num("presence_penalty", self.presence_penalty)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {self.seed!r}")
        bias: dict[int, float] = {}
        for k, v in dict(self.logit_bias or {}).items():
            try:
                tok = int(k)
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias key {k!r} is not a token id") from None
            if not 0 <= tok < n_vocab:
                raise ValueError(f"logit_bias token id {tok} outside the vocabulary [0, {n_vocab})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"logit_bias value for token {tok} must be a number, got {v!r}")
            bias[tok] = float(v)
        return bias


PENALTY_LAST_N = 64  # tokens the repeat/frequency/presence penalties look back over, as llama_cpp.Llama


class Sampler:
    """A llama.cpp sampler chain in the same order as llama_cpp.Llama, so greedy output matches it."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        bias = params.validate(n_vocab)
        self.ptr = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        if bias:
            arr = (C.llama_logit_bias * len(bias))(*[C.llama_logit_bias(t, b) for t, b in bias.items()])
            self._add(C.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            self._add(
                # the pinned llama.cpp still takes n_vocab first (include/llama.h of llama-cpp-python 0.3.36)
                C.llama_sampler_init_penalties(
                    n_vocab, PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
                )
            )
        if params.temperature == 0:
            self._add(C.llama_sampler_init_greedy())
        else:
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**32 - 1)
            if params.top_k > 0:
                self._add(C.llama_sampler_init_top_k(params.top_k))
            self._add(C.llama_sampler_init_top_p(params.top_p, 1))
            self._add(C.llama_sampler_init_min_p(params.min_p, 1))
            self._add(C.llama_sampler_init_temp(params.temperature))
            self._add(C.llama_sampler_init_dist(seed))

    def _add(self, s: C.llama_sampler_p) -> None:
        C.llama_sampler_chain_add(self.ptr, s)

    def sample(self, ctx: C.llama_context_p) -> int:
        """Sample from the last decoded token's logits (llama.cpp also records it for the penalties)."""
        return int(C.llama_sampler_sample(self.ptr, ctx, -1))

    def close(self) -> None:
        if self.ptr:
            C.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()
