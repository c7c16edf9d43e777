"""Chat: messages -> prompt text, and continuing a conversation on the compressed cache.

The GGUF's own Jinja template is used when it has one. Base models often ship without one
(the default Gemma 3 270M does), so their architecture's llama.cpp built-in template is used
instead, and any built-in name (e.g. "chatml", "gemma", "llama3") can be asked for explicitly.

Re-tokenizing a rendered conversation rarely reproduces the tokens the model generated, so a token
comparison alone would miss most continuations. Instead the last turn is remembered at message
level: when a request's messages extend it, the new prompt is the exact token history plus the
tokens of the template text that follows the previous answer.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence
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


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Raise ValueError naming the first malformed message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


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

    def prompt(self, messages: Sequence[dict[str, Any]]) -> tuple[str, list[str], bool]:
        """Return (prompt text, extra stop strings, whether the text already carries BOS)."""
        if self._jinja is not None:
            r = self._jinja(messages=list(messages))
            stop = r.stop if isinstance(r.stop, list) else ([r.stop] if r.stop else [])
            return r.prompt, stop, bool(r.added_special)
        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
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


@dataclass
class ChatTurn:
    messages: list[dict[str, Any]]  # the conversation including the answer we returned
    prompt: str  # template text before the answer
    answer: str  # the answer text we returned
    tokens: list[int]  # prompt and answer tokens exactly as the model saw (or sampled) them


def continuation_tokens(
    turn: ChatTurn | None,
    messages: Sequence[dict[str, Any]],
    prompt_text: str,
    tokenize_suffix: Callable[[str], list[int]],
) -> list[int] | None:
    """Tokens for `messages` that extend `turn` exactly, or None when they do not extend it."""
    if turn is None or len(messages) <= len(turn.messages):
        return None
    if list(messages[: len(turn.messages)]) != turn.messages:
        return None
    # templates often trim the answer; the cache keeps the whitespace the model produced, which is harmless
    for answer in (turn.answer, turn.answer.rstrip(), turn.answer.strip()):
        rendered = turn.prompt + answer
        if prompt_text.startswith(rendered):
            return turn.tokens + tokenize_suffix(prompt_text[len(rendered) :])
    return None
