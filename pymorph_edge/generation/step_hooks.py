"""llama_cpp's per-step extension points: logits processors, stopping criteria, and the prompt's logprobs for
echo. Each reads or rewrites only the one logits row llama.cpp already holds, so none of them grows with the
answer; with none asked for, generation takes no extra step at all (StepHooks.make returns None)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp.llama_cpp as C
import numpy as np

from pymorph_edge.generation.logprobs import TokenLogprob, entry, logprob_row


def _callables(value: Any, name: str) -> list[Callable[..., Any]]:
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(callable(f) for f in items):
        raise ValueError(f"{name} must be a callable or a list of callables (llama_cpp's {name}), got {value!r:.80}")
    return items


class StepHooks:
    """logits_processor(input_ids, scores) -> scores and stopping_criteria(input_ids, logits) -> bool, called as
    llama_cpp calls them (input_ids: the prompt and the answer so far, np.intc); n_prompt_logprobs: score every
    prompt token (echo with logprobs)."""

    def __init__(
        self,
        tokens: Sequence[int],
        processors: list[Callable[..., Any]],
        criteria: list[Callable[..., Any]],
        n_prompt_logprobs: int | None,
    ) -> None:
        self.processors, self.criteria = processors, criteria
        self.prompt_logprobs: list[TokenLogprob] | None = [] if n_prompt_logprobs is not None else None
        self._n_top = n_prompt_logprobs or 0
        self._tokens = list(tokens)
        self.stopped = False

    @classmethod
    def make(
        cls, tokens: Sequence[int], stopping_criteria: Any, logits_processor: Any, n_prompt_logprobs: int | None
    ) -> StepHooks | None:
        processors = _callables(logits_processor, "logits_processor")
        criteria = _callables(stopping_criteria, "stopping_criteria")
        if not processors and not criteria and n_prompt_logprobs is None:
            return None
        return cls(tokens, processors, criteria, n_prompt_logprobs)

    def _input_ids(self) -> np.ndarray:
        return np.asarray(self._tokens, dtype=np.intc)

    @staticmethod
    def _row(ctx: C.llama_context_p, n_vocab: int) -> np.ndarray:
        return np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))

    def prompt_logits(
        self, ctx: C.llama_context_p, decoded: Sequence[int], n_vocab: int
    ) -> Callable[[int, int], None] | None:
        """The engine's on_logits hook: token j's entry comes from the logits after token j-1 (the first token has
        none, as in llama_cpp)."""
        if self.prompt_logprobs is None:
            return None
        out, toks, n_top = self.prompt_logprobs, list(decoded), self._n_top
        out.append(TokenLogprob(toks[0], None, []))

        def on_logits(start: int, m: int) -> None:
            for i in range(m):
                j = start + i + 1
                if j < len(toks):
                    out.append(entry(logprob_row(ctx, n_vocab, i), toks[j], n_top))

        return on_logits

    def before_sample(self, ctx: C.llama_context_p, n_vocab: int) -> None:
        if not self.processors:
            return
        row = self._row(ctx, n_vocab)  # llama.cpp's own buffer: the sampler reads what is written here
        scores = row.copy()
        for proc in self.processors:
            scores = np.asarray(proc(self._input_ids(), scores), dtype=np.float32)
        row[:] = scores

    def after_sample(self, ctx: C.llama_context_p, n_vocab: int, token: int) -> bool:
        self._tokens.append(token)
        if self.criteria and any(bool(c(self._input_ids(), self._row(ctx, n_vocab))) for c in self.criteria):
            self.stopped = True
        return self.stopped

    def echoed(self, llm: Any) -> list[TokenLogprob] | None:
        """The prompt's entries as llama_cpp echoes them: a leading BOS left out, the first token without a
        logprob."""
        if self.prompt_logprobs is None:
            return None
        entries = list(self.prompt_logprobs)
        if entries and entries[0].token == llm.token_bos():
            entries = entries[1:]
        if entries:
            entries[0] = TokenLogprob(entries[0].token, None, [])
        return entries
