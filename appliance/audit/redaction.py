"""What text the log stores: redaction patterns replaced, and a cap on its length."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

REDACTED = "[REDACTED]"


@dataclass
class TextPolicy:
    """Redaction patterns, replaced before text is stored, and the cap on what is stored (0: none)."""

    patterns: list[str] = field(default_factory=list)
    max_chars: int = 0

    def __post_init__(self):
        self._compiled = [re.compile(p) for p in self.patterns]

    def apply(self, text: str) -> tuple[str, int]:
        """(the text to store, how many matches were redacted)."""
        count = 0
        for pattern in self._compiled:
            text, n = pattern.subn(REDACTED, text)
            count += n
        if self.max_chars and len(text) > self.max_chars:
            text = text[: self.max_chars]
        return text, count
