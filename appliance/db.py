"""The appliance's SQLite database: schema, migrations and every write.

One row per API request. The row is inserted when the request arrives and
completed when it ends, so a request that fails, is cancelled or is cut off
by a crash still leaves its row. WAL mode lets ``appliance logs`` read while
the service writes.

A write that fails for lack of space or an I/O error raises ``LogUnavailable``
and is remembered in ``Database.log_error`` until a write succeeds again; no
write is queued, the next one simply tries again, so the log recovers by itself
when space returns.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils
from sqlite_utils import Migrations

from appliance.errors import LogUnavailable

log = logging.getLogger(__name__)
migrations = Migrations("appliance")
# SQLite's primary result codes for a full disk and an I/O error; extended codes keep them in the low byte.
SQLITE_IOERR, SQLITE_FULL = 10, 13


@migrations()
def m001_requests(db: sqlite_utils.Database):
    db["requests"].create(
        {
            "id": int,
            "started": str,  # ISO 8601, UTC
            "finished": str,  # NULL while the request runs
            "endpoint": str,
            "model": str,
            "client": str,
            "stream": int,
            "status": int,  # HTTP status; 499 = client went away mid-stream
            "error": str,
            "finish_reason": str,
            "prompt_tokens": int,
            "completion_tokens": int,
            "ttft_ms": float,  # request arrival to first generated text
            "total_ms": float,
            "tokens_per_s": float,  # completion tokens / time spent generating them
            "prompt": str,
            "response": str,
            "prompt_sha256": str,
            "response_sha256": str,
        },
        pk="id",
    )
    db["requests"].create_index(["started"])


@migrations()
def m002_power_events(db: sqlite_utils.Database):
    db["power_events"].create(
        {
            "id": int,
            "time": str,  # ISO 8601, UTC
            "from_state": str,
            "to_state": str,
            "reason": str,
            "rss_before": int,  # bytes
            "rss_after": int,
            "wake_ms": float,  # for wakes: how long the model took to come back
            "actions": str,  # JSON: what the power profile did or could not do
        },
        pk="id",
    )


@migrations()
def m003_api_keys(db: sqlite_utils.Database):
    db["api_keys"].create(
        {
            "id": str,  # public: the middle of sk-<id>-<secret>, what the log and 'keys list' show
            "name": str,
            "role": str,  # user, admin or auditor
            "priority": str,  # priority class the key's requests get by default; NULL: the default class
            "created": str,  # ISO 8601, UTC
            "expires": str,  # NULL: never
            "revoked": str,  # when it was revoked; NULL while it is not
            "salt": str,  # hex; the key itself is never stored
            "scrypt_n": int,
            "scrypt_r": int,
            "scrypt_p": int,
            "hash": str,  # hex scrypt of the whole key
        },
        pk="id",
    )
    db["requests"].add_column("key_id", str)  # the key that made the request (its id, never the key)


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def _storage_failure(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed for want of space or because the disk failed, not because of our SQL."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (SQLITE_IOERR, SQLITE_FULL)
    # Python 3.10 (Jetson) has no error codes on exceptions; these are SQLite's fixed texts for both codes.
    return str(exc) in ("database or disk is full", "disk I/O error")


class Database:
    """Owns the SQLite file. Thread-safe: one connection, one lock."""

    def __init__(self, path: Path | str, store_text: bool = True, readonly: bool = False, service: bool = True):
        """``readonly`` is for readers beside a running service (``appliance logs``, tests).

        ``service=False`` is for writers beside it (``appliance keys``): they leave its open rows alone.
        """
        self.path = Path(path)
        self.store_text = store_text
        self.log_error: str | None = None  # why the last write failed; None once one succeeds
        self._lock = threading.Lock()
        if readonly:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=30)
            self.db = sqlite_utils.Database(conn)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self.db = sqlite_utils.Database(conn)
        with self._lock, self._storage():
            self.db.enable_wal()
            # WAL + NORMAL: a committed row survives the process dying; only a power cut may lose the last ones.
            self.db.execute("PRAGMA synchronous=NORMAL")
            migrations.apply(self.db)
        if service:
            self._close_interrupted()

    def _close_interrupted(self) -> None:
        """Rows a previous process left open (it was killed) are marked, not lost."""
        try:
            self.close_open_rows(500, "service stopped before the request finished")
        except LogUnavailable as exc:  # start anyway: requests are refused and /readyz says why until space returns
            log.warning("%s", exc.message)

    def close_open_rows(self, status: int, error: str) -> int:
        """Finish every row still open (finished IS NULL); returns how many.

        A row that already has a status or an error keeps it; the others get these.
        """
        with self._write():
            return self.db.execute(
                "UPDATE requests SET finished = ?, status = COALESCE(status, ?), error = COALESCE(error, ?) "
                "WHERE finished IS NULL",
                [utcnow(), status, error],
            ).rowcount

    @contextmanager
    def _storage(self):
        """A failed write to the disk becomes LogUnavailable, remembered until a write succeeds."""
        try:
            yield
        except sqlite3.Error as exc:
            if not _storage_failure(exc):
                raise
            error = LogUnavailable(self.path, str(exc))
            self.log_error = error.message
            raise error from exc
        self.log_error = None

    @contextmanager
    def _write(self):
        """One write: under the lock, in a transaction (rolled back if it fails)."""
        with self._lock, self._storage(), self.db.conn:
            yield

    def _texts(self, fields: dict) -> dict:
        """Apply the log_text switch: keep the text, or only its sha256."""
        out = dict(fields)
        for name in ("prompt", "response"):
            if name in out:
                out[f"{name}_sha256"] = sha256_text(out[name])
                if not self.store_text:
                    out[name] = None
        return out

    def probe_write(self) -> bool:
        """While writes fail: try one that leaves nothing behind (a row added and removed in one transaction).

        True once the log takes writes again, which clears log_error; readiness asks this, so a box whose
        disk got space back becomes ready without waiting for a request to try first.
        """
        if self.log_error is None:
            return True
        try:
            with self._write():
                rowid = self.db["power_events"].insert({"time": utcnow(), "reason": "write probe"}).last_pk
                self.db["power_events"].delete(rowid)
        except LogUnavailable:
            return False
        return True

    def start_request(self, endpoint: str, client: str | None, **fields) -> int:
        row = self._texts({"started": utcnow(), "endpoint": endpoint, "client": client, **fields})
        with self._write():
            return self.db["requests"].insert(row).last_pk

    def update_request(self, request_id: int, **fields) -> None:
        with self._write():
            self.db["requests"].update(request_id, self._texts(fields))

    def finish_request(self, request_id: int, **fields) -> None:
        self.update_request(request_id, finished=utcnow(), **fields)

    def record_power_event(self, **fields) -> int:
        with self._write():
            return self.db["power_events"].insert({"time": utcnow(), **fields}).last_pk

    def power_events(self, limit: int = 100) -> list[dict]:
        with self._lock:
            return list(self.db["power_events"].rows_where(order_by="id desc", limit=limit))

    def recent_requests(self, limit: int = 20, offset: int = 0) -> list[dict]:
        """Newest first, skipping the ``offset`` newest: pages of the log."""
        with self._lock:
            return list(self.db["requests"].rows_where(order_by="id desc", limit=limit, offset=offset))

    def get_request(self, request_id: int) -> dict:
        with self._lock:
            return self.db["requests"].get(request_id)

    # -- API keys (auth.py hashes and checks them; only their hashes are here) ------------------
    def add_api_key(self, **fields) -> None:
        with self._write():
            self.db["api_keys"].insert({"created": utcnow(), **fields})

    def get_api_key(self, key_id: str) -> dict | None:
        with self._lock:
            rows = list(self.db["api_keys"].rows_where("id = ?", [key_id]))
        return rows[0] if rows else None

    def api_keys(self) -> list[dict]:
        """Every key, oldest first, without its salt and hash."""
        with self._lock:
            rows = list(self.db["api_keys"].rows_where(order_by="created, id"))
        return [{k: v for k, v in row.items() if k not in ("salt", "hash")} for row in rows]

    def has_api_keys(self, role: str | None = None) -> bool:
        """Whether a key that is neither revoked nor expired exists (of this role, if given)."""
        sql = "SELECT 1 FROM api_keys WHERE revoked IS NULL AND (expires IS NULL OR expires > ?)"
        args = [utcnow()]
        if role is not None:
            sql, args = sql + " AND role = ?", args + [role]
        with self._lock:
            return self.db.execute(sql + " LIMIT 1", args).fetchone() is not None

    def revoke_api_key(self, key_id: str) -> bool:
        """Revoke a key at once; False when no such key is there or it was revoked before."""
        with self._write():
            return self.db.execute("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                                   [utcnow(), key_id]).rowcount == 1

    def close(self) -> None:
        with self._lock:
            self.db.close()
