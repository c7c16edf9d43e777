"""A question that says how many digits the number has ("which 5-digit number did I give you?"): the count is not
a word to match, and a sentence whose numbers are all shorter cannot hold the answer (recall_select.asked_digits,
has_digits)."""

from chat_helpers import recalled_text
from test_recall import FILLER

from pymorph_edge import EngineConfig, Llama
from pymorph_edge.engine.recall_select import NUMERAL, Span, asked_digits, has_digits, query_words, span_words


def span(text: str) -> Span:
    ws = text.lower().replace(".", " ").replace(":", " ").split()
    return Span(0, len(ws), span_words(ws), tuple(ws))


def test_a_count_of_digits_is_read_and_is_not_a_query_word():
    assert asked_digits("Quick question: which 5-digit number did I give you earlier?") == {5}
    assert asked_digits("What are the last four digits of my card?") == {4}
    assert asked_digits("A 6 digit code, please") == {6}
    assert asked_digits("What is my locker number?") == set()
    assert asked_digits("What digits does my passport end with?") == set()
    ws = query_words("which 5-digit number did I give you earlier?")
    assert "5" not in ws and "digits" in ws and NUMERAL in ws
    assert "48213" in query_words("Is 48213 my locker number?")  # a number that is not a count stays a word


def test_only_a_sentence_with_enough_digits_holds_a_number_asked_for_by_its_length():
    assert not has_digits(span("Here is part 5 of my notes:"), {5})
    assert has_digits(span("My customer ID is 22004."), {5})
    assert has_digits(span("My card number is 4111222233334444."), {4})  # "the last 4 digits" of a longer one
    assert has_digits(span("Here is part 5 of my notes:"), set())  # no count asked: no test


def test_a_chat_past_notes_numbered_like_the_count_recalls_the_number(gqa_model):
    """Numbered notes pasted later share the count's numeral ("part 5") and, as numerals, the question's NUMERAL.
    SmolLM2 past n_ctx_train got "Here is part 5 of my notes:" back instead of the ID (stop 45)."""
    notes = "".join(f"Here is part {k} of my notes: {FILLER}" for k in range(1, 7))
    with Llama(gqa_model, kv_budget=128, recall=True, config=EngineConfig(n_ubatch=64)) as llm:
        text = "My customer ID is 22004. " + FILLER + notes
        llm.create_completion(text, max_tokens=1, temperature=0.0)
        llm.create_completion(
            text + " Quick question: which 5-digit number did I give you earlier?", max_tokens=1, temperature=0.0
        )
        got = recalled_text(llm)
        assert any("22004" in t for t in got), got
        assert not any("part 5" in t for t in got), got
