"""The completion half of `Llama` (llama_cpp's create_completion / __call__, and the per-step stream_generate),
shaped as OpenAI does. A mixin, so `Llama` stays a short facade; the decode loop it drives is Llama._stream."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from pymorph_edge.generation import openai_shapes as shapes
from pymorph_edge.generation.chat_completions import RecallPlacement
from pymorph_edge.generation.generation_record import CancelCheck, GenerationChunk, Timings
from pymorph_edge.generation.request_params import check_logprobs, check_max_tokens, check_stop
from pymorph_edge.generation.sampling import Sampler, sampling_keywords
from pymorph_edge.generation.step_hooks import StepHooks

logger = logging.getLogger(__name__)


class CompletionsMixin:
    # provided by Llama
    model_path: str
    last_timings: Timings
    stats: Any
    _stream: Callable[..., Iterator[GenerationChunk]]
    _params: Callable[..., Any]
    _prompt_tokens: Callable[..., list[int]]
    _engine: Any
    _model: Any
    cache: Any = None

    def stream_generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 256,
        stop: str | Sequence[str] | None = None,
        **sampling: Any,
    ) -> Iterator[GenerationChunk]:
        """The public per-step layer (mlx-lm's stream_generate): a GenerationChunk per piece of text, with the
        tokens so far, tokens/s, and the cache's cells in use and tokens evicted. Sampling keywords as
        create_completion."""
        params = self._params(**sampling)
        return self._stream(self._prompt_tokens(prompt), params, check_max_tokens(max_tokens), check_stop(stop))

    # -- OpenAI-shaped API ---------------------------------------------------------------------
    def create_completion(
        self,
        prompt: str | Sequence[int],
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | Sequence[str] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        stopping_criteria: Any = None,
        logits_processor: Any = None,
        grammar: Any = None,
        logit_bias: Mapping[int | str, float] | None = None,
        cancel: CancelCheck | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Complete `prompt` (llama_cpp's signature and shapes). max_tokens None or <= 0 generates until an
        end-of-generation token or a stop string. logprobs: that many alternatives per token, read from the one
        logits row llama.cpp computes anyway (no logits_all needed); with echo, the prompt's too, scored chunk by
        chunk under the budget. cancel: polled between tokens and prefill chunks; True raises GenerationCancelled."""
        if suffix is not None:
            raise ValueError("suffix (fill-in-the-middle) is not supported by pymorph_edge")
        if not isinstance(echo, bool):
            raise ValueError(f"echo must be a bool, got {echo!r}")
        limit = check_max_tokens(max_tokens)
        stops = check_stop(stop)
        n_lp = check_logprobs(logprobs)
        params = self._params(**sampling_keywords(locals()))
        tokens = self._prompt_tokens(prompt)
        hooks = StepHooks.make(tokens, stopping_criteria, logits_processor, n_lp if echo else None)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model or self.model_path}
        chunks = self._stream(
            tokens, params, limit, stops, cancel=cancel, recall=RecallPlacement(), n_logprobs=n_lp, hooks=hooks
        )
        prompt_text = prompt if isinstance(prompt, str) else ""
        if not isinstance(prompt, str) and (echo or n_lp is not None):
            prompt_text = self.detokenize(tokens).decode("utf-8", "ignore")
        view = shapes.CompletionView(
            meta,
            prompt_text if echo else "",
            self._lp_piece,
            (lambda: hooks.echoed(self)) if hooks is not None else None,
            len(prompt_text),
        )
        if stream:
            return view.chunks(chunks, n_lp is not None)
        text, finish, n_out, lps = shapes.collect(chunks)
        return view.completion(text, finish, self.usage(len(tokens), n_out), lps if n_lp is not None else None)

    def __call__(
        self, prompt: str | Sequence[int], *args: Any, **kwargs: Any
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """create_completion, as llama_cpp.Llama's __call__."""
        return self.create_completion(prompt, *args, **kwargs)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """OpenAI's usage object; cached prompt tokens go where OpenAI reports them, KV figures as extra keys."""
        s = self.stats
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.last_timings.cached_tokens},
            "kv_cells_used": s.cells_in_use,
            "kv_peak_cells": s.peak_cells,
            "kv_tokens_evicted": s.tokens_evicted,
        }

    # -- llama_cpp's low-level calls --------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens in the sequence the cache holds (llama_cpp.Llama.n_tokens); under a budget some are evicted."""
        return self._engine.n_past

    def eval(self, tokens: Sequence[int]) -> None:
        """Append tokens to the cached sequence (llama_cpp.Llama.eval), evicting under the budget as they go."""
        toks = [int(t) for t in tokens]
        if not self._engine.consistent:
            self._engine.reset()
        self._engine.decode(toks)

    def sample(
        self,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float = 0.8,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_eta: float = 0.1,
        mirostat_tau: float = 5.0,
        penalize_nl: bool = True,
        logits_processor: Any = None,
        grammar: Any = None,
        idx: int | None = None,
    ) -> int:
        """One token from the last eval's logits (llama_cpp.Llama.sample)."""

        if self._engine.n_past == 0:
            raise ValueError("sample needs a decoded token first: call eval(tokens)")
        if idx is not None:
            raise ValueError("idx is not supported: only the last token's logits are kept")
        params = self._params(**sampling_keywords(locals(), temp="temperature"))
        hooks = StepHooks.make(self._engine.history.tail(self._engine.n_past), None, logits_processor, None)
        sampler = Sampler(params, self.n_vocab(), self._model.vocab)
        try:
            if hooks is not None:
                hooks.before_sample(self._engine.ctx, self.n_vocab())
            return sampler.sample(self._engine.ctx)
        finally:
            sampler.close()

    def set_cache(self, cache: Any) -> None:
        """Accepted for llama_cpp's API. The engine reuses the cached prefix of every request itself, and
        save_state / save_session keep whole conversations, so a llama_cpp prompt cache adds nothing here."""
        if cache is not None:
            logger.info(
                "set_cache: pymorph_edge reuses cached prefixes itself; %s is not consulted", type(cache).__name__
            )
        self.cache = cache

    def tokenizer(self) -> Any:
        """llama_cpp's tokenizer interface (tokenize/detokenize/encode/decode) over this model."""
        from llama_cpp.llama_tokenizer import LlamaTokenizer

        llama = self

        class _Tokenizer(LlamaTokenizer):
            def __init__(self) -> None:  # llama_cpp's reads llama._model, a different object here
                pass

            def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
                return llama.tokenize(text, add_bos=add_bos, special=special)

            def detokenize(self, tokens: list[int], prev_tokens: Any = None, special: bool = False) -> bytes:
                return llama.detokenize(tokens, special=special)

        return _Tokenizer()

    def pooling_type(self) -> int:
        """llama.cpp's pooling type of the embedding context (llama_cpp.Llama.pooling_type)."""
        import llama_cpp.llama_cpp as C

        ctx = self._embed_ctx.ctx if getattr(self, "_embed_ctx", None) is not None else self._engine.ctx
        return int(C.llama_pooling_type(ctx))
