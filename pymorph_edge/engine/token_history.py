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

BLOCK = 64  # tokens fold into the hash in whole blocks, so the hash of a prefix is a pure function of it
_EMPTY = bytes(16)


def _chain(digest: bytes, block: Sequence[int]) -> bytes:
    return hashlib.blake2b(digest + array("i", block).tobytes(), digest_size=16).digest()


def _chain_all(tokens: Sequence[int], n: int) -> bytes:
    """The digest of tokens[:n], n a multiple of BLOCK."""
    d = _EMPTY
    for i in range(0, n, BLOCK):
        d = _chain(d, tokens[i : i + BLOCK])
    return d


class TokenHistory:
    """Tokens 0..len-1 of the current sequence; tokens older than the last `keep` survive only as a hash.

    The hash is chained over blocks of BLOCK tokens rather than kept as a running hashlib object, so its
    state is 16 bytes that a saved session can carry (hashlib objects cannot be serialized)."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be positive, got {keep}")
        self.keep = keep
        self.clear()

    def clear(self) -> None:
        self._tail: deque[int] = deque()
        self._start = 0  # sequence index of _tail[0], a multiple of BLOCK
        self._digest = _EMPTY  # of tokens [0, _start)

    def __len__(self) -> int:
        return self._start + len(self._tail)

    @property
    def start(self) -> int:
        """Index of the oldest token still stored; older ones are only hashed."""
        return self._start

    def extend(self, tokens: Iterable[int]) -> None:
        self._tail.extend(int(t) for t in tokens)
        while len(self._tail) - self.keep >= BLOCK:
            self._digest = _chain(self._digest, [self._tail.popleft() for _ in range(BLOCK)])
            self._start += BLOCK

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
            if len(tokens) < self._start or _chain_all(tokens, self._start) != self._digest:
                return 0
        i, n = self._start, min(len(self), len(tokens))
        for tok in self._tail:
            if i >= n or tokens[i] != tok:
                break
            i += 1
        return i

    def fingerprint(self) -> bytes:
        """A digest of the whole sequence: equal fingerprints mean the same tokens (to 128 bits)."""
        return hashlib.blake2b(
            self._digest + self._start.to_bytes(8, "little") + array("i", self._tail).tobytes(), digest_size=16
        ).digest()

    def state(self) -> dict[str, object]:
        """JSON-ready state (a saved session): the stored tail and the hash of what came before it."""
        return {"keep": self.keep, "start": self._start, "digest": self._digest.hex(), "tail": list(self._tail)}

    @classmethod
    def from_state(cls, state: dict[str, object]) -> TokenHistory:
        """Rebuild from state(); ValueError if it is malformed."""
        try:
            keep, start, digest, tail = state["keep"], state["start"], bytes.fromhex(state["digest"]), state["tail"]  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed token history: {exc}") from None
        ints = (keep, start, *tail) if isinstance(tail, list) else ()
        if not ints or not all(isinstance(x, int) and not isinstance(x, bool) for x in ints):
            raise ValueError("malformed token history: non-integer fields")
        if keep < 1 or start < 0 or start % BLOCK or len(digest) != 16 or (start == 0) != (digest == _EMPTY):
            raise ValueError(f"malformed token history (keep {keep}, start {start})")
        h = cls(keep)
        h._start, h._digest = start, digest
        h._tail.extend(tail)
        return h
