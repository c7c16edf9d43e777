"""Sampling parameters (llama-cpp-python's keywords, defined once here) and the llama.cpp sampler chain built
from them, in llama_cpp.Llama's order so that seeded and greedy output match it token for token."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import llama_cpp.llama_cpp as C
from llama_cpp.llama_grammar import LlamaGrammar

logger = logging.getLogger(__name__)

PENALTY_LAST_N = 64  # tokens the repeat/frequency/presence penalties look back over (llama_cpp's last_n_tokens_size)
MIROSTAT_M = 100  # llama_cpp.Llama's mirostat v1 candidate count


@dataclass
class SamplingParams:
    """Every sampling keyword of llama_cpp.Llama.create_completion, with its defaults. The one definition the
    library, the chat defaults and the server build from (`keywords`, `from_kwargs`)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    tfs_z: float = 1.0  # accepted as llama_cpp does; llama.cpp has no tail-free sampler any more
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None
    logit_bias: Mapping[int | str, float] = field(default_factory=dict)
    grammar: LlamaGrammar | str | None = None  # a LlamaGrammar (llama_cpp.llama_grammar) or GBNF text
    penalty_last_n: int = PENALTY_LAST_N

    @classmethod
    def keywords(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "penalty_last_n")

    @classmethod
    def from_kwargs(cls, n_vocab: int, **kw: Any) -> SamplingParams:
        """Validated params from request keywords (None for logit_bias means none); ValueError names a bad value."""
        if kw.get("logit_bias") is None:
            kw["logit_bias"] = {}
        params = cls(**kw)
        params.validate(n_vocab)
        return params

    def validate(self, n_vocab: int) -> dict[int, float]:
        """Raise ValueError naming the bad value; return logit_bias with int keys."""

        def num(name: str, v: object) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"{name} must be a number, got {v!r}")
            return float(v)

        def integer(name: str, v: object, lo: int) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
            return v

        num("temperature", self.temperature)  # below 0 samples from the raw distribution, as in llama_cpp
        for name in ("top_p", "min_p", "typical_p", "tfs_z"):
            if not 0.0 <= num(name, getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an int (0 or less disables it), got {self.top_k!r}")
        if num("repeat_penalty", self.repeat_penalty) <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty!r}")
        num("frequency_penalty", self.frequency_penalty)
        num("presence_penalty", self.presence_penalty)
        if self.mirostat_mode not in (0, 1, 2) or isinstance(self.mirostat_mode, bool):
            raise ValueError(f"mirostat_mode must be 0 (off), 1 or 2, got {self.mirostat_mode!r}")
        if num("mirostat_tau", self.mirostat_tau) <= 0:
            raise ValueError(f"mirostat_tau must be > 0, got {self.mirostat_tau!r}")
        if num("mirostat_eta", self.mirostat_eta) <= 0:
            raise ValueError(f"mirostat_eta must be > 0, got {self.mirostat_eta!r}")
        if self.seed is not None:
            integer("seed", self.seed, 0)
        integer("penalty_last_n", self.penalty_last_n, 0)
        if self.grammar is not None and not isinstance(self.grammar, (LlamaGrammar, str)):
            raise ValueError(
                f"grammar must be a llama_cpp.LlamaGrammar or GBNF text, got {type(self.grammar).__name__}"
            )
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


def sampling_keywords(values: Mapping[str, Any], **renames: str) -> dict[str, Any]:
    """The sampling keywords among a call's arguments (its locals()), under SamplingParams' names: one mapping for
    every public signature that spells llama_cpp's keywords out (renames: llama_cpp's `temp` is `temperature`)."""
    names = set(SamplingParams.keywords())
    return {renames.get(k, k): v for k, v in values.items() if renames.get(k, k) in names}


def grammar_text(grammar: LlamaGrammar | str) -> tuple[str, str]:
    """(GBNF, root rule) of a LlamaGrammar or of GBNF text."""
    if isinstance(grammar, LlamaGrammar):
        return grammar._grammar, grammar._root
    return grammar, "root"


class Sampler:
    """A llama.cpp sampler chain in the same order as llama_cpp.Llama, so seeded and greedy output match it."""

    def __init__(self, params: SamplingParams, n_vocab: int, vocab: C.llama_vocab_p | None = None) -> None:
        bias = params.validate(n_vocab)
        self.ptr = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        if params.tfs_z != 1.0:
            logger.warning("tfs_z=%s has no effect: llama.cpp has no tail-free sampler (as in llama_cpp)", params.tfs_z)
        if bias:
            arr = (C.llama_logit_bias * len(bias))(*[C.llama_logit_bias(t, b) for t, b in bias.items()])
            self._add(C.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            self._add(
                # the pinned llama.cpp still takes n_vocab first (include/llama.h of llama-cpp-python 0.3.36)
                C.llama_sampler_init_penalties(
                    n_vocab,
                    params.penalty_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.grammar is not None:
            if vocab is None:
                raise ValueError("a grammar needs the model's vocabulary")
            text, root = grammar_text(params.grammar)
            g = C.llama_sampler_init_grammar(vocab, text.encode("utf-8"), root.encode("utf-8"))
            if not g:
                self.close()
                raise ValueError(f"grammar failed to parse (llama.cpp's log says where): {text[:120]!r}")
            self._add(g)
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**32 - 1)
        if params.temperature < 0:
            self._add(C.llama_sampler_init_dist(seed))
        elif params.temperature == 0:
            self._add(C.llama_sampler_init_greedy())
        elif params.mirostat_mode == 1:
            self._add(
                C.llama_sampler_init_mirostat(n_vocab, seed, params.mirostat_tau, params.mirostat_eta, MIROSTAT_M)
            )
        elif params.mirostat_mode == 2:
            self._add(C.llama_sampler_init_mirostat_v2(seed, params.mirostat_tau, params.mirostat_eta))
        else:
            if params.top_k > 0:
                self._add(C.llama_sampler_init_top_k(params.top_k))
            if params.typical_p < 1.0:
                self._add(C.llama_sampler_init_typical(params.typical_p, 1))
            self._add(C.llama_sampler_init_top_p(params.top_p, 1))
            self._add(C.llama_sampler_init_min_p(params.min_p, 1))
            self._add(C.llama_sampler_init_temp(params.temperature))
            self._add(C.llama_sampler_init_dist(seed))

    def _add(self, s: C.llama_sampler_p) -> None:
        C.llama_sampler_chain_add(self.ptr, s)

    def sample(self, ctx: C.llama_context_p) -> int:
        """Sample from the last decoded token's logits (llama.cpp also records it for the penalties and grammar)."""
        return int(C.llama_sampler_sample(self.ptr, ctx, -1))

    def close(self) -> None:
        if self.ptr:
            C.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()
