"""Passkey retrieval: a number hidden at some depth of a long filler text, asked for at the end.

Used to check that a bounded cache keeps a fact that only the final question makes relevant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymorph_edge.llama import Llama

FILLER = (
    "A tide of gulls rose over the harbour wall. Nets dried on the stones. "
    "The ferry bell rang twice and the fog rolled back to sea. "
)
# never used to choose defaults: scoring variants are tuned on FILLER and checked on this
HELDOUT_FILLER = (
    "The orchard lay quiet under a pale sky. Bees worked the clover along the fence, "
    "and a cart rolled past the mill while the miller counted sacks of flour. "
)


@dataclass(frozen=True)
class PasskeySet:
    """Which filler, key seeds and depths a passkey evaluation uses."""

    name: str
    filler: str
    seed_base: int
    depths: tuple[float, ...]


TUNING = PasskeySet("tuning", FILLER, 300, (0.05, 0.2, 0.35, 0.5, 0.65, 0.8))
HELDOUT = PasskeySet("held-out", HELDOUT_FILLER, 900, (0.1, 0.25, 0.4, 0.55, 0.7, 0.9))
HEADER = "Inside this long text there is a secret number. Find it and remember it.\n"
QUESTION = "\nQuestion: what is the secret number? Answer: the secret number is"


@dataclass(frozen=True)
class PasskeyCase:
    prompt: str
    key: str
    depth: float


def make_case(n_filler: int, depth: float, seed: int, filler: str = FILLER) -> PasskeyCase:
    """n_filler repeats of the filler (about 30 tokens each on Gemma 3), key at `depth` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    key = str(random.Random(seed).randint(10000, 99999))
    d = int(n_filler * depth)
    prompt = (
        HEADER
        + filler * d
        + f"\nThe secret number is {key}. Keep {key} in mind.\n"
        + filler * (n_filler - d)
        + QUESTION
    )
    return PasskeyCase(prompt, key, depth)


def filler_repeats_for(llm: Llama, n_tokens: int, filler: str = FILLER) -> int:
    """Filler repeats giving a prompt of about n_tokens tokens on this model's tokenizer."""
    per = len(llm.tokenize(filler * 10, add_bos=False)) / 10
    return max(1, int((n_tokens - 60) / per))


def answer(llm: Llama, case: PasskeyCase, max_tokens: int = 8) -> tuple[bool, str]:
    out = llm.create_completion(case.prompt, max_tokens=max_tokens, temperature=0)
    text = out["choices"][0]["text"]
    return case.key in text, text


def answer_chat(llm: Llama, case: PasskeyCase, max_tokens: int = 24) -> tuple[bool, str]:
    """The same case asked as one user message, for instruction-tuned models."""
    content = case.prompt.rsplit("\nQuestion:", 1)[0] + "\nWhat is the secret number?"
    out = llm.create_chat_completion([{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0)
    text = out["choices"][0]["message"]["content"]
    return case.key in text, text
