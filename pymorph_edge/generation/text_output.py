"""Turns generated token bytes into text pieces, holding back incomplete UTF-8 and possible stop-string starts."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextAssembler:
    """Feed token bytes; get back text that is safe to emit. `stopped` turns true at a stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet emitted: it may be the start of a stop string
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        for s in self.stop:
            i = self._held.find(s)
            if i >= 0:
                self.stopped = True
                return self._emit(self._held[:i])
        keep = self._longest_stop_prefix_suffix()
        return self._emit(self._held[: len(self._held) - keep], keep_tail=keep)

    def finish(self) -> str:
        """Flush what was held back at the end of generation."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._emit(self._held)

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit(self, out: str, keep_tail: int = 0) -> str:
        self._held = self._held[len(self._held) - keep_tail :] if keep_tail else ""
        return out  # nothing emitted is kept: an endless answer must not grow memory
