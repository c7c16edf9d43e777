"""Where a chat turn takes recalled text, in the model's own template (engine/recall.py decodes it).

Three shapes, the first the template renders as a prefix of the turn:
1. the start of the new user message: its header is decoded first, then the block ("(Earlier:) ..." and a blank
   line), then the user's own words. Since stop 34 the first choice: it is 5 tokens shorter under ChatML than a
   message of its own, and on 7 dialogue sets each it answered as often on SmolLM2 (35 of 56 against 34) and more
   often on Gemma 3 (docs/recall.md, "A shorter block"). A message longer than NEXT_TO_CUE_TOKENS (a pasted text,
   then the question) takes the block just before its last sentence instead, as a completion does, so the fact
   sits next to the question that asked for it rather than a whole paste away (docs/recall.md, "Next to the cue
   in a long message");
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
# a user message longer than this many tokens takes its block just before its last sentence (0: always at its
# start, as before stop 40; recall_bench's "+start"). MorphKV's window: a shorter message keeps its start among the
# question's last W tokens, so the block is near the cue already
NEXT_TO_CUE_TOKENS = 32
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
    # the head holds the message's text up to its last sentence (NEXT_TO_CUE_TOKENS): it is chunked and probed as the
    # whole request would be (engine/recall.py's `then`)
    head_is_text: bool = False


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


def cue_places(words: str) -> list[int]:
    """Where in a message's words a block may go just before its last sentence that has words: right after the
    whitespace that ends the sentence before it (a cut on a token boundary after a newline), then right after its
    punctuation (before a space, which the next word's token carries). Empty: the words are one sentence."""
    alnum = [i for i, ch in enumerate(words) if ch.isalnum()]
    if not alnum:
        return []
    # words before it and after it (one pass: a pasted text has hundreds of sentence ends)
    ends = [m for m in SENTENCE_END.finditer(words) if alnum[0] < m.start() and m.end() <= alnum[-1]]
    if not ends:
        return []
    m = ends[-1]
    after = m.end() + len(words[m.end() :]) - len(words[m.end() :].lstrip(" \t"))
    punct = m.start() + len(m.group()) - len(m.group().lstrip(".!?"))
    return list(dict.fromkeys(at for at in (after, punct) if 0 < at < len(words)))


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

    words = new[0]["content"] if new and new[0].get("role") == "user" else None
    words = words if isinstance(words, str) else None

    def inside_new(content: str, at: int = 0) -> tuple[int, str] | None:
        """Shape 1, the block at character `at` of the user's words: (where in suffix it goes, its text)."""
        if words is None:
            return None
        if BLOCK_AFTER_WORDS:
            joined = words + INLINE_GAP + content
        elif at == 0:
            joined = content + INLINE_GAP + words
        else:  # between two sentences, a blank line on each side unless the words have whitespace there already
            before, after = words[:at], words[at:]
            gap_before = "" if before[-1:].isspace() else INLINE_GAP
            joined = before + gap_before + content + ("" if after.startswith("\n") else INLINE_GAP) + after
        text = rendered([{**new[0], "content": joined}, *new[1:]])
        if text is None or len(text) <= len(suffix):
            return None
        cut = 0
        while cut < len(suffix) and text[cut] == suffix[cut]:
            cut += 1
        block = text[cut : cut + len(text) - len(suffix)]
        placed = block.endswith(content) if BLOCK_AFTER_WORDS else content in block if at else block.startswith(content)
        return (cut, block) if text[cut + len(block) :] == suffix[cut:] and placed else None

    pending = len(turn.pending)
    probe = RECALLED_PREFIX + "x"
    if not PREFER_INLINE and before_new(probe, []) is not None:
        return _placement(lambda c: before_new(c, []), pending, tokenize, detokenize)
    long = words is not None and NEXT_TO_CUE_TOKENS > 0 and len(tokenize(words)) > NEXT_TO_CUE_TOKENS
    for at in [*(cue_places(words) if long and not BLOCK_AFTER_WORDS else []), 0]:
        inline = inside_new(probe, at)
        if inline is None:
            continue
        head = tokenize(suffix[: inline[0]])
        if head + tokenize(suffix[inline[0] :]) == tokenize(suffix):  # the cut falls on a token boundary
            place = _placement(
                lambda c, at=at: (inside_new(c, at) or (0, None))[1], pending + len(head), tokenize, detokenize
            )
            place.query_in_head = BLOCK_AFTER_WORDS or at > 0
            place.head_is_text = at > 0
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
