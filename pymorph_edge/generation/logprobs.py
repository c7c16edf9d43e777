"""Token log-probabilities, read from the logits llama.cpp already computed for sampling: one row per step, never
a matrix of every position, so logprobs cost nothing that grows with the answer. Shapes follow llama_cpp."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as C
import numpy as np
from llama_cpp import Llama as _LlamaCpp


@dataclass
class TokenLogprob:
    """One token's logprob and its `n` most likely alternatives (token id, logprob), best first."""

    token: int
    logprob: float | None  # None for the first echoed prompt token, which nothing predicts
    top: list[tuple[int, float]]


def logprob_row(ctx: C.llama_context_p, n_vocab: int, i: int = -1) -> np.ndarray:
    """log-softmax of the raw logits of output i (before penalties, bias or grammar), as llama_cpp computes it."""
    ptr = C.llama_get_logits_ith(ctx, i)
    if not ptr:
        raise RuntimeError(f"llama.cpp has no logits for output {i}")
    logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
    return _LlamaCpp.logits_to_logprobs(logits)


def entry(row: np.ndarray, token: int, n: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if n > 0:
        k = min(n, row.shape[0])
        idx = np.argpartition(-row, k - 1)[:k]
        idx = idx[np.argsort(-row[idx], kind="stable")]
        top = [(int(t), float(row[t])) for t in idx]
    return TokenLogprob(token, float(row[token]), top)


def completion_logprobs(
    entries: Sequence[TokenLogprob], piece: Callable[[int], str], text_offset: int
) -> dict[str, Any]:
    """llama_cpp's CompletionLogprobs for consecutive tokens whose text starts at text_offset. An entry without a
    logprob gets nulls, as OpenAI and llama_cpp give the first echoed token."""
    tokens: list[str] = []
    offsets: list[int] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offset = text_offset
    for e in entries:
        text = piece(e.token)
        tokens.append(text)
        offsets.append(offset)
        token_lps.append(e.logprob)
        if e.logprob is None:
            tops.append(None)
        else:
            top = {piece(t): lp for t, lp in e.top}
            top[text] = e.logprob
            tops.append(top)
        offset += len(text)
    return {"tokens": tokens, "text_offset": offsets, "token_logprobs": token_lps, "top_logprobs": tops}
