"""Recall for one request: where its block goes among the request's tokens (engine/recall.py chooses the text and
decodes it; generation/recall_placement.py says where a chat turn takes it).

- A request that extends the cached conversation: the block goes after the placement's head (a chat message's
  header), or, for a completion, just before the new text's last sentence, the cue it stops on
  (recall_placement.BEFORE_LAST_SENTENCE).
- A fresh completion longer than the cache (RECALL_INSIDE_PROMPT): there is no boundary to recall at, so the text
  before its last sentence is decoded first, evicting as it goes (scored by that sentence's tokens, MorphKV's prefill
  probe, when the prompt spans more than one chunk), and what it evicted that the last sentence asks for comes back
  just before it (docs/recall.md, "Inside one request")."""

from __future__ import annotations

from collections.abc import Callable

from pymorph_edge.engine.kv_engine import KVEngine
from pymorph_edge.engine.recall import Recalled, recall_before
from pymorph_edge.generation import recall_placement as placement
from pymorph_edge.generation.recall_placement import RecallPlacement

# recall inside a fresh completion that overflows the cache (False: only at request boundaries, as before stop 37)
RECALL_INSIDE_PROMPT = True

Piece = Callable[[int], str]
Progress = Callable[[int, int], None] | None


def recall_for_request(
    engine: KVEngine,
    new: list[int],
    extends: bool,
    recall: RecallPlacement | None,
    piece: Piece,
    progress: Progress,
    every_logit: bool,
) -> tuple[Recalled, list[int]]:
    """Recall what this request needs, decoding whatever must precede the block; returns what recall did and the
    tokens still to decode (the block's pending part rides in their first chunk). every_logit: the caller reads
    every prompt token's logits (echo with logprobs), so the request is not cut."""
    if recall is None or not engine.recall_enabled:
        return Recalled(), new
    if extends:
        skip = recall.skip
        if recall.wrap is None and placement.BEFORE_LAST_SENTENCE:
            skip = placement.last_sentence_start(new, piece)  # a completion: next to its cue
        head, rest = new[:skip], new[skip:]
        # a pending block rides in the first chunk of head + rest (recall.FUSED_BLOCK; prompt logprobs never extend,
        # so no logit row of that chunk is read)
        query = new if recall.query_in_head or skip != recall.skip else None
        then = rest if skip != recall.skip or recall.head_is_text else ()
        recalled = recall_before(engine, rest, piece, recall.wrap, head, recall.around, query, then)
        return recalled, (rest if recalled.decoded else new)
    scorer, budget = engine.scorer, engine.kv_budget
    if (
        not RECALL_INSIDE_PROMPT
        or recall.wrap is not None  # a chat prompt: its block needs the template's wrap; not measured inside one
        or every_logit
        or scorer is None
        or budget is None
        or scorer.live_cells() + len(new) <= budget  # nothing will be evicted
    ):
        return Recalled(), new
    cut = placement.last_sentence_start(new, piece)
    if cut == 0:
        return Recalled(), new
    head, rest = new[:cut], new[cut:]
    engine.decode(head, logits_last=False, progress=progress, then=rest)
    return recall_before(engine, rest, piece, query=new), rest
