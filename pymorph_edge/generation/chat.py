"""Chat: messages -> prompt text, and continuing a conversation on the compressed cache.

The GGUF's own Jinja template is used when it has one. Base models often ship without one
(the default Gemma 3 270M does), so their architecture's llama.cpp built-in template is used
instead, and any built-in name (e.g. "chatml", "gemma", "llama3") can be asked for explicitly.

Re-tokenizing a rendered conversation rarely reproduces the tokens the model generated, so a token
comparison alone would miss most continuations. Instead the last turn is remembered at message
level: when a request's messages extend it, only the tokens of the template text that follows the
previous answer are decoded, on top of the cache. The turn is remembered as a hash of its messages
plus the last exchange, so a conversation of any length costs the same to keep and to save.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as C
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

logger = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant", "developer", "tool"}
# architectures whose instruction-tuned releases use a llama.cpp built-in template
ARCH_BUILTIN = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "llama": "llama3",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "phi3": "phi3",
    "mistral": "mistral-v7",
}


# keys of an OpenAI / llama_cpp message kept for the template besides role and content
MESSAGE_EXTRAS = ("name", "tool_calls", "tool_call_id", "function_call")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Raise ValueError naming the first malformed message. content is a string, a list of content parts
    ({"type": "text", "text": ...}), or None beside tool_calls (an assistant's tool call), as in llama_cpp."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}")
        if content is None and not (m.get("tool_calls") or m.get("function_call")):
            raise ValueError(f"messages[{i}].content must be a string (None only beside tool_calls), got None")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list) or not all(isinstance(p, dict) and "type" in p for p in content):
                raise ValueError(
                    f"messages[{i}].content must be a string or a list of content parts, got {type(content).__name__}"
                )
        msg = {"role": role, "content": content}
        msg.update({k: m[k] for k in MESSAGE_EXTRAS if m.get(k) is not None})
        out.append(msg)
    return out


def content_text(content: Any) -> str:
    """A message's text: a list of content parts becomes its text parts joined; None becomes ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def builtin_templates() -> list[str]:
    n = C.llama_chat_builtin_templates(None, 0)
    arr = (ctypes.c_char_p * n)()
    C.llama_chat_builtin_templates(arr, n)
    return [a.decode() for a in arr]


class ChatFormatter:
    """template: Jinja text, or the name of a llama.cpp built-in template."""

    def __init__(self, template: str, bos_token: str, eos_token: str) -> None:
        self.builtin = template if template in builtin_templates() else None
        self._jinja = (
            None if self.builtin else Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)
        )

    @classmethod
    def for_model(cls, gguf_template: str | None, arch: str, bos: str, eos: str) -> ChatFormatter:
        if gguf_template:
            return cls(gguf_template, bos, eos)
        if arch in ARCH_BUILTIN:
            logger.info("the GGUF has no chat template; using llama.cpp's built-in %r for %s", ARCH_BUILTIN[arch], arch)
            return cls(ARCH_BUILTIN[arch], bos, eos)
        raise ValueError(
            f"the model (architecture {arch!r}) has no chat template; pass chat_template= with Jinja text "
            f"or one of llama.cpp's built-in names: {', '.join(builtin_templates())}"
        )

    def prompt(self, messages: Sequence[dict[str, Any]], **template_kw: Any) -> tuple[str, list[str], bool]:
        """Return (prompt text, extra stop strings, whether the text already carries BOS). template_kw (tools,
        tool_choice) reach a Jinja template, as in llama_cpp; a built-in template has no use for them."""
        template_kw = {k: v for k, v in template_kw.items() if v is not None}
        if self._jinja is not None:
            # many templates concatenate content as text: an assistant's tool call (content None) renders as ""
            msgs = [m if m.get("content") is not None else {**m, "content": ""} for m in messages]
            try:
                r = self._jinja(messages=msgs, **template_kw)
            except Exception as exc:  # jinja2 raises many kinds; the messages are what the caller can fix
                raise ValueError(
                    f"the chat template could not render these messages: {type(exc).__name__}: {exc}"
                ) from None
            stop = r.stop if isinstance(r.stop, list) else ([r.stop] if r.stop else [])
            return r.prompt, stop, bool(r.added_special)
        if template_kw:
            raise ValueError(
                f"llama.cpp's built-in {self.builtin!r} template cannot show {sorted(template_kw)} to the model; "
                "pass chat_template= with a Jinja template that renders them"
            )
        keep = [(m["role"].encode(), content_text(m["content"]).encode()) for m in messages]
        arr = (C.llama_chat_message * len(keep))(*[C.llama_chat_message(r, c) for r, c in keep])
        cap = 2 * sum(len(r) + len(c) for r, c in keep) + 256
        buf = ctypes.create_string_buffer(cap)
        n = C.llama_chat_apply_template(self.builtin.encode(), arr, len(keep), True, buf, cap)
        if n > cap:
            buf = ctypes.create_string_buffer(n)
            n = C.llama_chat_apply_template(self.builtin.encode(), arr, len(keep), True, buf, n)
        if n < 0:
            raise ValueError(f"llama.cpp's {self.builtin!r} template rejected the messages")
        return buf.raw[:n].decode("utf-8", errors="replace"), [], False


def _chain(digest: str, messages: Sequence[dict[str, Any]]) -> str:
    d = bytes.fromhex(digest)
    for m in messages:
        d = hashlib.blake2b(d + json.dumps([m["role"], m["content"]]).encode(), digest_size=16).digest()
    return d.hex()


EMPTY_DIGEST = bytes(16).hex()


