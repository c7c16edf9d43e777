"""Tiny llama-architecture GGUFs with random weights, written with the `gguf` package.

They load in llama.cpp in milliseconds, so mechanism tests (cell maps, budgets, eviction) run
without a real model. The tokenizer is SentencePiece-style with byte fallback only. `arch` also writes the
two other layouts small instruction-tuned models commonly ship in: "qwen2" (biased Q/K/V, NeoX RoPE) and
"qwen3" (RMS-normed Q and K per head, NeoX RoPE); llama.cpp builds their attention through the same code.
"gemma3" writes Gemma 3's interleaved sliding window (iSWA: every 6th layer global, the rest see the last
`n_swa` tokens) with its extra norms, so the two-cache path runs in milliseconds too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_synthetic_llama(
    path: str | Path,
    *,
    n_head: int = 4,
    n_head_kv: int = 4,
    n_layer: int = 2,
    n_embd: int = 64,
    n_ff: int = 128,
    n_ctx_train: int = 65536,
    seed: int = 0,
    arch: str = "llama",
    n_swa: int = 32,
) -> Path:
    """Write a random-weight GGUF (MHA when n_head_kv == n_head, GQA otherwise) and return its path."""
    import gguf

    if arch not in ("llama", "qwen2", "qwen3", "gemma3"):
        raise ValueError(f"arch must be 'llama', 'qwen2', 'qwen3' or 'gemma3', got {arch!r}")
    if n_head % n_head_kv:
        raise ValueError(f"n_head={n_head} must be a multiple of n_head_kv={n_head_kv}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head

    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("pymorph-edge-synthetic")
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    if arch == "gemma3":
        w.add_sliding_window(n_swa)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def t(name: str, *shape: int, scale: float = 0.08) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd, scale=0.5)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    t("output.weight", n_vocab, n_embd, scale=0.3)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        # larger Q/K scale gives peaked, position-dependent attention, so scores differ between tokens
        t(f"blk.{i}.attn_q.weight", n_embd, n_embd, scale=0.5)
        t(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd, scale=0.5)
        t(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        t(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        if arch == "qwen2":
            t(f"blk.{i}.attn_q.bias", n_embd, scale=0.3)
            t(f"blk.{i}.attn_k.bias", n_head_kv * head_dim, scale=0.3)
            t(f"blk.{i}.attn_v.bias", n_head_kv * head_dim)
        if arch == "gemma3":
            for norm in ("post_attention_norm", "post_ffw_norm"):
                w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(n_embd, dtype=np.float32))
        if arch in ("qwen3", "gemma3"):  # normed per head: the norm weights, not the Q/K scale, sharpen attention
            w.add_tensor(f"blk.{i}.attn_q_norm.weight", np.full(head_dim, 2.5, dtype=np.float32))
            w.add_tensor(f"blk.{i}.attn_k_norm.weight", np.full(head_dim, 2.5, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
