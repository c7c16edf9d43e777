"""`Llama`: the public face. A llama.cpp model whose KV cache stays under `kv_budget` cells.

Generation is layered as in mlx-lm: `generate` yields token ids, `_stream` turns them into
text chunks with stop handling, and `create_completion` / `create_chat_completion` collect them.
"""

from __future__ import annotations

import ctypes
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as C

from pymorph_edge.engine import engine_snapshot
from pymorph_edge.engine.engine_config import EngineConfig, merge_config
from pymorph_edge.engine.kv_engine import KVEngine
from pymorph_edge.engine.recall import Wrap, recall_before
from pymorph_edge.engine.stats import KVStats
from pymorph_edge.generation import openai_shapes as shapes
from pymorph_edge.generation.chat import (
    ChatFormatter,
    ChatTurn,
    extends,
    messages_digest,
    text_after_answer,
    validate_messages,
)
from pymorph_edge.generation.generation_record import CancelCheck, GenerationCancelled, GenerationChunk, Timings
from pymorph_edge.generation.request_params import check_max_tokens, check_stop, sampling_params
from pymorph_edge.generation.sampling import Sampler, SamplingParams
from pymorph_edge.generation.text_output import TextAssembler
from pymorph_edge.model.model_file import LoadedModel
from pymorph_edge.policies import KVPolicy, make_policy
from pymorph_edge.sessions import session_file
from pymorph_edge.sessions.session_file import SavedConversation

# what a recalled chat message says it is: text the user or the model wrote earlier in this conversation
RECALLED_PREFIX = "(From earlier in this conversation:) "

_CHAT_DEFAULTS: dict[str, Any] = dict(
    temperature=0.2,
    top_p=0.95,
    top_k=40,
    min_p=0.05,
    seed=None,
    logit_bias=None,
    repeat_penalty=1.0,
    frequency_penalty=0.0,
    presence_penalty=0.0,
)


@dataclass
class _ChatPlan:
    """What a chat request decodes: `text` after the cached conversation (pending is not None) or a whole
    prompt (pending None), and what its turn will be remembered as."""

    digest_before: str
    n_before: int
    own: list[dict[str, Any]]
    pending: list[int] | None
    text: str
    conversation_id: str | None  # the continued conversation's; None starts one
    has_bos: bool = False
    recall: _Recall | None = None  # how evicted text is placed before this turn (None: it is not recalled)


@dataclass
class _Recall:
    """How a request takes recalled text: after `skip` leading tokens of the new text (an undecoded answer token),
    wrapped by `wrap` (None: the raw token ids, for completions)."""

    wrap: Wrap | None = None
    skip: int = 0


