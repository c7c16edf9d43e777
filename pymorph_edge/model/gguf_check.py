"""Checks on a GGUF's metadata that llama.cpp makes with an assert rather than an error.

llama.cpp validates most of a GGUF and returns NULL on damage, which Llama reports as a ValueError. A
few inconsistencies abort the process instead (GGML_ASSERT). Found by the GGUF fuzz campaign
(benchmarks/results/fuzz-gguf/): a vocabulary with two identical token strings aborts in
llama_vocab::load (`id_to_token.size() == token_to_id.size()`), and a byte-fallback vocabulary missing one
of its 256 byte tokens throws std::out_of_range out of `token_to_id.at` (terminate) the first time text
needs that byte (llama_vocab::impl::byte_to_token). This reads the key/value section
directly (the `gguf` package's reader takes 7.7 s on Gemma 3's 262K-token vocabulary; this 0.3 s)
and raises ValueError for what would abort, before llama.cpp sees the file.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type -> bytes
_STRING, _ARRAY = 8, 9
TOKENS_KEY = "tokenizer.ggml.tokens"
TOKENIZER_KEY = "tokenizer.ggml.model"
PARALLEL_KEYS = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")  # one entry per token


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf, self.off = buf, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.off + n > len(self.buf):
            raise ValueError(f"metadata runs past the end of the file at byte {self.off} (+{n})")
        b = self.buf[self.off : self.off + n]
        self.off += n
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip(self, vtype: int) -> None:
        if vtype in _SCALAR:
            self.take(_SCALAR[vtype])
        elif vtype == _STRING:
            self.take(self.u64())
        else:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.off}")


def check_metadata(path: Path) -> None:
    """Raise ValueError naming the path when the GGUF's metadata would make llama.cpp abort."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _check(_Reader(buf))
    except ValueError as exc:
        raise ValueError(f"corrupt GGUF {str(path)!r}: {exc}") from None
    except (OSError, struct.error) as exc:  # an empty file cannot be mapped
        raise ValueError(f"corrupt GGUF {str(path)!r}: {exc}") from None


def _check(r: _Reader) -> None:
    r.take(4)  # magic, checked by the caller
    version = r.u32()
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    r.u64()  # tensor count: llama.cpp checks it against the data
    n_kv = r.u64()
    counts: dict[str, int] = {}
    tokens: set[bytes] = set()
    tokenizer = b""
    for _ in range(n_kv):
        key = r.string().decode("utf-8", errors="replace")
        vtype = r.u32()
        if key == TOKENIZER_KEY and vtype == _STRING:
            tokenizer = r.string()
            continue
        if vtype != _ARRAY:
            r.skip(vtype)
            continue
        etype, n = r.u32(), r.u64()
        counts[key] = n
        if key == TOKENS_KEY and etype == _STRING:
            for i in range(n):
                tok = r.string()
                if tok in tokens:
                    raise ValueError(f"token {i} ({tok[:40]!r}) appears twice in {TOKENS_KEY}")
                tokens.add(tok)
        elif etype in _SCALAR:
            r.take(_SCALAR[etype] * n)
        else:
            for _ in range(n):
                r.skip(etype)
    n_tokens = counts.get(TOKENS_KEY)
    for key in PARALLEL_KEYS:
        if n_tokens is not None and key in counts and counts[key] != n_tokens:
            raise ValueError(f"{key} has {counts[key]} entries for {n_tokens} tokens")
    _check_byte_tokens(tokenizer, tokens)


def _check_byte_tokens(tokenizer: bytes, tokens: set[bytes]) -> None:
    """Every byte must map to a token where llama.cpp looks one up with .at() (it throws otherwise)."""
    if tokenizer == b"llama" and any(t.startswith(b"<0x") and len(t) == 6 for t in tokens):
        for b in range(256):  # byte fallback: "<0xXX>", or the byte itself
            if f"<0x{b:02X}>".encode() not in tokens and bytes([b]) not in tokens:
                raise ValueError(f"the byte-fallback vocabulary has no token for byte 0x{b:02X}")
    # Byte-level BPE ("gpt2") looks bytes up the same way, but real vocabularies lack some control bytes
    # (SmolLM2 has no token for 0x04), so missing ones cannot tell damage from design there.
