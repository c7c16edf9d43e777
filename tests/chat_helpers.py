"""A chat the recall tests share: a locker number in the first message, then two 250-token stories."""

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FIRST = "Hi, I'm Tom from Oslo. My locker number is 90517. Write me a long story about a dragon."


def locker_number_then_two_stories(llm) -> list[dict]:
    """The conversation so far (the question not yet asked), with both stories generated greedily."""
    msgs = [SYSTEM, {"role": "user", "content": FIRST}]
    for topic in ("a pirate ship", None):
        r = llm.create_chat_completion(msgs, max_tokens=250, temperature=0.0)
        msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
        if topic:
            msgs.append({"role": "user", "content": f"Thanks! Now write another long story, about {topic}."})
    return msgs


def recalled_text(llm):
    """The logged text of every span brought back so far (the synthetic vocabulary spells spaces as U+2581)."""
    eng = llm.engine
    spans = [(sp[0], sp[1]) for b in eng.recall_state.blocks for sp in b[2]]
    # errors="replace": a span of a block recalled inside a request may open on a byte token mid-character
    return [llm.detokenize(eng.log.tokens(lo, hi)).decode(errors="replace").replace("\u2581", " ") for lo, hi in spans]
