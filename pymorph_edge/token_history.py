"""The token sequence the cache was built from, in memory that does not grow with its length.

Prefix reuse compares a new prompt with everything decoded since the last reset, but it can only
keep a prefix whose tail is still whole in the cache, and that tail is at most a cache's worth of
tokens. So only the last `keep` tokens are stored; the older ones are folded into a running hash,
which still tells whether a new prompt starts with exactly the same tokens.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import deque
from collections.abc import Iterable, Sequence


def _digest_update(h: hashlib._Hash, tokens: Iterable[int]) -> None:
    h.update(array("i", tokens).tobytes())


class TokenHistory:
    """Tokens 0..len-1 of the current sequence; tokens older than the last `keep` survive only as a hash."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be positive, got {keep}")
        self.keep = keep
        self.clear()

    def clear(self) -> None:
        self._tail: deque[int] = deque()
        self._start = 0  # sequence index of _tail[0]
        self._hash = hashlib.blake2b(digest_size=16)  # of tokens [0, _start)

    def __len__(self) -> int:
        return self._start + len(self._tail)

    @property
    def start(self) -> int:
        """Index of the oldest token still stored; older ones are only hashed."""
        return self._start

    def extend(self, tokens: Iterable[int]) -> None:
        self._tail.extend(int(t) for t in tokens)
        spill = len(self._tail) - self.keep
        if spill > 0:
            _digest_update(self._hash, (self._tail.popleft() for _ in range(spill)))
            self._start += spill

    def truncate(self, n: int) -> None:
        """Keep the first n tokens; n must not reach below the stored tail."""
        if not self._start <= n <= len(self):
            raise ValueError(f"cannot truncate the history to {n} tokens (stored: [{self._start}, {len(self)}))")
        for _ in range(len(self) - n):
            self._tail.pop()

    def tail(self, n: int) -> list[int]:
        """The last n tokens (n at most the stored tail)."""
        n = min(n, len(self._tail))
        return list(self._tail)[len(self._tail) - n :]

    def common_prefix(self, tokens: Sequence[int]) -> int:
        """Length of the longest common prefix of the history and tokens.

        Below `start` the answer is only 0 or at least `start`: a prompt that differs somewhere in the
        hashed part reports 0, which is what prefix reuse needs (it cannot keep evicted positions)."""
        if self._start:
            if len(tokens) < self._start:
                return 0
            h = hashlib.blake2b(digest_size=16)
            _digest_update(h, tokens[: self._start])
            if h.digest() != self._hash.digest():
                return 0
        i, n = self._start, min(len(self), len(tokens))
        for tok in self._tail:
            if i >= n or tokens[i] != tok:
                break
            i += 1
        return i
