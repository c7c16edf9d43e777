"""What one step of a streamed answer yields: a typed record instead of a bare tuple (as mlx-lm's
GenerationResponse), so the reason an answer ended travels with it rather than in a flag on the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pymorph_edge.generation.logprobs import TokenLogprob

Finish = Literal["end_of_generation", "stop_string", "length", "stop"]  # "stop": a stopping criterion

# Polled between tokens and between prefill chunks: a server's deadline, a client gone, a shutdown.
CancelCheck = Callable[[], bool]


class GenerationCancelled(Exception):
    """Raised out of a generation whose cancel check answered True. The cache stays consistent: the check
    runs only at token and prefill-chunk boundaries, so the next request can reuse what was decoded."""


@dataclass
class GenerationChunk:
    """One step of a streamed answer (Llama.stream_generate), with what the KV cache looks like after it."""

    text: str  # text safe to emit now (may be empty while a stop string could be forming)
    token: int | None  # the token this piece came from; None on a closing flush
    finish: Finish | None = None  # set on the last chunk only
    tokens: list[int] = field(default_factory=list)  # every token generated so far (shared, not copied)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # entries of the tokens this text covers, if asked
    cells_in_use: int = 0  # KV cells holding tokens after this step
    tokens_evicted: int = 0  # evicted since the cache was reset
    tok_per_s: float = 0.0  # tokens generated per second so far, prefill included

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason: "stop" for an end-of-generation token or a stop string, else "length"."""
        if self.finish is None:
            return None
        return "length" if self.finish == "length" else "stop"


@dataclass
class Timings:
    """Throughput of the last completion."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the cache instead of being decoded
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0