class Llama:
    """A GGUF model run by llama.cpp with a bounded KV cache.

    kv_budget: cells the cache keeps after every eviction (None: full cache, no eviction).
    policy: a name ("morphkv" default, "h2o", "tova", "snapkv", "streaming", "context_shift", "full") or a
    KVPolicy instance. window: the policy's recent window (default: its own, 32 for MorphKV);
    fusion ("sum" or "max", MorphKV) and aggregate ("mean" or "max": MorphKV, H2O, TOVA, SnapKV) default to the
    policy's own; passing one to a policy that does not use it is a ValueError.
    flash_attn (None: on where it pays, and always for a quantized V cache), type_k / type_v (KV cache element
    types by llama.cpp's names: "f16" default, "q8_0", "q4_0", ...): see EngineConfig.
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
        flash_attn: bool | None = None,
        type_k: str | None = None,
        type_v: str | None = None,
        chat_template: str | None = None,
        keep: int | str = 0,
        recall: bool | None = None,
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
        if keep != "system" and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"keep must be a non-negative int (the first tokens) or 'system', got {keep!r}")
        self._keep_system = keep == "system"
        config = merge_config(
            config,
            n_ctx=n_ctx,
            n_threads=n_threads,
            flash_attn=flash_attn,
            type_k=type_k,
            type_v=type_v,
            n_keep=keep if isinstance(keep, int) and keep else None,
            recall=recall,
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
        self._session_identity: dict[str, Any] | None = None
        # called as prefill_progress(done, total) while a prompt is decoded; the CLI shows a tqdm bar
        self.prefill_progress: Callable[[int, int], None] | None = None
        self._piece_cache: dict[int, str] = {}

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

    def _piece_text(self, token: int) -> str:
        """A token's text, memoised: recall reads the text of every evicted token at each request."""
        text = self._piece_cache.get(token)
        if text is None:
            text = self._piece_cache[token] = self._piece(token).decode("utf-8", "replace")
        return text

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
        self,
        tokens: list[int],
        params: SamplingParams,
        reset: bool,
        cancel: CancelCheck | None = None,
        cached: int = 0,
        recall: _Recall | None = None,
    ) -> Iterator[int]:
        """reset=True: reuse the cached prefix the prompt shares with the history (llama_cpp.Llama does the
        same); reset=False: append the tokens to whatever the cache holds, `cached` tokens of the prompt
        (counted in the timings, not passed in tokens)."""
        sampler = Sampler(params, self.n_vocab)  # validates before any decoding
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        engine = self._engine
        t0 = time.perf_counter()
        if reset:
            new = tokens[engine.reuse_prefix(tokens) :]
            extends = len(new) < len(tokens)
        else:
            if not engine.consistent:
                engine.reset()
            new, extends = tokens, engine.n_past > 0
        recalled, n_new = 0, len(new)  # n_new: what this request decodes, a head decoded before the block included
        if extends and recall is not None and engine.recall_enabled:
            head, rest = new[: recall.skip], new[recall.skip :]
            recalled = recall_before(engine, rest, self._piece_text, recall.wrap, head)
            if recalled:
                new = rest  # head went in before the block
        try:
            engine.decode(new, progress=self._prefill_progress(cancel))
        finally:
            if recalled:
                engine.release_pin()
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
        cached: int = 0,
        recall: _Recall | None = None,
    ) -> Iterator[GenerationChunk]:
        """Yield the answer as GenerationChunks; the last one carries the finish."""
        if self._engine.full and max_tokens is None:
            max_tokens = max(self._engine.n_ctx - len(prompt_tokens), 1)
        text = TextAssembler(stop)
        out: list[int] = []
        for tok in self._generate(prompt_tokens, params, reset, cancel, cached, recall):
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
        chunks = self._stream(tokens, params, max_tokens, stops, cancel=cancel, recall=_Recall())
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
        """Answer a conversation, formatted with the model's own chat template. When the messages extend the
        conversation the cache holds (the previous request's plus its answer), only the new ones are decoded.
        cancel: polled between tokens and prefill chunks; True raises GenerationCancelled."""
        msgs = validate_messages(messages)
        fmt = self._formatter()
        prompt, template_stops, has_bos = fmt.prompt(msgs)
        turn = self._continuable_turn()
        suffix = None
        if turn is not None and extends(turn, msgs):
            suffix = text_after_answer(turn, msgs[turn.n_messages :], fmt)
            if suffix is not None and not prompt.endswith(suffix):
                suffix = None  # the template renders the full conversation differently from its last exchange
        if suffix is not None:
            assert turn is not None
            own = msgs[turn.n_messages :]
            plan = _ChatPlan(
                turn.digest,
                turn.n_messages,
                own,
                turn.pending,
                suffix,
                turn.conversation_id,
                recall=self._chat_recall(turn, own, suffix),
            )
        else:
            if self._keep_system:
                self._engine.set_keep(self._system_prompt_tokens(msgs))
            n_before = max((i + 1 for i, m in enumerate(msgs) if m["role"] == "assistant"), default=0)
            plan = _ChatPlan(messages_digest(msgs[:n_before]), n_before, msgs[n_before:], None, prompt, None, has_bos)
        return self._answer_chat(
            plan,
            template_stops,
            stream,
            cancel,
            dict(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                stop=stop,
                seed=seed,
                logit_bias=logit_bias,
                repeat_penalty=repeat_penalty,
                frequency_penalty=frequency_penalty,
                presence_penalty=presence_penalty,
            ),
        )

    def continue_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        stream: bool = False,
        cancel: CancelCheck | None = None,
        **sampling: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answer `messages` as the next turn of the conversation the cache holds (a previous chat answer, or a
        loaded session), without sending the conversation again. Sampling keywords as create_chat_completion.
        ValueError when the cache holds no conversation to continue."""
        msgs = validate_messages(messages)
        turn = self._continuable_turn()
        if turn is None:
            raise ValueError(
                "the cache holds no conversation to continue (none yet, or it was reset); "
                "send the whole conversation with create_chat_completion"
            )
        fmt = self._formatter()
        suffix = text_after_answer(turn, msgs, fmt)
        if suffix is None:
            raise ValueError("this chat template does not render the previous answer as a prefix of the next turn")
        _, template_stops, _ = fmt.prompt(list(turn.tail) + msgs)
        plan = _ChatPlan(
            turn.digest,
            turn.n_messages,
            msgs,
            turn.pending,
            suffix,
            turn.conversation_id,
            recall=self._chat_recall(turn, msgs, suffix),
        )
        return self._answer_chat(plan, template_stops, stream, cancel, sampling)

    def _system_prompt_tokens(self, msgs: list[dict[str, Any]]) -> int:
        """Tokens of the prompt up to the end of its system message (0 without one): what keep="system" pins.
        Found as the tokens two renderings share that differ only in the first user message."""
        if not msgs or msgs[0]["role"] != "system":
            return 0
        fmt = self._formatter()
        a, _, _ = fmt.prompt([msgs[0], {"role": "user", "content": "a"}])
        b, _, _ = fmt.prompt([msgs[0], {"role": "user", "content": "b"}])
        ta, tb = self.tokenize(a, special=True), self.tokenize(b, special=True)
        n = 0
        while n < min(len(ta), len(tb)) and ta[n] == tb[n]:
            n += 1
        return n

    def _chat_recall(self, turn: ChatTurn, new: list[dict[str, Any]], suffix: str) -> _Recall:
        """Recalled text goes in as a user message of the model's own template, just before the new messages,
        so the conversation stays well formed. Not placed at all when the template renders it otherwise."""
        fmt = self._formatter()

        def wrap(raw: list[int]) -> list[int] | None:
            text = self.detokenize(raw).decode("utf-8", "replace").strip()
            msg = {"role": "user", "content": RECALLED_PREFIX + text}
            with_recall = text_after_answer(turn, [msg, *new], fmt)
            if with_recall is None or not with_recall.endswith(suffix) or len(with_recall) == len(suffix):
                return None
            return self.tokenize(with_recall[: len(with_recall) - len(suffix)], add_bos=False, special=True)

        return _Recall(wrap, skip=len(turn.pending))

    @property
    def conversation_id(self) -> str | None:
        """The id of the chat conversation the cache holds (stable over its turns), or None."""
        turn = self._continuable_turn()
        return turn.conversation_id if turn is not None else None

    @property
    def has_conversation(self) -> bool:
        """Whether the cache holds a chat conversation that continue_chat can go on with."""
        return self._continuable_turn() is not None

    def _continuable_turn(self) -> ChatTurn | None:
        """The remembered turn, if the cache still holds exactly the conversation it describes."""
        turn = self._last_turn
        if turn is None or not self._engine.consistent:
            return None
        return turn if turn.fingerprint == self._engine.history.fingerprint().hex() else None

    def _answer_chat(
        self,
        plan: _ChatPlan,
        template_stops: list[str],
        stream: bool,
        cancel: CancelCheck | None,
        sampling: dict[str, Any],
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        max_tokens = sampling.pop("max_tokens", None)
        check_max_tokens(max_tokens)
        stops = check_stop(sampling.pop("stop", None))
        params = sampling_params(self.n_vocab, **{**_CHAT_DEFAULTS, **sampling})
        if plan.pending is not None:  # continue on the cache: the undecoded answer token, then the new text
            new = plan.pending + self.tokenize(plan.text, add_bos=False, special=True)
            cached, reset = len(self._engine.history), False
        else:
            new = self.tokenize(plan.text, add_bos=not plan.has_bos, special=True)
            cached, reset = 0, True
        n_prompt = cached + len(new)
        self._last_turn = None  # the cache is about to change
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_path}
        chunks = self._remember_turn(
            self._stream(new, params, max_tokens, stops + template_stops, reset, cancel, cached, plan.recall),
            plan,
            n_prompt,
        )
        if stream:
            return shapes.chat_chunks(meta, chunks)
        text, finish, n_out = shapes.collect(chunks)
        return shapes.chat_completion(meta, text, finish, self.usage(n_prompt, n_out))

    def _remember_turn(
        self, chunks: Iterator[GenerationChunk], plan: _ChatPlan, n_prompt: int
    ) -> Iterator[GenerationChunk]:
        """Pass chunks through; once the answer is complete, remember the turn for the next request.
        An answer cut by a stop string is not remembered: its text no longer matches its tokens."""
        text, out, cut = "", [], False

        def remember() -> None:
            history = self._engine.history
            undecoded = n_prompt + len(out) - len(history)  # the last answer token, when the length ran out
            self._last_turn = ChatTurn.after_answer(
                plan.digest_before,
                plan.n_before,
                plan.own,
                text,
                list(out[len(out) - undecoded :]) if undecoded > 0 else [],
                history.fingerprint(),
                plan.conversation_id,
            )

        try:
            for c in chunks:
                text, out, cut = text + c.text, c.tokens, c.finish == "stop_string"
                if c.finish is not None and not cut:
                    remember()
                yield c
        except GeneratorExit:  # the caller stopped the answer early: the next turn can still continue on it
            if self._engine.consistent and not cut:
                remember()
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
        self._last_turn = None

    # -- sessions ----------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        if self._session_identity is None:
            m = self._model
            self._session_identity = {
                "model": session_file.model_identity(
                    m.path, m.meta("general.architecture") or "", m.info.n_layer, m.info.n_vocab
                ),
                "policy": session_file.policy_identity(self.policy),
                "kv_budget": self.kv_budget,
                "n_ctx": self._engine.n_ctx,
                "n_ubatch": self._engine.config.n_ubatch,
                # llama.cpp's state holds K/V in the cache's types, V transposed unless flash attention is on
                "kv_cache": {
                    "type_k": self._engine.config.type_k,
                    "type_v": self._engine.config.type_v,
                    "flash_attn": self._engine.flash_attn,
                },
            }
        return self._session_identity

    def save_state(self) -> SavedConversation:
        """The conversation in memory: the cache's sequence, the scorer's state and the chat turn. Its size
        is set by the budget (llama.cpp writes only live cells), not by the conversation's length."""
        return SavedConversation(self._identity(), engine_snapshot.capture(self._engine), self._last_turn)

    def load_state(self, state: SavedConversation) -> None:
        """Put back a save_state(). ValueError, with the running state untouched, when it was saved with
        another model, policy or budget, or cannot be restored."""
        why = session_file.mismatch(state.identity, self._identity())
        if why is not None:
            raise ValueError(f"cannot load this conversation: {why}")
        engine_snapshot.restore(self._engine, state.snapshot)
        self._last_turn = state.turn

    def save_session(self, path: str | Path) -> int:
        """Write the conversation to path atomically (temp file + rename); returns the file's size in bytes."""
        return session_file.write(path, self.save_state())

    def load_session(self, path: str | Path) -> None:
        """Resume a save_session() file: the next chat turn (continue_chat or create_chat_completion with the
        whole conversation) decodes only its own tokens. FileNotFoundError, or ValueError naming the problem
        (another model, policy or budget; a damaged or truncated file), with the running state untouched."""
        conv = session_file.read(path)
        why = session_file.mismatch(conv.identity, self._identity())
        if why is not None:
            raise ValueError(f"cannot load session {str(path)!r}: {why}")
        self.load_state(conv)

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
