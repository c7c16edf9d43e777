"""The model-file half of `Llama`'s API (llama_cpp.Llama's names and signatures): tokens, vocabulary, metadata.
A mixin, so `Llama` stays a short facade; it needs only `self._model` (a LoadedModel)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp.llama_cpp as C

from pymorph_edge.model.model_file import LoadedModel


class TokenizerMixin:
    _model: LoadedModel
    _piece_cache: dict[int, str]
    _metadata: dict[str, str] | None = None

    def n_vocab(self) -> int:
        """Tokens in the vocabulary (a method, as in llama_cpp)."""
        return self._model.info.n_vocab

    def n_embd(self) -> int:
        """Width of the model's hidden state: the length of a pooled embedding."""
        return self._model.info.n_embd

    @property
    def n_ctx_train(self) -> int:
        """Context length the model was trained on (positions the cache may span before compaction matters)."""
        return self._model.info.n_ctx_train

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF's metadata, every value as text (llama_cpp.Llama.metadata)."""
        if self._metadata is None:
            self._metadata = self._model.metadata()
        return self._metadata

    def token_eos(self) -> int:
        return int(C.llama_vocab_eos(self._model.vocab))

    def token_bos(self) -> int:
        return int(C.llama_vocab_bos(self._model.vocab))

    def token_nl(self) -> int:
        return int(C.llama_vocab_nl(self._model.vocab))

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        add_bos = add_bos and bool(C.llama_vocab_get_add_bos(self._model.vocab))
        cap = len(data) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self._model.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self._model.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize failed ({n}) on {len(data)} bytes")
        return list(buf[:n])

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._model.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._model.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def _piece_text(self, token: int) -> str:
        """A token's text, memoised: recall reads the text of every evicted token at each request."""
        text = self._piece_cache.get(token)
        if text is None:
            text = self._piece_cache[token] = self._piece(token).decode("utf-8", "replace")
        return text

    def _lp_piece(self, token: int) -> str:
        """A token's text as llama_cpp's logprobs show it (undecodable bytes dropped)."""
        return self._piece(token).decode("utf-8", "ignore")

    def detokenize(
        self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None, special: bool = False
    ) -> bytes:
        """The tokens' bytes. prev_tokens is accepted for llama_cpp's signature; the pieces do not depend on it."""
        return b"".join(self._piece(int(t), special) for t in tokens)

    def is_end_of_generation(self, token: int) -> bool:
        """True for tokens that end an answer (EOS, end-of-turn, ...)."""
        return bool(C.llama_vocab_is_eog(self._model.vocab, token))

    def _template_token_text(self, token: int) -> str:
        text: Any = C.llama_vocab_get_text(self._model.vocab, token) if token >= 0 else b""
        return (text or b"").decode("utf-8", "replace")