def messages_digest(messages: Sequence[dict[str, Any]]) -> str:
    """A chained hash of the messages: equal digests mean the same conversation (to 128 bits)."""
    return _chain(EMPTY_DIGEST, messages)


@dataclass
class ChatTurn:
    """The conversation the cache holds, in a size that does not grow with it: a hash of its messages,
    the last request's messages with the answer (enough to render what follows the answer), and the
    answer tokens not yet decoded. `fingerprint` is the token history's when the turn ended, so a turn
    is only continued on the very cache it describes."""

    n_messages: int  # messages, the answer included
    digest: str  # messages_digest of them
    tail: list[dict[str, Any]]  # the messages after the previous answer, then this answer
    pending: list[int]  # answer tokens sampled but not yet decoded (the last one, when the length ran out)
    fingerprint: str  # TokenHistory.fingerprint().hex() at the end of the turn
    conversation_id: str = ""  # stable over the turns: a hash of the messages before the first answer

    @classmethod
    def after_answer(
        cls,
        digest_before: str,
        n_before: int,
        own: list[dict[str, Any]],
        answer: str,
        pending: list[int],
        fingerprint: bytes,
        conversation_id: str | None = None,
    ) -> ChatTurn:
        """The turn once `answer` followed n_before messages (hashed to digest_before) and this request's own.
        conversation_id: the continued turn's; None starts a conversation, named after its messages so far."""
        reply = {"role": "assistant", "content": answer}
        before_answer = _chain(digest_before, own)
        return cls(
            n_messages=n_before + len(own) + 1,
            digest=_chain(before_answer, [reply]),
            tail=[*own, reply],
            pending=list(pending),
            fingerprint=fingerprint.hex(),
            conversation_id=conversation_id if conversation_id is not None else before_answer[:16],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "n_messages": self.n_messages,
            "digest": self.digest,
            "tail": self.tail,
            "pending": self.pending,
            "fingerprint": self.fingerprint,
            "conversation_id": self.conversation_id,
        }

    @classmethod
    def from_json(cls, d: Any) -> ChatTurn:
        """ValueError when d is not a ChatTurn.to_json()."""
        try:
            turn = cls(
                n_messages=int(d["n_messages"]),
                digest=str(d["digest"]),
                tail=validate_messages(d["tail"]),
                pending=[int(t) for t in d["pending"]],
                fingerprint=str(d["fingerprint"]),
                conversation_id=str(d.get("conversation_id", "")),
            )
            bytes.fromhex(turn.digest), bytes.fromhex(turn.fingerprint)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed chat turn: {exc}") from None
        if turn.n_messages < len(turn.tail) or not turn.tail or turn.tail[-1]["role"] != "assistant":
            raise ValueError("malformed chat turn: it does not end with an answer")
        return turn


def extends(turn: ChatTurn, messages: Sequence[dict[str, Any]]) -> bool:
    """Whether messages are turn's conversation followed by at least one new message."""
    return len(messages) > turn.n_messages and messages_digest(messages[: turn.n_messages]) == turn.digest


def text_after_answer(turn: ChatTurn, new: Sequence[dict[str, Any]], formatter: ChatFormatter) -> str | None:
    """The template text that follows turn's answer when `new` messages come next, rendered from the turn's
    tail alone (the text after an answer depends on the messages around it, not on the whole history).
    None when the template renders the tail's answer neither as a prefix of the continuation nor, near where the
    prompt it was generated after ends, as text of its own (_after_rerendered_answer)."""
    prompt_before_answer, _, _ = formatter.prompt(turn.tail[:-1])
    continued, _, _ = formatter.prompt(list(turn.tail) + list(new))
    answer = turn.tail[-1]["content"]
    # templates often trim the answer; the cache keeps the whitespace the model produced, which is harmless
    for variant in (answer, answer.rstrip(), answer.strip()):
        rendered = prompt_before_answer + variant
        if continued.startswith(rendered):
            return continued[len(rendered) :]
    last = turn.tail[-2]["content"] if len(turn.tail) > 1 else None
    return _after_rerendered_answer(prompt_before_answer, continued, answer, content_text(last) if last else "")


# Characters a template may add or drop where the generation prompt and the answer meet when it renders a past answer
REWRITE_SLACK = 64


def _after_rerendered_answer(before: str, continued: str, answer: str, last: str) -> str | None:
    """What follows the answer when the template renders a past answer unlike the prompt it was generated after.
    Thinking models' generation prompts open a reasoning block ("<think>\n") that later turns leave out, and their
    templates drop the reasoning from past answers (DeepSeek-R1 distills, Qwen 3.5, Gemma 4: about half of
    llama.cpp's bundled templates). Re-decoding the answer as rendered is what an unbounded cache would do, but a
    bounded cache may have evicted its start, and then the whole conversation is decoded again every turn. So the
    turn goes on from the answer as the model generated it: the cache keeps the opening the template would drop,
    and only the text after the answer is new. Accepted only when the rendering departs from the prompt after the
    last message before the answer (`last`, its text) and within REWRITE_SLACK characters of the prompt's end,
    and the answer's text follows right there."""
    p = 0
    while p < min(len(before), len(continued)) and before[p] == continued[p]:
        p += 1
    if len(before) - p > REWRITE_SLACK or (last and last.strip() not in before[:p]):
        return None  # the template changed the conversation before the answer, not only where the answer begins
    for shown in (answer.strip(), answer.rsplit("</think>", 1)[-1].strip()):
        at = continued.find(shown, p) if shown else -1
        if 0 <= at - p <= REWRITE_SLACK:
            return continued[at + len(shown) :]
    return None
