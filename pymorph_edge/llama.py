"""`Llama`: the public face. A llama.cpp model whose KV cache stays under `kv_budget` cells.

Generation is layered as in mlx-lm: `generate` yields token ids, `_stream` turns them into
text chunks with stop handling, and `create_completion` / `create_chat_completion` collect them.
"""

from __future__ import annotations

import ctypes
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as C

from . import openai_shapes as shapes
from .chat import ChatFormatter, ChatTurn, continuation_tokens, validate_messages
from .engine_config import EngineConfig, merge_config
from .generation_record import CancelCheck, GenerationCancelled, GenerationChunk, Timings
from .kv_engine import KVEngine
from .model_file import LoadedModel
from .policies import KVPolicy, make_policy
from .request_params import check_max_tokens, check_stop, sampling_params
from .sampling import Sampler, SamplingParams
from .stats import KVStats
from .text_output import TextAssembler


class Llama:
    """A GGUF model run by llama.cpp with a bounded KV cache.

    kv_budget: cells the cache keeps after every eviction (None: full cache, no eviction).
    policy: a name ("morphkv" default, "h2o", "tova", "snapkv", "streaming", "context_shift", "full") or a
    KVPolicy instance. window: the policy's recent window (default: its own, 32 for MorphKV);
    fusion ("sum" or "max", MorphKV) and aggregate ("mean" or "max": MorphKV, H2O, TOVA, SnapKV) default to the
    policy's own; passing one to a policy that does not use it is a ValueError.
    """

    def __init__(
        self,
        model_path: str | Path,
        kv_budget: int | None = 1024,
        policy: str | KVPolicy = "morphkv",
        *,
        window: int | None = None,
        fusion: str | None = None,
        aggregate: str | None = None,
        config: EngineConfig | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        flash_attn: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self._engine: KVEngine | None = None
        self._model: LoadedModel | None = None
        if isinstance(policy, str):
            # None: the policy's own default; a value the policy has no use for is an error, not ignored
            given = {"window": window, "fusion": fusion, "aggregate": aggregate}
            params: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
            policy = make_policy(policy, **params)
        elif not isinstance(policy, KVPolicy):
            raise ValueError(f"policy must be a policy name or a KVPolicy, got {policy!r}")
        config = merge_config(config, n_ctx=n_ctx, n_threads=n_threads, flash_attn=flash_attn or None)
        if kv_budget is not None and config.flash_attn:
            raise ValueError(
                "flash_attn=True needs kv_budget=None: scoring reads the attention softmax, which flash attention never materialises"
            )
        self._model = LoadedModel(model_path, n_gpu_layers=config.n_gpu_layers)
        try:
            self._engine = KVEngine(self._model, kv_budget, policy, config)
        except BaseException:
            self._model.close()
            raise
        self.model_path = str(self._model.path)
        self.policy = self._engine.policy
        self.kv_budget = kv_budget
        self.last_timings = Timings()
        self._chat_template = chat_template or self._model.meta("tokenizer.chat_template")
        self._chat: ChatFormatter | None = None
        self._last_turn: ChatTurn | None = None
        # called as prefill_progress(done, total) while a prompt is decoded; the CLI shows a tqdm bar
        self.prefill_progress: Callable[[int, int], None] | None = None

    # -- tokens ---------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self._model.info.n_vocab

    @property
    def n_ctx(self) -> int:
        return self._engine.n_ctx

    @property
    def has_chat_template(self) -> bool:
        """True when the GGUF carries its own chat template (an instruction-tuned model), or one was given."""
        return bool(self._chat_template)

    @property
    def n_ctx_train(self) -> int:
        """Context length the model was trained on (positions the cache may span before compaction matters)."""
        return self._model.info.n_ctx_train

    def token_eos(self) -> int:
        return int(C.llama_vocab_eos(self._model.vocab))

    def token_bos(self) -> int:
        return int(C.llama_vocab_bos(self._model.vocab))

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        add_bos = add_bos and bool(C.llama_vocab_get_add_bos(self._model.vocab))
        cap = len(data) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self._model.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self._model.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize failed ({n}) on {len(data)} bytes")
        return list(buf[:n])

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._model.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._model.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return b"".join(self._piece(int(t), special) for t in tokens)

    def is_end_of_generation(self, token: int) -> bool:
        """True for tokens that end an answer (EOS, end-of-turn, ...)."""
        return bool(C.llama_vocab_is_eog(self._model.vocab, token))

    # -- generation layers -----------------------------------------------------------------
    def generate(
        self,
        tokens: Sequence[int],
        *,
        temp: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        logit_bias: Mapping[int | str, float] | None = None,
        reset: bool = True,
        cancel: CancelCheck | None = None,
    ) -> Iterator[int]:
        """Yield sampled token ids (end-of-generation tokens included), like llama_cpp.Llama.generate: endlessly
        under a budget; the full cache (kv_budget=None) stops when its n_ctx cells are full.
        cancel: polled between tokens and prefill chunks; True raises GenerationCancelled."""
        params = sampling_params(
            self.n_vocab,
            temperature=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            logit_bias=logit_bias,
            repeat_penalty=repeat_penalty,
            frequency_penalty=0.0,
            presence_penalty=0.0,
        )
        yield from self._generate(list(tokens), params, reset, cancel)

    def _generate(
        self, tokens: list[int], params: SamplingParams, reset: bool, cancel: CancelCheck | None = None
    ) -> Iterator[int]:
        """reset=True: reuse the cached prefix the prompt shares with the history (llama_cpp.Llama does the
        same); reset=False: append the tokens to whatever the cache holds."""
        sampler = Sampler(params, self.n_vocab)  # validates before any decoding
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        engine = self._engine
        t0 = time.perf_counter()
        if reset:
            new = tokens[engine.reuse_prefix(tokens) :]
        else:
            if not engine.consistent:
                engine.reset()
            new = tokens
        engine.decode(new, progress=self._prefill_progress(cancel))
        self.last_timings = Timings(
            prompt_tokens=len(tokens), prefill_s=time.perf_counter() - t0, cached_tokens=len(tokens) - len(new)
        )
        try:
            while True:
                if cancel is not None and cancel():
                    raise GenerationCancelled("generation cancelled")
                t1 = time.perf_counter()
                tok = sampler.sample(engine.ctx)
                self.last_timings.completion_tokens += 1
                yield tok
                if engine.full and engine.next_pos >= engine.n_ctx:
                    return  # full cache is full: the caller sees the stream end
                engine.decode([tok])
                self.last_timings.decode_s += time.perf_counter() - t1
        finally:
            sampler.close()

    def _prefill_progress(self, cancel: CancelCheck | None) -> Callable[[int, int], None] | None:
        """The prefill progress hook, with the cancel check between chunks (a long prompt takes seconds)."""
        if cancel is None:
            return self.prefill_progress
        report = self.prefill_progress

        def progress(done: int, total: int) -> None:
            if report is not None:
                report(done, total)
            if done < total and cancel():
                raise GenerationCancelled(f"generation cancelled during the prefill, {done} of {total} tokens in")

        return progress

    def _prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_bos=True, special=True) if prompt else [self.token_bos()]
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not prompt:
                raise ValueError("prompt token list is empty")
            return list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _stream(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        max_tokens: int | None,
        stop: list[str],
        reset: bool = True,
        cancel: CancelCheck | None = None,
    ) -> Iterator[GenerationChunk]:
        """Yield the answer as GenerationChunks; the last one carries the finish."""
        if self._engine.full and max_tokens is None:
            max_tokens = max(self._engine.n_ctx - len(prompt_tokens), 1)
        text = TextAssembler(stop)
        out: list[int] = []
        for tok in self._generate(prompt_tokens, params, reset, cancel):
            if self.is_end_of_generation(tok):
                yield GenerationChunk(text.finish(), tok, "end_of_generation", out)
                return
            out.append(tok)
            piece = text.feed(self._piece(tok))
            if text.stopped:
                yield GenerationChunk(piece, tok, "stop_string", out)
                return
            if max_tokens is not None and len(out) >= max_tokens:
                yield GenerationChunk(piece + text.finish(), tok, "length", out)
                return
            if piece:
                yield GenerationChunk(piece, tok, None, out)
        yield GenerationChunk(text.finish(), None, "length", out)  # the full cache ran out of room

    # -- OpenAI-shaped API ---------------------------------------------------------------------
    def create_completion(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        logit_bias: Mapping[int | str, float] | None = None,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        stream: bool = False,
        cancel: CancelCheck | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Complete `prompt`. max_tokens=None generates until an end-of-generation token or a stop string.
        cancel: polled between tokens and prefill chunks; True raises GenerationCancelled."""
        check_max_tokens(max_tokens)
        stops = check_stop(stop)
        params = sampling_params(
            self.n_vocab,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            logit_bias=logit_bias,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
        )
        tokens = self._prompt_tokens(prompt)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_path}
        chunks = self._stream(tokens, params, max_tokens, stops, cancel=cancel)
        if stream:
            return shapes.completion_chunks(meta, chunks)
        text, finish, n_out = shapes.collect(chunks)
        return shapes.completion(meta, text, finish, self.usage(len(tokens), n_out))

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

    def _formatter(self) -> ChatFormatter:
        if self._chat is None:
            vocab = self._model.vocab
            text = lambda t: (C.llama_vocab_get_text(vocab, t) or b"").decode("utf-8", "replace") if t >= 0 else ""  # noqa: E731
            self._chat = ChatFormatter.for_model(
                self._chat_template,
                self._model.meta("general.architecture") or "",
                text(self.token_bos()),
                text(self.token_eos()),
            )
        return self._chat

    def create_chat_completion(
        self,
        messages: Sequence[dict[str, Any]],
        max_tokens: int | None = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        logit_bias: Mapping[int | str, float] | None = None,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        stream: bool = False,
        cancel: CancelCheck | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answer a conversation, formatted with the model's own chat template.
        cancel: polled between tokens and prefill chunks; True raises GenerationCancelled."""
        msgs = validate_messages(messages)
        check_max_tokens(max_tokens)
        stops = check_stop(stop)
        params = sampling_params(
            self.n_vocab,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            logit_bias=logit_bias,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
        )
        prompt, template_stops, has_bos = self._formatter().prompt(msgs)
        tokens = continuation_tokens(
            self._last_turn if self._engine.consistent else None,
            msgs,
            prompt,
            lambda t: self.tokenize(t, add_bos=False, special=True),
        )
        if tokens is None:
            tokens = self.tokenize(prompt, add_bos=not has_bos, special=True)
        self._last_turn = None
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_path}
        chunks = self._remember_turn(
            self._stream(tokens, params, max_tokens, stops + template_stops, cancel=cancel), msgs, prompt, tokens
        )
        if stream:
            return shapes.chat_chunks(meta, chunks)
        text, finish, n_out = shapes.collect(chunks)
        return shapes.chat_completion(meta, text, finish, self.usage(len(tokens), n_out))

    def _remember_turn(
        self,
        chunks: Iterator[GenerationChunk],
        msgs: list[dict[str, Any]],
        prompt: str,
        tokens: list[int],
    ) -> Iterator[GenerationChunk]:
        """Pass chunks through; once the answer is complete, remember the turn for the next request.
        An answer cut by a stop string is not remembered: its text no longer matches its tokens."""
        text, out, cut = "", [], False
        try:
            for c in chunks:
                text, out, cut = text + c.text, c.tokens, c.finish == "stop_string"
                if c.finish is not None and not cut:
                    self._last_turn = ChatTurn(
                        msgs + [{"role": "assistant", "content": text}], prompt, text, tokens + out
                    )
                yield c
        except GeneratorExit:  # the caller stopped the answer early: the next turn can still continue on it
            if self._engine.consistent and not cut:
                self._last_turn = ChatTurn(
                    msgs + [{"role": "assistant", "content": text}], prompt, text, tokens + list(out)
                )
            raise

    # -- state -------------------------------------------------------------------------------
    @property
    def stats(self) -> KVStats:
        return self._engine.stats

    @property
    def engine(self) -> KVEngine:
        """The decode engine (cell maps, raw decode); for tests and tools."""
        return self._engine

    def reset(self) -> None:
        self._engine.reset()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._model is not None:
            self._model.close()
            self._model = None

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown may have torn down llama_cpp already
            pass
