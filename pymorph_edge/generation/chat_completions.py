"""The chat half of `Llama`: create_chat_completion and continue_chat on the bounded cache. A mixin, so `Llama`
stays a short facade.

A request that extends the conversation the cache holds decodes only its new messages; evicted text it needs is
recalled as a message of the model's own template. JSON mode, tool calls and logprobs take llama_cpp's pieces
(generation/structured_output.py). An app that names a llama_cpp chat_format or chat_handler gets that handler,
called with this Llama, so its prompts and tool-call parsing are llama_cpp's own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from llama_cpp import llama_chat_format as lcf

from pymorph_edge.generation import openai_shapes as shapes
from pymorph_edge.generation.chat import (
    ChatFormatter,
    ChatTurn,
    extends,
    messages_digest,
    text_after_answer,
    validate_messages,
)
from pymorph_edge.generation.generation_record import CancelCheck, GenerationChunk
from pymorph_edge.generation.logprobs import completion_logprobs
from pymorph_edge.generation.recall_placement import RecallPlacement, chat_placement
from pymorph_edge.generation.request_params import check_logprobs, check_max_tokens, check_stop
from pymorph_edge.generation.sampling import sampling_keywords
from pymorph_edge.generation.step_hooks import StepHooks
from pymorph_edge.generation.structured_output import Structure, as_tool_call, structure

# create_chat_completion's sampling defaults (llama_cpp's)
CHAT_DEFAULTS: dict[str, Any] = dict(temperature=0.2, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0)


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
    recall: RecallPlacement | None = None  # how evicted text is placed before this turn (None: it is not recalled)


class ChatCompletionsMixin:
    _last_turn: ChatTurn | None

    def _init_chat(self, chat_template: str | None, chat_format: str | None, chat_handler: Any) -> None:
        if chat_handler is not None and not callable(chat_handler):
            raise ValueError(
                f"chat_handler must be a llama_cpp chat completion handler (a callable), got {chat_handler!r}"
            )
        if chat_format is not None and chat_handler is None:
            try:
                chat_handler = lcf.get_chat_completion_handler(chat_format)
            except Exception:  # llama_cpp's registry raises its own not-found exception
                names = sorted(lcf.LlamaChatCompletionHandlerRegistry()._chat_handlers)
                raise ValueError(f"unknown chat_format {chat_format!r}; llama_cpp has: {', '.join(names)}") from None
        self.chat_format, self.chat_handler = chat_format, chat_handler
        self._chat_template = chat_template or self._model.meta("tokenizer.chat_template")
        self._chat: ChatFormatter | None = None
        self._last_turn = None

    @property
    def has_chat_template(self) -> bool:
        """True when the GGUF carries its own chat template (an instruction-tuned model), or one was given."""
        return bool(self._chat_template) or self.chat_handler is not None

    def _formatter(self) -> ChatFormatter:
        if self._chat is None:
            self._chat = ChatFormatter.for_model(
                self._chat_template,
                self._model.meta("general.architecture") or "",
                self._template_token_text(self.token_bos()),
                self._template_token_text(self.token_eos()),
            )
        return self._chat

    def create_chat_completion(
        self,
        messages: Sequence[dict[str, Any]],
        functions: list[dict[str, Any]] | None = None,
        function_call: Any = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        response_format: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        logits_processor: Any = None,
        grammar: Any = None,
        logit_bias: dict[int | str, float] | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        cancel: CancelCheck | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answer a conversation (llama_cpp's signature and shapes), formatted with the model's own chat template.
        When the messages extend the conversation the cache holds (the previous request's plus its answer), only
        the new ones are decoded. cancel: polled between tokens and prefill chunks; True raises
        GenerationCancelled."""
        # grammar is resolved with response_format and tools below (structure)
        sampling = {k: v for k, v in sampling_keywords(locals()).items() if k != "grammar"}
        if self.chat_handler is not None:
            return self.chat_handler(
                llama=self,
                messages=messages,
                functions=functions,
                function_call=function_call,
                tools=tools,
                tool_choice=tool_choice,
                stream=stream,
                stop=stop,
                response_format=response_format,
                max_tokens=max_tokens,
                model=model,
                logits_processor=logits_processor,
                grammar=grammar,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                **sampling,
            )
        msgs = validate_messages(messages)
        shape = structure(response_format, tools, tool_choice, functions, function_call, grammar)
        if logprobs is not None and not isinstance(logprobs, bool):
            raise ValueError(
                f"logprobs must be a bool on a chat completion (top_logprobs gives how many), got {logprobs!r}"
            )
        n_lp = check_logprobs(top_logprobs, "top_logprobs") if logprobs else None
        if logprobs and n_lp is None:
            n_lp = 0
        fmt = self._formatter()
        prompt, template_stops, has_bos = fmt.prompt(msgs, tools=shape.tools, tool_choice=shape.tool_choice)
        turn = self._continuable_turn()
        suffix = None
        if turn is not None and shape.tools is None and extends(turn, msgs):
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
        sampling.update(grammar=shape.grammar, max_tokens=max_tokens, stop=stop)
        return self._answer_chat(plan, template_stops, stream, cancel, sampling, shape, n_lp, model, logits_processor)

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
        shape = structure(sampling.pop("response_format", None), grammar=sampling.pop("grammar", None))
        sampling["grammar"] = shape.grammar
        return self._answer_chat(plan, template_stops, stream, cancel, sampling, shape, None, None, None)

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

    def _chat_recall(self, turn: ChatTurn, new: list[dict[str, Any]], suffix: str) -> RecallPlacement:
        """Where recalled text goes in this turn, in the model's own template (generation/recall_placement.py)."""
        return chat_placement(
            turn,
            new,
            suffix,
            self._formatter(),
            lambda text: self.tokenize(text, add_bos=False, special=True),
            lambda ids: self.detokenize(ids).decode("utf-8", "replace"),
        )

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
        shape: Structure,
        n_lp: int | None,
        model: str | None,
        logits_processor: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        max_tokens = check_max_tokens(sampling.pop("max_tokens", None))
        stops = check_stop(sampling.pop("stop", None))
        params = self._params(**{**CHAT_DEFAULTS, **sampling})
        if plan.pending is not None:  # continue on the cache: the undecoded answer token, then the new text
            new = plan.pending + self.tokenize(plan.text, add_bos=False, special=True)
            cached, reset = len(self._engine.history), False
        else:
            new = self.tokenize(plan.text, add_bos=not plan.has_bos, special=True)
            cached, reset = 0, True
        n_prompt = cached + len(new)
        hooks = StepHooks.make(new, None, logits_processor, None)
        self._last_turn = None  # the cache is about to change
        chunks = self._remember_turn(
            self._stream(
                new, params, max_tokens, stops + template_stops, reset, cancel, cached, plan.recall, n_lp, hooks
            ),
            plan,
            n_prompt,
        )
        cid = uuid.uuid4().hex
        if shape.tool_name is not None:  # llama_cpp's own conversion, from the completion's shape
            meta = {"id": f"cmpl-{cid}", "created": int(time.time()), "model": model or self.model_path}
            view = shapes.CompletionView(meta, "", self._lp_piece, None)
            if stream:
                return as_tool_call(shape.tool_name, view.chunks(chunks, n_lp is not None), True)
            text, finish, n_out, lps = shapes.collect(chunks)
            done = view.completion(text, finish, self.usage(n_prompt, n_out), lps if n_lp is not None else None)
            return as_tool_call(shape.tool_name, done, False)
        meta = {"id": f"chatcmpl-{cid}", "created": int(time.time()), "model": model or self.model_path}
        if stream:
            return shapes.chat_chunks(meta, chunks, self._lp_piece if n_lp is not None else None)
        text, finish, n_out, lps = shapes.collect(chunks)
        lp = completion_logprobs(lps, self._lp_piece, 0) if n_lp is not None else None
        return shapes.chat_completion(meta, text, finish, self.usage(n_prompt, n_out), lp)

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
                text, out, cut = text + c.text, c.tokens, c.finish in ("stop_string", "stop")
                if c.finish is not None and not cut:
                    remember()
                yield c
        except GeneratorExit:  # the caller stopped the answer early: the next turn can still continue on it
            if self._engine.consistent and not cut:
                remember()
            raise

    # provided by Llama
    _engine: Any
    _model: Any
    _keep_system: bool
    model_path: str
    _stream: Callable[..., Iterator[GenerationChunk]]
    _params: Callable[..., Any]
    usage: Callable[..., dict[str, Any]]
