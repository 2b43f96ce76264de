"""Filters over the request log and its export as CSV or JSON Lines, shared by the admin API and the CLI.

A filter is what an operator narrows the log by: model, status, key, priority class, endpoint, a time window
and a text search. The web UI's Logs page, ``GET /api/logs``, ``GET /api/logs/export`` and ``appliance logs export``
all read the same filter from the same names, so a filtered view and its export hold the same rows.
JSON Lines is what a site ships to its SIEM or ELK: one row per line, every column, UTC timestamps.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from typing import Iterable, Iterator, Mapping

from appliance.errors import InvalidRequest

FILTERS = ("model", "status", "key_id", "priority", "endpoint", "since", "until", "q")
TEXT_COLUMNS = ("prompt", "response")
FORMATS = ("csv", "jsonl")
# Every column of the requests table in a fixed order, so that CSV files of different days line up.
COLUMNS = ("id", "seq", "started", "finished", "endpoint", "model", "client", "key_id", "priority", "stream", "status",
           "error",
           "finish_reason", "prompt_tokens", "completion_tokens", "ttft_ms", "total_ms", "tokens_per_s",
           "prompt_chars", "response_chars", "redactions", "text_cap", "prompt_sha256", "response_sha256", "digest",
           "prompt", "response")
STATUS_WORDS = {"ok": "status < 400", "error": "status >= 400", "cancelled": "status = 499",
                "open": "finished IS NULL"}


def parse_filters(args: Mapping[str, str]) -> dict:
    """The filters present in ``args`` (query arguments or CLI options), checked; a bad one is a 400 naming it."""
    found = {}
    for name in FILTERS:
        raw = args.get(name)
        if raw is None or str(raw).strip() == "":
            continue
        raw = str(raw).strip()
        if name == "status" and not (raw in STATUS_WORDS or (raw.isascii() and raw.isdigit() and len(raw) == 3)):
            raise InvalidRequest(f"status must be an HTTP status (e.g. 499) or one of {', '.join(STATUS_WORDS)}, "
                                 f"got {raw!r}", param="status", code="invalid_value")
        if name in ("since", "until"):
            raw = _utc(raw, name)
        found[name] = raw
    return found


def _utc(text: str, name: str) -> str:
    """An ISO 8601 time (a date alone, or without a zone: UTC) in the log's own spelling, which sorts as text."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO 8601 time such as 2026-12-05T14:30 or 2026-12-05 (UTC unless "
                             f"it names a zone), got {text!r}", param=name, code="invalid_value") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def where_clause(filters: dict) -> tuple[str, list]:
    """SQL for ``WHERE`` (or "1") and its arguments; the text search is a substring, case-insensitive for ASCII."""
    parts, args = [], []
    for column in ("model", "key_id", "priority", "endpoint"):
        if column in filters:
            parts.append(f"{column} = ?")
            args.append(filters[column])
    status = filters.get("status")
    if status in STATUS_WORDS:
        parts.append(STATUS_WORDS[status])
    elif status is not None:
        parts.append("status = ?")
        args.append(int(status))
    if "since" in filters:
        parts.append("started >= ?")
        args.append(filters["since"])
    if "until" in filters:
        parts.append("started < ?")
        args.append(filters["until"])
    if "q" in filters:
        pattern = "%" + filters["q"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        parts.append("(prompt LIKE ? ESCAPE '\\' OR response LIKE ? ESCAPE '\\' OR error LIKE ? ESCAPE '\\')")
        args += [pattern] * 3
    return (" AND ".join(parts) or "1"), args


def without_texts(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TEXT_COLUMNS}


def columns(text: bool) -> tuple[str, ...]:
    return COLUMNS if text else tuple(c for c in COLUMNS if c not in TEXT_COLUMNS)


def as_jsonl(rows: Iterable[dict], text: bool) -> Iterator[str]:
    names = columns(text)
    for row in rows:
        yield json.dumps({name: row.get(name) for name in names}, ensure_ascii=False) + "\n"


def as_csv(rows: Iterable[dict], text: bool) -> Iterator[str]:
    """RFC 4180 CSV with a header row; a cell that a spreadsheet would run as a formula is prefixed with '."""
    names = columns(text)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([_cell(row.get(name)) for name in names])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def _cell(value):
    # A prompt is whatever a user typed: "=HYPERLINK(...)" must reach a spreadsheet as text, not as a formula.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def export(rows: Iterable[dict], fmt: str, text: bool) -> Iterator[str]:
    if fmt not in FORMATS:
        raise InvalidRequest(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", param="format",
                             code="invalid_value")
    return as_csv(rows, text) if fmt == "csv" else as_jsonl(rows, text)
