"""Several conversations on one model: the compressed states of the ones not in the cache right now.

One llama.cpp context holds one conversation. When a chat request continues another one that the
server kept, the current conversation is stashed (Llama.save_state: the live cells and the scorer's
state, a size set by the budget) and the requested one put back, so only its new messages are
decoded. Least-recently-used states beyond `max_sessions` are dropped, or written to `session_dir`
and read back from there when their conversation returns. Runs on the model thread only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pymorph_edge.generation.chat import extends, messages_digest, validate_messages
from pymorph_edge.llama import Llama
from pymorph_edge.sessions import session_file
from pymorph_edge.sessions.session_file import SavedConversation

logger = logging.getLogger(__name__)


class ConversationStore:
    """max_sessions: conversations kept, the one in the cache included (1: keep only that one)."""

    def __init__(self, llm: Llama, max_sessions: int, session_dir: str | Path | None = None) -> None:
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be a positive int, got {max_sessions!r}")
        self.llm, self.max_sessions = llm, max_sessions
        self.session_dir = Path(session_dir) if session_dir is not None else None
        self._kept: OrderedDict[str, SavedConversation] = OrderedDict()  # by conversation id, oldest first
        self._on_disk: dict[str, tuple[int, str]] = {}  # id -> (n_messages, digest) of files in session_dir
        if self.session_dir is not None:
            self.session_dir.mkdir(parents=True, exist_ok=True)
            for f in self.session_dir.glob("*.session"):
                try:
                    turn = session_file.read(f).turn
                except ValueError as exc:
                    logger.warning("ignoring %s: %s", f, exc)
                    continue
                if turn is not None:
                    self._on_disk[turn.conversation_id] = (turn.n_messages, turn.digest)

    @property
    def kept(self) -> int:
        """Conversations kept in memory, the one in the cache included."""
        return len(self._kept) + (1 if self.llm.has_conversation else 0)

    @property
    def on_disk(self) -> int:
        return len(self._on_disk)

    def bytes_kept(self) -> int:
        return sum(c.nbytes for c in self._kept.values())

    def activate(self, messages: Any) -> str:
        """Before a chat request: put the conversation it continues into the cache. Returns where it came
        from: "cache" (already there), "memory" or "disk" (switched to), or "new"."""
        try:
            msgs = validate_messages(messages)
        except ValueError:
            return "new"  # create_chat_completion will refuse them with the precise error
        turn = self.llm._continuable_turn()
        if turn is not None and extends(turn, msgs):
            return "cache"
        found, source = None, "new"
        for cid, conv in self._kept.items():
            if conv.turn is not None and extends(conv.turn, msgs):
                found, source = self._kept.pop(cid), "memory"
                break
        if found is None:
            for cid, (n, digest) in self._on_disk.items():
                if len(msgs) > n and extends_digest(msgs, n, digest):
                    try:
                        found, source = self._read(cid), "disk"
                    except (OSError, ValueError) as exc:
                        logger.warning("could not read kept conversation %s: %s", cid, exc)
                    break
        self.stash_live()
        if found is not None:
            try:
                self.llm.load_state(found)
            except ValueError as exc:  # a session_dir written by another model or setup
                logger.warning("could not resume a kept conversation, starting afresh: %s", exc)
                return "new"
        return source

    def stash_live(self) -> None:
        """Keep the conversation in the cache before something else replaces it."""
        turn = self.llm._continuable_turn()
        if turn is None or (self.max_sessions == 1 and self.session_dir is None):
            return
        self._kept[turn.conversation_id] = self.llm.save_state()
        self._kept.move_to_end(turn.conversation_id)
        while len(self._kept) > self.max_sessions - 1:
            cid, conv = self._kept.popitem(last=False)
            if self.session_dir is not None and conv.turn is not None:
                session_file.write(self._path(cid), conv)
                self._on_disk[cid] = (conv.turn.n_messages, conv.turn.digest)
            else:
                logger.info("dropped conversation %s (least recently used)", cid)

    def _path(self, cid: str) -> Path:
        assert self.session_dir is not None
        return self.session_dir / f"{cid}.session"

    def _read(self, cid: str) -> SavedConversation:
        del self._on_disk[cid]
        path = self._path(cid)
        conv = session_file.read(path)
        path.unlink(missing_ok=True)
        return conv


def extends_digest(msgs: list[dict[str, Any]], n: int, digest: str) -> bool:
    return messages_digest(msgs[:n]) == digest
