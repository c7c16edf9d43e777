"""The keys of every logged token at a few layers, kept on the host for recall by attention (recall_keys.py).

The C callback stages the K rows each ubatch wrote at every scored layer (native/pme_keylog.c); this keeps
those of `layers` per sequence index, as f16, bounded in bytes (oldest dropped first, as the id log). A token
costs len(layers) * n_head_kv * d_k * 2 bytes: 1.5 KB on SmolLM2 with 4 layers, against the 23 KB its cells
cost the cache, so a conversation's keys stay on the host while only the budget's cells sit in the cache.
"""

from __future__ import annotations

import numpy as np

DEFAULT_KEY_BYTES = 64 << 20  # 43K tokens of SmolLM2 keys at 4 layers


class KeyLog:
    """f16 keys (index, layer, kv head, d) of sequence indices [start, end)."""

    def __init__(self, layers: list[int], n_head_kv: int, d_k: int, max_bytes: int = DEFAULT_KEY_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"recall_key_bytes must be a non-negative int, got {max_bytes!r}")
        self.layers, self.n_head_kv, self.d_k = list(layers), n_head_kv, d_k
        self.token_bytes = len(self.layers) * n_head_kv * d_k * 2
        self.max_tokens = max_bytes // self.token_bytes if self.token_bytes else 0
        self.clear()

    def clear(self) -> None:
        self._k = np.empty((0, len(self.layers), self.n_head_kv, self.d_k), np.float16)
        self._n = 0
        self.start = 0

    @property
    def end(self) -> int:
        return self.start + self._n

    @property
    def nbytes(self) -> int:
        return self._n * self.token_bytes

    def append(self, index: int, rows: np.ndarray) -> None:
        """rows (m, layers, n_head_kv, d_k): the keys of sequence indices index..index+m-1."""
        m = len(rows)
        if index != self.end:
            self.truncate(index)
            if index != self.end:  # a gap (nothing logged before it): start over from here
                self.clear()
                self.start = index
        if self.max_tokens == 0:
            self.start += m
            return
        if self._n + m > len(self._k):
            grown = np.empty((max(2 * len(self._k), self._n + m, 256),) + self._k.shape[1:], np.float16)
            grown[: self._n] = self._k[: self._n]
            self._k = grown
        self._k[self._n : self._n + m] = rows
        self._n += m
        over = self._n - self.max_tokens
        if over > 0:
            drop = min(self._n, over + self.max_tokens // 16)  # a little more, so long runs shift rarely
            self._k[: self._n - drop] = self._k[drop : self._n]
            self._n -= drop
            self.start += drop

    def truncate(self, n: int) -> None:
        """Keep sequence indices below n."""
        if n < self.start:
            self.clear()
            self.start = n
        elif n < self.end:
            self._n = n - self.start

    def copy(self) -> KeyLog:
        out = KeyLog(self.layers, self.n_head_kv, self.d_k, 0)
        out.max_tokens, out.token_bytes = self.max_tokens, self.token_bytes
        out._k, out._n, out.start = self._k[: self._n].copy(), self._n, self.start
        return out

    def keys(self) -> np.ndarray:
        """(end - start, layers, n_head_kv, d_k) f16, a view."""
        return self._k[: self._n]
