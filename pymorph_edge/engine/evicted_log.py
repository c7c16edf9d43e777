"""The log of a sequence's token ids, bounded in bytes, from which evicted text can be recalled.

A bounded cache forgets: what nothing attends to for a while is evicted. Its token ids cost 4 bytes each, so
the engine keeps them all (up to `max_bytes`, oldest dropped first) next to the cache. Which of them were
evicted is not stored but read off the cell map when needed: a logged index that no live cell holds. That
keeps the log exact across compaction, truncation and recall without the C side reporting each eviction.
"""

from __future__ import annotations

import base64
from array import array
from collections.abc import Iterable

DEFAULT_LOG_BYTES = 8 << 20  # 2M tokens: weeks of chat on a laptop, and the size of a small image
_TOKEN_BYTES = 4


class EvictedLog:
    """Token ids of sequence indices [start, start + len) since the last reset; older ones are dropped."""

    def __init__(self, max_bytes: int = DEFAULT_LOG_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"recall_log_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_tokens = max_bytes // _TOKEN_BYTES
        self.clear()

    def clear(self) -> None:
        self._ids = array("i")
        self.start = 0  # sequence index of _ids[0]
        # per reader, the lowest index dropped since its last take_rewind(): what that reader indexed is stale
        self._rewinds: dict[str, int | None] = {}

    def take_rewind(self, reader: str = "generation") -> int | None:
        """The lowest index truncated, cleared or reloaded since this reader's last call (None: the log only grew;
        0 on a reader's first call), for a reader that indexes the log as it grows (generation/generation_recall.py,
        engine/span_index.py)."""
        at = self._rewinds.get(reader, 0)
        self._rewinds[reader] = None
        return at

    def _rewound(self, n: int) -> None:
        for reader, at in self._rewinds.items():
            self._rewinds[reader] = n if at is None else min(at, n)

    @property
    def end(self) -> int:
        return self.start + len(self._ids)

    @property
    def nbytes(self) -> int:
        return len(self._ids) * _TOKEN_BYTES

    def extend(self, tokens: Iterable[int]) -> None:
        if self.max_tokens == 0:
            self.start += sum(1 for _ in tokens)
            return
        self._ids.extend(int(t) for t in tokens)
        over = len(self._ids) - self.max_tokens
        if over > 0:
            # drop a little more than needed, so that a long run does not shift the array at every token
            drop = min(len(self._ids), over + self.max_tokens // 16)
            del self._ids[:drop]
            self.start += drop

    def truncate(self, n: int) -> None:
        """Keep sequence indices below n (a diverging prompt rolled the sequence back)."""
        if n < self.start:
            self.clear()
            self.start = n
        elif n < self.end:
            del self._ids[n - self.start :]
            self._rewound(n)

    def tokens(self, lo: int, hi: int) -> list[int]:
        """Token ids of indices [lo, hi), clipped to what the log still holds."""
        lo, hi = max(lo, self.start), min(hi, self.end)
        return self._ids[lo - self.start : hi - self.start].tolist() if hi > lo else []

    def state(self) -> dict[str, object]:
        return {"start": self.start, "ids": base64.b64encode(self._ids.tobytes()).decode()}

    def load_state(self, state: dict[str, object]) -> None:
        """Put back state(); ValueError (log untouched) when it is malformed."""
        try:
            start, raw = state["start"], base64.b64decode(str(state["ids"]), validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed recall log: {exc}") from None
        if isinstance(start, bool) or not isinstance(start, int) or start < 0 or len(raw) % _TOKEN_BYTES:
            raise ValueError(f"malformed recall log (start {start!r}, {len(raw)} bytes)")
        ids = array("i")
        ids.frombytes(raw)
        self._ids, self.start = ids, start
        self._rewound(0)
