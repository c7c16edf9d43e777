"""`Llama`: the public face. A llama.cpp model whose KV cache stays under `kv_budget` cells, with
llama_cpp.Llama's constructor keywords, methods and return shapes (swap the import to port an app).

Generation is layered as in mlx-lm: `_generate` yields token ids (with their logprobs when asked), `_stream`
turns them into GenerationChunks with stop handling, `stream_generate` is the public per-step layer, and
`create_completion` / `create_chat_completion` (generation/chat_completions.py) shape them as OpenAI does.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as C
import numpy as np

from pymorph_edge.engine.engine_config import EngineConfig, merge_config
from pymorph_edge.engine.kv_engine import KVEngine
from pymorph_edge.engine.llama_cpp_options import (
    LLAMA_DEFAULT_SEED,
    effective_n_ubatch,
    kv_type_name,
    refuse_unsupported,
    resolve_budget,
)
from pymorph_edge.engine.stats import KVStats
from pymorph_edge.generation import generation_recall
from pymorph_edge.generation.chat_completions import ChatCompletionsMixin, RecallPlacement
from pymorph_edge.generation.completions import CompletionsMixin
from pymorph_edge.generation.embeddings import EmbeddingMixin
from pymorph_edge.generation.generation_record import CancelCheck, GenerationCancelled, GenerationChunk, Timings
from pymorph_edge.generation.logprobs import TokenLogprob, entry, logprob_row
from pymorph_edge.generation.request_recall import recall_for_request
from pymorph_edge.generation.sampling import Sampler, SamplingParams, sampling_keywords
from pymorph_edge.generation.step_hooks import StepHooks
from pymorph_edge.generation.text_output import TextAssembler
from pymorph_edge.model import llama_log
from pymorph_edge.model.model_file import LoadedModel
from pymorph_edge.model.model_options import ModelOptions
from pymorph_edge.model.tokenizer_api import TokenizerMixin
from pymorph_edge.policies import KVPolicy, make_policy
from pymorph_edge.sessions.session_api import SessionMixin

__all__ = ["Llama", "Timings"]

_UNSET: Any = object()  # kv_budget not passed: n_ctx (a ported app's) or the default decides


class Llama(TokenizerMixin, CompletionsMixin, ChatCompletionsMixin, SessionMixin, EmbeddingMixin):
    """A GGUF model run by llama.cpp with a bounded KV cache.

    kv_budget: cells the cache keeps after every eviction (None: full cache, no eviction). Not given: n_ctx, when
    given, is the most cells the cache may use (budget n_ctx - n_ubatch), else 1024.
    policy: a name ("morphkv" default, "h2o", "tova", "snapkv", "streaming", "context_shift", "full") or a
    KVPolicy instance. window / fusion / aggregate: the policy's own settings (an unused one is a ValueError).
    keep: the first N tokens, or "system" (each chat's system prompt), are never evicted. recall: bring evicted
    text back for new requests (default: on for MorphKV). config: the rarely changed EngineConfig settings.
    rpc_servers: "host:port[,...]" of llama.cpp RPC servers to offload to, with n_gpu_layers (the name older
    llama-cpp-python releases used; docs/offload.md).
    use_extra_bufts: llama.cpp's CPU weight repacking (llama_model_params.use_extra_bufts, default on). Off, a
    CPU run multiplies exactly as an rpc-server does (repacked kernels round differently).

    Every other keyword is llama_cpp.Llama's, with its meaning (README "Porting from llama-cpp-python"); one that
    cannot be honoured is a ValueError naming it.
    """

    def __init__(
        self,
        model_path: str | Path,
        kv_budget: int | None = _UNSET,
        policy: str | KVPolicy = "morphkv",
        *,
        window: int | None = None,
        fusion: str | None = None,
        aggregate: str | None = None,
        keep: int | str = 0,
        recall: bool | None = None,
        config: EngineConfig | None = None,
        n_ctx: int | None = None,
        n_batch: int | None = None,
        n_ubatch: int | None = None,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        split_mode: int = C.LLAMA_SPLIT_MODE_LAYER,
        tensor_split: Sequence[float] | None = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        seed: int | None = LLAMA_DEFAULT_SEED,
        flash_attn: bool | None = None,
        type_k: str | int | None = None,
        type_v: str | int | None = None,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        swa_full: bool | None = None,
        embedding: bool = False,
        pooling_type: int = C.LLAMA_POOLING_TYPE_UNSPECIFIED,
        logits_all: bool = False,
        last_n_tokens_size: int = 64,
        lora_path: str | None = None,
        lora_scale: float = 1.0,
        rpc_servers: str | None = None,
        use_extra_bufts: bool = True,
        chat_format: str | None = None,
        chat_handler: Callable[..., Any] | None = None,
        chat_template: str | None = None,
        verbose: bool | None = None,
        **llama_cpp_kwargs: Any,
    ) -> None:
        self._engine: KVEngine | None = None
        self._model: LoadedModel | None = None
        refuse_unsupported(llama_cpp_kwargs)
        for name, flag in (("embedding", embedding), ("logits_all", logits_all)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if verbose is not None and not isinstance(verbose, bool):
            raise ValueError(f"verbose must be True, False or None (Python logging), got {verbose!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(policy, str):
            given = {"window": window, "fusion": fusion, "aggregate": aggregate}
            policy = make_policy(policy, **{k: v for k, v in given.items() if v is not None})
        elif not isinstance(policy, KVPolicy):
            raise ValueError(f"policy must be a policy name or a KVPolicy, got {policy!r}")
        if keep != "system" and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"keep must be a non-negative int (the first tokens) or 'system', got {keep!r}")
        self._keep_system = keep == "system"
        llama_log.set_verbose(verbose)
        config = merge_config(
            config,
            n_threads=n_threads,
            n_threads_batch=n_threads_batch,
            flash_attn=flash_attn,
            type_k=kv_type_name("type_k", type_k),
            type_v=kv_type_name("type_v", type_v),
            n_keep=keep if isinstance(keep, int) and keep else None,
            recall=recall,
            rope_freq_base=rope_freq_base or None,
            rope_freq_scale=rope_freq_scale or None,
            swa_full=swa_full,
            penalty_last_n=last_n_tokens_size if last_n_tokens_size != 64 else None,
        )
        ubatch = effective_n_ubatch(n_ubatch, n_batch, config.n_ubatch)
        options = ModelOptions(
            n_gpu_layers,
            main_gpu,
            split_mode,
            tensor_split,
            use_mmap,
            use_mlock,
            lora_path,
            lora_scale,
            rpc_servers,
            use_extra_bufts,
        )
        self._model = LoadedModel(model_path, options)
        try:
            budget = resolve_budget(
                None if kv_budget is _UNSET else kv_budget,
                kv_budget is not _UNSET,
                n_ctx,
                ubatch,
                self._model.info.n_ctx_train,
            )
            full_n_ctx = (n_ctx or self._model.info.n_ctx_train) if (budget is None and n_ctx is not None) else None
            config = merge_config(config, n_ubatch=ubatch if ubatch != config.n_ubatch else None, n_ctx=full_n_ctx)
            self._engine = KVEngine(self._model, budget, policy, config)
        except BaseException:
            self._model.close()
            raise
        self.model_path = str(self._model.path)
        self.policy = self._engine.policy
        self.kv_budget = budget
        self._generation_recall = generation_recall.for_engine(
            self._engine, self._piece_text, config.recall_in_generation
        )
        self.verbose = bool(verbose)
        self.last_timings = Timings()
        self._seed: int | None = None if seed == LLAMA_DEFAULT_SEED else seed
        self._embedding, self._pooling_type, self.logits_all = embedding, pooling_type, logits_all
        self._embed_ctx = None
        self._init_chat(chat_template, chat_format, chat_handler)
        self._session_identity: dict[str, Any] | None = None
        # called as prefill_progress(done, total) while a prompt is decoded; the CLI shows a tqdm bar
        self.prefill_progress: Callable[[int, int], None] | None = None
        self._piece_cache: dict[int, str] = {}

    # -- sizes -------------------------------------------------------------------------------
    def n_ctx(self) -> int:
        """Cells llama.cpp allocated for the cache: the ceiling (kv_budget + n_ubatch, padded), or the full
        cache's context. A method, as in llama_cpp; llm.stats.n_ctx holds the same number."""
        return self._engine.n_ctx

    @property
    def n_batch(self) -> int:
        return self._engine.n_batch

    def set_seed(self, seed: int) -> None:
        """The seed of requests that give none (llama_cpp.Llama.set_seed)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self._seed = seed

    def _request_seed(self, seed: int | None) -> int | None:
        """As llama_cpp: a request's seed becomes the model's; without one, the next seed is drawn from the model's
        (so a seeded model repeats itself call for call). No seed anywhere: every request samples afresh."""
        if seed is not None:
            self._seed = seed
        elif self._seed is not None:
            self._seed = random.Random(self._seed).randint(0, 2**32) & 0xFFFFFFFF
        return self._seed

    def _params(self, **kw: Any) -> SamplingParams:
        kw["seed"] = self._request_seed(kw.get("seed"))
        kw.setdefault("penalty_last_n", self._engine.config.penalty_last_n)
        return SamplingParams.from_kwargs(self.n_vocab(), **kw)

    # -- generation layers -----------------------------------------------------------------
    def generate(
        self,
        tokens: Sequence[int],
        *,
        temp: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        seed: int | None = None,
        logit_bias: Mapping[int | str, float] | None = None,
        grammar: Any = None,
        reset: bool = True,
        cancel: CancelCheck | None = None,
    ) -> Iterator[int]:
        """Yield sampled token ids (end-of-generation tokens included), like llama_cpp.Llama.generate: endlessly
        under a budget; the full cache (kv_budget=None) stops when its n_ctx cells are full.
        cancel: polled between tokens and prefill chunks; True raises GenerationCancelled."""
        params = self._params(**sampling_keywords(locals(), temp="temperature"))
        for tok, _ in self._generate(list(tokens), params, reset, cancel):
            yield tok

    def _generate(
        self,
        tokens: list[int],
        params: SamplingParams,
        reset: bool,
        cancel: CancelCheck | None = None,
        cached: int = 0,
        recall: RecallPlacement | None = None,
        n_logprobs: int | None = None,
        hooks: StepHooks | None = None,
    ) -> Iterator[tuple[int, TokenLogprob | None]]:
        """reset=True: reuse the cached prefix the prompt shares with the history (llama_cpp.Llama does the
        same); reset=False: append the tokens to whatever the cache holds, `cached` tokens of the prompt
        (counted in the timings, not passed in tokens). n_logprobs: each token comes with its logprob entry."""
        sampler = Sampler(params, self.n_vocab(), self._model.vocab)  # validates before any decoding
        if not tokens:
            sampler.close()
            raise ValueError("generate needs at least one prompt token")
        engine = self._engine
        n_vocab = self.n_vocab()
        t0 = time.perf_counter()
        try:
            if hooks is not None and hooks.prompt_logprobs is not None:
                engine.reset()  # every prompt token's logits are needed: nothing cached can be reused
                new, extends = tokens, False
            elif reset:
                new = tokens[engine.reuse_prefix(tokens) :]
                extends = len(new) < len(tokens)
            else:
                if not engine.consistent:
                    engine.reset()
                new, extends = tokens, engine.n_past > 0
            n_new = len(new)  # what this request decodes, what goes before a recalled block included
            every_logit = hooks is not None and hooks.prompt_logprobs is not None
            progress = self._prefill_progress(cancel)
            recalled, new = recall_for_request(engine, new, extends, recall, self._piece_text, progress, every_logit)
            on_logits = hooks.prompt_logits(engine.ctx, new, n_vocab) if hooks is not None else None
            try:
                engine.decode(new, progress=progress, on_logits=on_logits, block=recalled.pending)
            finally:
                if recalled:
                    engine.release_pin()
        except BaseException:
            sampler.close()
            raise
        self.last_timings = Timings(
            prompt_tokens=cached + len(tokens),
            prefill_s=time.perf_counter() - t0,
            cached_tokens=cached + len(tokens) - n_new,
        )
        try:
            while True:
                if cancel is not None and cancel():
                    raise GenerationCancelled("generation cancelled")
                t1 = time.perf_counter()
                if hooks is not None:
                    hooks.before_sample(engine.ctx, n_vocab)
                row = logprob_row(engine.ctx, n_vocab) if n_logprobs is not None else None
                tok = sampler.sample(engine.ctx)
                self.last_timings.completion_tokens += 1
                stop = hooks is not None and hooks.after_sample(engine.ctx, n_vocab, tok)
                yield tok, (entry(row, tok, n_logprobs or 0) if row is not None else None)
                if stop or (engine.full and engine.next_pos >= engine.n_ctx):
                    return  # a stopping criterion, or a full cache that is full: the caller sees the stream end
                self.decode_step(tok)  # recall may bring evicted text back before the sentence in progress
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
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_bos=True, special=True) if prompt else [self.token_bos()]
        if isinstance(prompt, (list, tuple)) and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt
        ):
            if not prompt:
                raise ValueError("prompt token list is empty")
            bad = [int(t) for t in prompt if not 0 <= t < self.n_vocab()]
            if bad:
                raise ValueError(f"token ids {bad[:5]} outside the vocabulary [0, {self.n_vocab()})")
            return [int(t) for t in prompt]
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _stream(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        max_tokens: int | None,
        stop: list[str],
        reset: bool = True,
        cancel: CancelCheck | None = None,
        cached: int = 0,
        recall: RecallPlacement | None = None,
        n_logprobs: int | None = None,
        hooks: StepHooks | None = None,
    ) -> Iterator[GenerationChunk]:
        """Yield the answer as GenerationChunks; the last one carries the finish. Each chunk carries the KV cache's
        state after its token, and the logprob entries of the tokens its text covers."""
        if self._engine.full and max_tokens is None:
            max_tokens = max(self._engine.n_ctx - len(prompt_tokens), 1)
        text = TextAssembler(stop)
        out: list[int] = []
        lps: list[TokenLogprob] = []
        t0 = time.perf_counter()

        def chunk(piece: str, tok: int | None, finish: Any) -> GenerationChunk:
            nonlocal lps
            s = self._engine.stats
            c = GenerationChunk(piece, tok, finish, out, list(lps), s.cells_in_use, s.tokens_evicted)
            c.tok_per_s = len(out) / max(time.perf_counter() - t0, 1e-9)
            if piece or finish is not None:
                lps = []
            else:
                c.logprobs = []
            return c

        gen = self._generate(prompt_tokens, params, reset, cancel, cached, recall, n_logprobs, hooks)
        for tok, lp in gen:
            if self.is_end_of_generation(tok):
                yield chunk(text.finish(), tok, "end_of_generation")
                return
            out.append(tok)
            if lp is not None:
                lps.append(lp)
            piece = text.feed(self._piece(tok))
            if text.stopped:
                yield chunk(piece, tok, "stop_string")
                return
            if max_tokens is not None and len(out) >= max_tokens:
                yield chunk(piece + text.finish(), tok, "length")
                return
            if piece:
                yield chunk(piece, tok, None)
        yield chunk(text.finish(), None, "stop" if hooks is not None and hooks.stopped else "length")

    # -- state -------------------------------------------------------------------------------
    @property
    def stats(self) -> KVStats:
        return self._engine.stats

    @property
    def engine(self) -> KVEngine:
        """The decode engine (cell maps, raw decode); for tests and tools."""
        return self._engine

    def decode_step(self, token: int) -> None:
        """Decode one token as the generation loop does, recall inside the generation included; for teacher-forced
        tools (the bench's ppl, fidelity and long-run tasks)."""
        self._engine.decode([token])
        if self._generation_recall is not None:
            self._generation_recall.after_token()

    def reset(self) -> None:
        self._engine.reset()
        self._last_turn = None

    def close(self) -> None:
        self._close_embeddings()
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
