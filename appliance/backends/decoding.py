"""Turning sampled tokens into text: UTF-8 that is never split, stop strings that are never leaked."""

from __future__ import annotations

import codecs


class Utf8Stream:
    """Joins token bytes into text, holding back a multi-byte character until it is whole."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Cuts the text at the first stop string.

    Text that could still become a stop string is held back, so a client
    never sees the start of a stop sequence that later completes.
    """

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(hits)
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = self._partial_match_length()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _partial_match_length(self) -> int:
        """Length of the longest tail of pending text that begins some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:k]):
                    best = k
                    break
        return best
