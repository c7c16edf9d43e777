"""Embeddings (llama_cpp.Llama.embed / create_embedding with embedding=True). They run in a second, small
llama.cpp context with embeddings on, one input at a time: the bounded generation cache is never touched, and
this context holds at most n_batch cells, cleared after each input."""

from __future__ import annotations

from typing import Any

import llama_cpp.llama_cpp as C
from llama_cpp._internals import normalize_embedding


class EmbeddingContext:
    """A llama.cpp context in embedding mode; n_batch: the most tokens one input may have."""

    def __init__(self, model: Any, n_batch: int, n_threads: int, pooling_type: int, flash_attn: bool) -> None:
        cp = C.llama_context_default_params()
        # as llama_cpp.Llama: flash attention only when asked (its "auto" would change the sums)
        cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_batch  # a non-causal model needs each input in one ubatch
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.embeddings = True
        cp.pooling_type = pooling_type
        self.ctx = C.llama_init_from_model(model.ptr, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create an embedding context of {n_batch} cells")
        model.attach_lora(self.ctx)
        self.n_batch, self.n_embd = n_batch, model.info.n_embd
        self.pooled = C.llama_pooling_type(self.ctx) != C.LLAMA_POOLING_TYPE_NONE
        self.batch = C.llama_batch_init(n_batch, 0, 1)

    def embed(self, tokens: list[int]) -> list[float] | list[list[float]]:
        """One input's embedding: pooled (one vector) or, for a model without pooling, one vector per token."""
        C.llama_memory_clear(C.llama_get_memory(self.ctx), True)
        b = self.batch
        for i, tok in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, 1, 1
            b.seq_id[i][0] = 0
        b.n_tokens = len(tokens)
        rc = C.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} embedding {len(tokens)} tokens")
        if self.pooled:
            return C.llama_get_embeddings_seq(self.ctx, 0)[: self.n_embd]
        ptr = C.llama_get_embeddings(self.ctx)
        return [ptr[j * self.n_embd : (j + 1) * self.n_embd] for j in range(len(tokens))]

    def close(self) -> None:
        if self.batch is not None:
            C.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            C.llama_free(self.ctx)
            self.ctx = None


class EmbeddingMixin:
    # provided by Llama
    _embedding: bool
    _pooling_type: int
    _embed_ctx: EmbeddingContext | None
    _engine: Any
    _model: Any
    model_path: str

    def _embedder(self) -> EmbeddingContext:
        if not self._embedding:
            raise RuntimeError("Llama model must be created with embedding=True to call this method")
        if self._embed_ctx is None:
            threads = self._engine.config.n_threads_batch or self._engine.config.n_threads or 1
            n_batch = max(self._engine.n_batch, 512)
            flash = bool(self._engine.config.flash_attn)
            self._embed_ctx = EmbeddingContext(self._model, n_batch, threads, self._pooling_type, flash)
        return self._embed_ctx

    def embed(
        self, input: str | list[str], normalize: bool = False, truncate: bool = True, return_count: bool = False
    ) -> Any:
        """Embed a string or a list of strings (llama_cpp's signature and results). A model without pooling
        (most generative ones) gives one vector per token; truncate=False makes an input over n_batch tokens a
        ValueError rather than cut."""
        ctx = self._embedder()
        inputs = [input] if isinstance(input, str) else input
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            raise ValueError(f"input must be a string or a list of strings, got {type(input).__name__}")
        data: list[Any] = []
        total = 0
        for text in inputs:
            tokens = self.tokenize(text.encode("utf-8"))
            if truncate:
                tokens = tokens[: ctx.n_batch]
            if len(tokens) > ctx.n_batch:
                raise ValueError(f"Requested tokens ({len(tokens)}) exceed batch size of {ctx.n_batch}")
            if not tokens:
                raise ValueError("cannot embed an empty input")
            total += len(tokens)
            emb = ctx.embed(tokens)
            if normalize:
                emb = normalize_embedding(emb) if ctx.pooled else [normalize_embedding(e) for e in emb]
            data.append(emb)
        out = data[0] if isinstance(input, str) else data
        return (out, total) if return_count else out

    def create_embedding(self, input: str | list[str], model: str | None = None) -> dict[str, Any]:
        """OpenAI's embedding response (llama_cpp.Llama.create_embedding)."""
        embeds, total = self.embed(input, return_count=True)
        embeds = [embeds] if isinstance(input, str) else embeds
        return {
            "object": "list",
            "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(embeds)],
            "model": model if model is not None else self.model_path,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }

    def _close_embeddings(self) -> None:
        if getattr(self, "_embed_ctx", None) is not None:
            self._embed_ctx.close()
            self._embed_ctx = None
