"""The log's timestamps: ISO 8601 in UTC, to the millisecond, so that they sort and compare as text."""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
