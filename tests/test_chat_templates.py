"""Chat templates that render a past answer unlike the prompt it was generated after (thinking models), and ones
that want user and assistant to alternate: a turn still goes on from the cache (generation/chat.py)."""

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.generation.chat import ChatFormatter, ChatTurn, text_after_answer
from pymorph_edge.generation.recall_placement import RECALLED_PREFIX

# DeepSeek-R1's shape in short: the generation prompt opens a reasoning block; a past answer is shown without it
THINKING = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% else %}<|Assistant|>{{ m['content'].split('</think>')[-1] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)
# a template that rewrites what came before the answer when more messages follow: no continuation is safe
REWRITES_EARLIER = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<u>{{ m['content'] if loop.last else m['content'] | upper }}"
    "{% else %}<a>{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)
TAIL = [{"role": "user", "content": "My PIN is 12345."}, {"role": "assistant", "content": "<think>ok</think>Noted!"}]
NEW = [{"role": "user", "content": "What was my PIN?"}]


def test_a_thinking_template_continues_after_the_answer_as_generated():
    fmt = ChatFormatter(THINKING, "<s>", "</s>")
    turn = ChatTurn(2, "", TAIL, [], "")
    assert text_after_answer(turn, NEW, fmt) == "<|end|><|User|>What was my PIN?<|Assistant|><think>\n"
    plain = ChatTurn(2, "", [TAIL[0], {"role": "assistant", "content": "Noted!"}], [], "")
    assert text_after_answer(plain, NEW, fmt) == "<|end|><|User|>What was my PIN?<|Assistant|><think>\n"


def test_a_template_that_rewrites_earlier_messages_is_not_continued():
    fmt = ChatFormatter(REWRITES_EARLIER, "<s>", "</s>")
    turn = ChatTurn(2, "", [TAIL[0], {"role": "assistant", "content": "Noted!"}], [], "")
    before, _, _ = fmt.prompt(turn.tail[:-1])
    after, _, _ = fmt.prompt([*turn.tail, *NEW])
    assert "MY PIN" in after and "MY PIN" not in before  # the earlier message did change
    assert text_after_answer(turn, NEW, fmt) is None


def test_a_thinking_model_chat_decodes_only_the_new_messages_each_turn(gqa_model):
    """Before, each turn after the first rendered the previous answer without "<think>\\n", matched the cache only
    up to there, and once that point was evicted decoded the whole conversation again (cached 0 tokens)."""
    with Llama(gqa_model, kv_budget=96, chat_template=THINKING, config=EngineConfig(n_ubatch=32)) as llm:
        ban = {llm.token_eos(): -1e9, 3: -1e9}
        msgs = [{"role": "user", "content": "My PIN is 12345. Tell me a story."}]
        prompts = []
        for i in range(3):
            r = llm.create_chat_completion(msgs, max_tokens=80, temperature=0, logit_bias=ban)
            t = llm.last_timings
            prompts.append((t.prompt_tokens, t.cached_tokens))
            msgs += [r["choices"][0]["message"], {"role": "user", "content": f"Go on, part {i + 2}."}]
        assert llm.stats.tokens_evicted > 80
        for (p_before, _), (p, cached) in zip(prompts, prompts[1:], strict=False):
            assert cached >= p_before + 70 and p - cached < 80  # the last answer and all before it were reused
        cont = llm.continue_chat([{"role": "user", "content": "And then?"}], max_tokens=4, temperature=0)
        assert cont["choices"][0]["finish_reason"] == "length"


def test_a_builtin_template_says_where_restored_ids_go(gqa_model):
    """With saved KV (recall_kv_bytes) the wrap's own tokens are decoded around restored ids, found by rendering a
    marker where they go. llama.cpp's built-in templates (Gemma 3's GGUF has no Jinja one) take C strings, which
    ended at the old NUL marker, so nothing was restored there."""
    from pymorph_edge.generation.chat import text_after_answer as after

    with Llama(gqa_model, kv_budget=96, chat_template="gemma", config=EngineConfig(n_ubatch=32)) as llm:
        llm.create_chat_completion([{"role": "user", "content": "My PIN is 12345."}], max_tokens=4, temperature=0)
        turn = llm._continuable_turn()
        assert turn is not None
        suffix = after(turn, NEW, llm._formatter())
        head, tail = llm._chat_recall(turn, NEW, suffix).around()
        text = llm.detokenize(head).decode().replace("\u2581", " ")  # the synthetic vocabulary spells spaces so
        assert text.endswith(RECALLED_PREFIX.rstrip()) and "<start_of_turn>user" in text


def test_the_block_opens_the_new_user_message_and_falls_back_to_a_message_of_its_own(monkeypatch):
    """The block opens the new user message (shape 1, the shortest): its header is decoded first (skip), then the
    block, then the user's own words. A template that refuses two user messages in a row still takes it that way,
    and no assistant turn is invented (Gemma 3 base copied one). With PREFER_INLINE off (recall_bench's "+own"),
    or new text that does not open with a user message, ChatML takes a message of its own."""
    from test_recall import ALTERNATING

    from pymorph_edge.generation import recall_placement
    from pymorph_edge.generation.recall_placement import chat_placement

    chars = lambda text: [ord(c) for c in text]  # noqa: E731  a tokenizer of one token per character
    text_of = lambda ids: "".join(map(chr, ids))  # noqa: E731
    plain = [{"role": "user", "content": "My PIN is 12345."}, {"role": "assistant", "content": "Noted!"}]
    turn = ChatTurn(2, "", plain, [], "")
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tool_first = [{"role": "tool", "content": "42"}, *NEW]
    cases = [(ALTERNATING, NEW, True, True), (chatml, NEW, True, True), (chatml, NEW, False, False)]
    for template, new, prefer, inline in [*cases, (chatml, tool_first, True, False)]:
        monkeypatch.setattr(recall_placement, "PREFER_INLINE", prefer)
        fmt = ChatFormatter(template, "<s>", "</s>")
        suffix = text_after_answer(turn, new, fmt)
        place = chat_placement(turn, new, suffix, fmt, chars, text_of)
        block = text_of(place.wrap(chars(" My PIN is 12345.")))
        assert block.startswith(RECALLED_PREFIX) == inline and "My PIN is 12345." in block and "Noted." not in block
        if inline:  # the header is the new text's start; the block and then the rest of the new text follow
            assert suffix[: place.skip].endswith("user\n") and block.endswith("\n\n")
            head, tail = place.around()
            assert text_of(head) == RECALLED_PREFIX.rstrip() and text_of(tail) == "\n\n"
        else:  # a message of its own, before the new one
            assert place.skip == 0 and block.startswith("<|im_end|>\n<|im_start|>user\n" + RECALLED_PREFIX)


def test_the_block_can_follow_the_users_own_words(monkeypatch):
    """BLOCK_AFTER_WORDS (recall_bench's "+after"): the skipped head is the header and the user's words, the block
    is the gap and the recalled text, and the rest of the new text (the message's end) follows. The words are then
    in the head, so the placement says the head belongs to the query."""
    from pymorph_edge.generation import recall_placement
    from pymorph_edge.generation.recall_placement import INLINE_GAP, chat_placement

    chars = lambda text: [ord(c) for c in text]  # noqa: E731
    text_of = lambda ids: "".join(map(chr, ids))  # noqa: E731
    turn = ChatTurn(
        2, "", [{"role": "user", "content": "My PIN is 12345."}, {"role": "assistant", "content": "Ok"}], [], ""
    )
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fmt = ChatFormatter(chatml, "<s>", "</s>")
    suffix = text_after_answer(turn, NEW, fmt)
    for after in (False, True):
        monkeypatch.setattr(recall_placement, "BLOCK_AFTER_WORDS", after)
        place = chat_placement(turn, NEW, suffix, fmt, chars, text_of)
        block = text_of(place.wrap(chars(" My PIN is 12345.")))
        head, rest = suffix[: place.skip], suffix[place.skip :]
        assert place.query_in_head == after
        if after:
            assert head.endswith("user\nWhat was my PIN?") and rest.startswith("<|im_end|>")
            assert block == INLINE_GAP + RECALLED_PREFIX + "My PIN is 12345."
        else:
            assert head.endswith("user\n") and rest.startswith("What was my PIN?")
            assert block == RECALLED_PREFIX + "My PIN is 12345." + INLINE_GAP
        recalled, words = RECALLED_PREFIX + "My PIN is 12345.", "What was my PIN?"
        joined = words + INLINE_GAP + recalled if after else recalled + INLINE_GAP + words
        assert head + block + rest == text_after_answer(turn, [{"role": "user", "content": joined}], fmt)


def test_every_builtin_template_places_a_recalled_block():
    """Each of llama.cpp's built-in templates renders recalled text somewhere well formed, and all but a few take
    it inside the new user message (the short shape). At stop 34, with a one-token-per-character tokenizer: 53 of
    54 inside, 1 as a message of its own."""
    from pymorph_edge.generation.chat import builtin_templates
    from pymorph_edge.generation.recall_placement import RECALLED_ACK, chat_placement

    chars = lambda text: [ord(c) for c in text]  # noqa: E731
    text_of = lambda ids: "".join(map(chr, ids))  # noqa: E731
    turn = ChatTurn(
        2, "", [{"role": "user", "content": "My PIN is 12345."}, {"role": "assistant", "content": "Ok"}], [], ""
    )
    inside = 0
    names = builtin_templates()
    for name in names:
        fmt = ChatFormatter(name, "<s>", "</s>")
        suffix = text_after_answer(turn, NEW, fmt)
        place = chat_placement(turn, NEW, suffix, fmt, chars, text_of)
        block = place.wrap(chars(" My PIN is 12345."))
        assert block is not None and "My PIN is 12345." in text_of(block), name
        assert RECALLED_ACK not in text_of(block), name  # the last resort is never needed here
        inside += place.skip > 0
    assert len(names) > 40 and inside >= len(names) - 3


def test_a_long_message_takes_the_block_just_before_its_last_sentence(monkeypatch):
    """A user message longer than NEXT_TO_CUE_TOKENS (a pasted text, then the question) takes the block between its
    last two sentences, so the fact sits next to the question; the head then holds the message's own text, so it is
    the query and is chunked as the request's. The cut must fall on a token boundary: after the blank line or space
    that ends the sentence before, else (a tokenizer whose words carry their leading space) right after its
    punctuation, with a blank line on each side. A short message, or NEXT_TO_CUE_TOKENS = 0, keeps the block at its
    start. The rendered turn is always the message with the block written into it."""
    import re

    from pymorph_edge.generation import recall_placement
    from pymorph_edge.generation.recall_placement import INLINE_GAP, chat_placement

    chars = lambda text: [ord(c) for c in text]  # noqa: E731
    vocab: dict[str, int] = {}
    spelled: dict[int, str] = {}

    def words(text: str) -> list[int]:  # GPT-2-like: a word's token carries the space before it
        out = []
        for piece in re.findall(r" ?[^\s]+|\s", text):
            out.append(vocab.setdefault(piece, len(vocab) + 1))
            spelled[out[-1]] = piece
        return out

    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fmt = ChatFormatter(chatml, "<s>", "</s>")
    turn = ChatTurn(
        2, "", [{"role": "user", "content": "My PIN is 12345."}, {"role": "assistant", "content": "Ok"}], [], ""
    )
    fact = RECALLED_PREFIX + "My PIN is 12345."
    paste = "Here are my notes. " + "The sky was grey and the sea was calm. " * 3
    cases = [  # (message, tokenizer, cue tokens, the head's end, the block, the rest's start)
        (paste + "What was my PIN?", chars, 32, "calm. ", fact + INLINE_GAP, "What was my PIN?"),
        (paste.rstrip() + "\n\nWhat was my PIN?", chars, 32, "calm.\n\n", fact + INLINE_GAP, "What was my PIN?"),
        (paste + "What was my PIN?", words, 8, "calm.", INLINE_GAP + fact + INLINE_GAP, " What was my PIN?"),
        (paste + "What was my PIN?", chars, 0, "user\n", fact + INLINE_GAP, "Here are"),
        ("Hi again. What was my PIN?", chars, 32, "user\n", fact + INLINE_GAP, "Hi again."),
    ]
    for message, tok, cue_tokens, head_end, want, rest_start in cases:
        monkeypatch.setattr(recall_placement, "NEXT_TO_CUE_TOKENS", cue_tokens)
        text_of = (
            (lambda ids: "".join(map(chr, ids))) if tok is chars else (lambda ids: "".join(spelled[i] for i in ids))
        )
        new = [{"role": "user", "content": message}]
        suffix = text_after_answer(turn, new, fmt)
        place = chat_placement(turn, new, suffix, fmt, tok, text_of)
        head, rest = text_of(tok(suffix)[: place.skip]), text_of(tok(suffix)[place.skip :])
        block = text_of(place.wrap(tok(" My PIN is 12345.")))
        assert head.endswith(head_end) and block == want and rest.startswith(rest_start), (message, cue_tokens)
        assert place.head_is_text == place.query_in_head == (head_end not in ("user\n",))
        joined = message.replace(rest_start, want + rest_start, 1) if head_end != "user\n" else want + message
        assert head + block + rest == text_after_answer(turn, [{"role": "user", "content": joined}], fmt)
