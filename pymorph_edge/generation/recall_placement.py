"""Where a chat turn takes recalled text, in the model's own template (engine/recall.py decodes it).

Three shapes, the first the template renders as a prefix of the turn:
1. the start of the new user message: its header is decoded first, then the block ("(Earlier:) ..." and a blank
   line), then the user's own words. Since stop 34 the first choice: it is 5 tokens shorter under ChatML than a
   message of its own, and on 7 dialogue sets each it answered as often on SmolLM2 (35 of 56 against 34) and more
   often on Gemma 3 (docs/recall.md, "A shorter block");
2. a user message of its own just before the new messages, where the first cannot be placed (the new text does not
   open with a user message of plain text, or the message cannot be cut on a token boundary);
3. a user message followed by a short assistant acknowledgement, when the second shape is refused too (a template
   that wants user and assistant to alternate). Gemma 3 base copied "Noted." into 7 of 8 answers this way (1
   answered, against 4 with a message of its own under llama.cpp's built-in template), so it is the last resort.
A template error in trying a shape never fails the turn; a template that renders none of them gets no recall.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymorph_edge.engine.recall import Around, Wrap
from pymorph_edge.engine.recall_select import SENTENCE_END
from pymorph_edge.generation.chat import ChatFormatter, ChatTurn, text_after_answer

# what recalled text says it is: text the user or the model wrote earlier in this conversation. It was "(From earlier
# in this conversation:) " until stop 34: 4 tokens more of prefill a recall, for no answer more (docs/recall.md)
RECALLED_PREFIX = "(Earlier:) "
# where the raw ids go when they are restored: not NUL, which ends llama.cpp's built-in templates' C strings
RAW_MARK = "\ue000"
RECALLED_ACK = "Noted."  # the assistant turn of the last-resort shape
INLINE_GAP = "\n\n"  # between the recalled text and the user's own words, in the first shape
# shape 1 before shape 2 (False: a message of its own first, as before stop 34; recall_bench's "+own")
PREFER_INLINE = True
# in shape 1, the block after the user's own words instead of before them (recall_bench's "+after")
BLOCK_AFTER_WORDS = False
# a completion's block just before the new text's last sentence (the cue it stops on) rather than before all of it:
# a continuation request of ~500 tokens otherwise leaves the fact 500 tokens from its cue (docs/recall.md, "Next
# to the cue"; recall_bench's "+front" turns it off)
BEFORE_LAST_SENTENCE = True


@dataclass
class RecallPlacement:
    """How a request takes recalled text: after `skip` leading tokens of the new text (an undecoded answer token,
    or the new user message's header), wrapped by `wrap` (None: the raw token ids, for completions)."""

    wrap: Wrap | None = None
    skip: int = 0
    around: Around | None = None  # the wrap's tokens before and after raw ids, for a restored block (recall.py)
    query_in_head: bool = False  # the user's words are in the skipped head (BLOCK_AFTER_WORDS): choose by all of it


Tokenize = Callable[[str], list[int]]


def last_sentence_start(tokens: list[int], piece: Callable[[int], str]) -> int:
    """How many of `tokens` come before their last sentence that has words (0: there is no earlier one). The
    sentence ends are recall's query's (recall_select.SENTENCE_END), so the block goes just before what chose it."""
    words_after = False
    for i in range(len(tokens) - 1, -1, -1):
        text = piece(tokens[i])
        if words_after and SENTENCE_END.search(text):
            return i + 1
        words_after = words_after or any(ch.isalnum() for ch in text)
    return 0


def chat_placement(
    turn: ChatTurn,
    new: list[dict[str, Any]],
    suffix: str,
    fmt: ChatFormatter,
    tokenize: Tokenize,
    detokenize: Callable[[list[int]], str],
) -> RecallPlacement:
    """The placement for a turn whose new messages `new` render as `suffix` after the cached answer."""

    def rendered(msgs: list[dict[str, Any]]) -> str | None:
        try:
            return text_after_answer(turn, msgs, fmt)
        except ValueError:  # the template refused the shape (raise_exception)
            return None

    def before_new(content: str, after: list[dict[str, Any]]) -> str | None:
        """Shapes 2 and 3: the text between the answer and the new messages (None: not a prefix of the turn)."""
        text = rendered([{"role": "user", "content": content}, *after, *new])
        if text is None or not text.endswith(suffix) or len(text) == len(suffix):
            return None
        return text[: len(text) - len(suffix)]

    def inside_new(content: str) -> tuple[int, str] | None:
        """Shape 1: (where in suffix the block goes, the block's text)."""
        if not new or new[0].get("role") != "user" or not isinstance(new[0].get("content"), str):
            return None
        words = new[0]["content"]
        joined = words + INLINE_GAP + content if BLOCK_AFTER_WORDS else content + INLINE_GAP + words
        text = rendered([{**new[0], "content": joined}, *new[1:]])
        if text is None or len(text) <= len(suffix):
            return None
        cut = 0
        while cut < len(suffix) and text[cut] == suffix[cut]:
            cut += 1
        block = text[cut : cut + len(text) - len(suffix)]
        placed = block.endswith(content) if BLOCK_AFTER_WORDS else block.startswith(content)
        return (cut, block) if text[cut + len(block) :] == suffix[cut:] and placed else None

    pending = len(turn.pending)
    probe = RECALLED_PREFIX + "x"
    if not PREFER_INLINE and before_new(probe, []) is not None:
        return _placement(lambda c: before_new(c, []), pending, tokenize, detokenize)
    inline = inside_new(probe)
    if inline is not None:
        head = tokenize(suffix[: inline[0]])
        if head + tokenize(suffix[inline[0] :]) == tokenize(suffix):  # the cut falls on a token boundary
            place = _placement(lambda c: (inside_new(c) or (0, None))[1], pending + len(head), tokenize, detokenize)
            place.query_in_head = BLOCK_AFTER_WORDS
            return place
    if before_new(probe, []) is not None:
        return _placement(lambda c: before_new(c, []), pending, tokenize, detokenize)
    ack = [{"role": "assistant", "content": RECALLED_ACK}]
    if before_new(probe, ack) is not None:
        return _placement(lambda c: before_new(c, ack), pending, tokenize, detokenize)
    return RecallPlacement(lambda raw: None, skip=pending)


def _placement(
    render: Callable[[str], str | None], skip: int, tokenize: Tokenize, detokenize: Callable[[list[int]], str]
) -> RecallPlacement:
    """render(content) is the block's text with `content` as what it recalls (None: not placeable)."""

    def wrap(raw: list[int]) -> list[int] | None:
        text = render(RECALLED_PREFIX + detokenize(raw).strip())
        return None if text is None else tokenize(text)

    def around() -> tuple[list[int], list[int]] | None:
        head, mark, tail = (render(RECALLED_PREFIX.rstrip() + RAW_MARK) or "").partition(RAW_MARK)
        return (tokenize(head), tokenize(tail)) if mark else None

    return RecallPlacement(wrap, skip=skip, around=around)
