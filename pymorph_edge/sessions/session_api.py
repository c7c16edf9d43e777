"""The sessions half of `Llama`: save and restore the conversation in memory or in a file. A mixin, so `Llama`
stays a short facade. A saved conversation's size is set by the budget, not by the conversation's length."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pymorph_edge.engine import engine_snapshot
from pymorph_edge.sessions import session_file
from pymorph_edge.sessions.session_file import SavedConversation


class SessionMixin:
    # provided by Llama
    _engine: Any
    _model: Any
    _last_turn: Any
    _session_identity: dict[str, Any] | None
    policy: Any
    kv_budget: int | None

    def _identity(self) -> dict[str, Any]:
        if self._session_identity is None:
            m = self._model
            self._session_identity = {
                "model": session_file.model_identity(
                    m.path, m.meta("general.architecture") or "", m.info.n_layer, m.info.n_vocab
                ),
                "policy": session_file.policy_identity(self.policy),
                "kv_budget": self.kv_budget,
                "n_ctx": self._engine.n_ctx,
                "n_ubatch": self._engine.config.n_ubatch,
                # llama.cpp's state holds K/V in the cache's types, V transposed unless flash attention is on
                "kv_cache": {
                    "type_k": self._engine.config.type_k,
                    "type_v": self._engine.config.type_v,
                    "flash_attn": self._engine.flash_attn,
                },
            }
        return self._session_identity

    def save_state(self) -> SavedConversation:
        """The conversation in memory: the cache's sequence, the scorer's state and the chat turn. Its size
        is set by the budget (llama.cpp writes only live cells), not by the conversation's length."""
        return SavedConversation(self._identity(), engine_snapshot.capture(self._engine), self._last_turn)

    def load_state(self, state: SavedConversation) -> None:
        """Put back a save_state(). ValueError, with the running state untouched, when it was saved with
        another model, policy or budget, or cannot be restored."""
        if not isinstance(state, SavedConversation):
            raise ValueError(f"load_state takes what save_state returned, got {type(state).__name__}")
        why = session_file.mismatch(state.identity, self._identity())
        if why is not None:
            raise ValueError(f"cannot load this conversation: {why}")
        engine_snapshot.restore(self._engine, state.snapshot)
        self._last_turn = state.turn

    def save_session(self, path: str | Path) -> int:
        """Write the conversation to path atomically (temp file + rename); returns the file's size in bytes."""
        return session_file.write(path, self.save_state())

    def load_session(self, path: str | Path) -> None:
        """Resume a save_session() file: the next chat turn (continue_chat or create_chat_completion with the
        whole conversation) decodes only its own tokens. FileNotFoundError, or ValueError naming the problem
        (another model, policy or budget; a damaged or truncated file), with the running state untouched."""
        conv = session_file.read(path)
        why = session_file.mismatch(conv.identity, self._identity())
        if why is not None:
            raise ValueError(f"cannot load session {str(path)!r}: {why}")
        self.load_state(conv)
