"""The appliance's SQLite database: the file, its transactions, and every read and write of its rows.

One row per API request. The row is inserted when the request arrives and
completed when it ends, so a request that fails, is cancelled or is cut off
by a crash still leaves its row. WAL mode lets ``appliance logs`` read while
the service writes. The schema is ``appliance.migrations``.

A finished row joins the audit chain: it takes the next ``seq`` and a digest
over itself and the row before, so an edit or a deletion made behind the
service's back shows in ``appliance logs verify``. ``appliance.audit`` computes
and signs the chain and says what retention prunes; the SQL is here.

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
from pathlib import Path

import sqlite_utils

from appliance.audit.chain import HEAD_BEGINS, HEAD_FILE, Chain, Link, next_link
from appliance.audit.keys import AuditKey
from appliance.audit.redaction import TextPolicy
from appliance.audit.retention import excess_rows
from appliance.config import Retention
from appliance.errors import LogUnavailable
from appliance.migrations import migrations
from appliance.timestamps import utcnow

log = logging.getLogger(__name__)
# SQLite's primary result codes for a full disk and an I/O error; extended codes keep them in the low byte.
SQLITE_IOERR, SQLITE_FULL = 10, 13


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

    def __init__(self, path: Path | str, store_text: bool = True, readonly: bool = False, service: bool = True,
                 text_policy: TextPolicy | None = None, audit_key: AuditKey | None = None, checkpoint_rows: int = 100):
        """``readonly`` is for readers beside a running service (``appliance logs``, tests).

        ``service=False`` is for writers beside it (``appliance keys``): they leave its open rows alone.
        ``audit_key`` signs a checkpoint of the chain every ``checkpoint_rows`` finished rows (0: never).
        """
        self.path = Path(path)
        self.store_text = store_text
        self.text_policy = text_policy or TextPolicy()
        self.chain = Chain(audit_key, checkpoint_rows, None if readonly else self.head_path)
        self.log_error: str | None = None  # why the last write failed; None once one succeeds
        self._lock = threading.Lock()
        self._closed = False
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
            self._warn_if_cut()
            self._close_interrupted()
            try:
                self._start_head()
            except LogUnavailable as exc:  # as for the rows above: start, and say why writes fail
                log.warning("%s", exc.message)

    @property
    def head_path(self) -> Path:
        """The audit chain's signed head, beside the database."""
        return self.path.parent / HEAD_FILE

    @property
    def audit_key(self) -> AuditKey | None:
        return self.chain.key

    @classmethod
    def from_settings(cls, settings, service: bool = True) -> "Database":
        """The log as the settings describe it: text policy, audit key and checkpoints.

        The service makes the audit key on its first start; a writer beside it (``appliance chat``, maybe
        another user) signs only where it may read the key, and never makes one.
        """
        key = AuditKey.load_or_create(settings.home) if service else AuditKey.load(settings.home)
        return cls(settings.db_path, store_text=settings.log_text, service=service,
                   text_policy=TextPolicy(settings.log_redact, settings.log_text_max_chars),
                   audit_key=key, checkpoint_rows=settings.audit_checkpoint_rows)

    def _start_head(self) -> None:
        """At the service's start: sign the head file, and record it when the file went missing."""
        if self.chain.head_file is None:
            return
        with self._write(chain=True):
            head = self._head()
            began = self.db.execute("SELECT 1 FROM audit_checkpoints WHERE reason = ? LIMIT 1", [HEAD_BEGINS]).fetchone()
            self.db["audit_checkpoints"].insert_all(self.chain.start_checkpoints(head, began is not None))
        self.chain.advance(head if head.seq else None)

    def _warn_if_cut(self) -> None:
        # Where the log ends: its last row, or the last one pruned (those are gone by right).
        end = self.db.execute("SELECT MAX(COALESCE((SELECT MAX(seq) FROM requests), 0), COALESCE((SELECT MAX(seq) "
                              "FROM audit_checkpoints WHERE pruned_rows > 0), 0))").fetchone()[0]
        self.chain.warn_if_cut(end)

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
        chained = None
        with self._write(chain=True):
            ids = [r[0] for r in self.db.execute("SELECT id FROM requests WHERE finished IS NULL ORDER BY id")]
            for request_id in ids:
                self.db.execute("UPDATE requests SET finished = ?, status = COALESCE(status, ?), "
                                "error = COALESCE(error, ?) WHERE id = ?", [utcnow(), status, error, request_id])
                chained = self._chain(request_id)
        self.chain.advance(chained)
        return len(ids)

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
    def _write(self, chain: bool = False):
        """One write: under the lock, in a transaction (rolled back if it fails).

        ``chain``: the transaction takes SQLite's write lock at once, so that the chain's head it reads
        is still the head when it writes (``appliance chat`` may log into the same file).
        """
        with self._lock, self._storage(), self.db.conn:
            if chain:
                self.db.execute("BEGIN IMMEDIATE")
            yield

    def _texts(self, fields: dict) -> dict:
        """The sha256 of each text as received, then the text as stored: redacted, capped, or not at all."""
        out = dict(fields)
        for name in ("prompt", "response"):
            if out.get(name) is None:
                continue
            text = out[name]
            out[f"{name}_sha256"], out[f"{name}_chars"] = sha256_text(text), len(text)
            if not self.store_text:
                out[name] = None
                continue
            out[name], redactions = self.text_policy.apply(text)
            out["text_cap"] = self.text_policy.max_chars or None
            if redactions:
                out["redactions"] = redactions
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
        """Change a row that is still open; a finished row is part of the chain and stays as it is."""
        with self._write():
            self._update_open(request_id, self._texts(fields))

    def finish_request(self, request_id: int, **fields) -> None:
        """Complete the row and chain it; finishing a row twice changes nothing."""
        chained = None
        with self._write(chain=True):
            if self._update_open(request_id, self._texts({"finished": utcnow(), **fields})):
                chained = self._chain(request_id)
        self.chain.advance(chained)

    def _update_open(self, request_id: int, fields: dict) -> bool:
        # The prompt's redactions are in the row already; the response's add to them.
        sets = ", ".join("[redactions] = COALESCE(redactions, 0) + ?" if name == "redactions" else f"[{name}] = ?"
                         for name in fields)
        return self.db.execute(f"UPDATE requests SET {sets} WHERE id = ? AND finished IS NULL",
                               [*fields.values(), request_id]).rowcount == 1

    # -- the audit chain (appliance.audit.chain computes and signs it) --------------------------------
    def _chain(self, request_id: int) -> Link:
        """Give a just-finished row its place in the chain; inside a chain=True write."""
        link = next_link(self._head(), self.db["requests"].get(request_id))
        self.db.execute("UPDATE requests SET seq = ?, digest = ? WHERE id = ?", [link.seq, link.digest, request_id])
        checkpoint = self.chain.due_checkpoint(link)
        if checkpoint is not None:
            self.db["audit_checkpoints"].insert(checkpoint)
        return link

    def _head(self) -> Link:
        """The link the next row follows (``Chain.head_of`` says which)."""
        row = self.db.execute("SELECT seq, digest FROM requests WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1"
                              ).fetchone()
        checkpoint = self.db.execute("SELECT seq, digest FROM audit_checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
        return self.chain.head_of(row, checkpoint)

    def checkpoint(self, reason: str) -> bool:
        """Sign the chain's head now (at shutdown); False when there is no key or nothing new to sign."""
        if self.audit_key is None:
            return False
        with self._write(chain=True):
            head = self._head()
            last = self.db.execute("SELECT MAX(seq) FROM audit_checkpoints").fetchone()[0]
            if head.seq == 0 or last == head.seq:
                return False
            self.db["audit_checkpoints"].insert(self.chain.checkpoint(reason, head))
        self.chain.advance(head)
        return True

    # -- retention (appliance.audit.retention says how many rows are over) ----------------------------
    def prune(self, retention: Retention, batch: int = 2000) -> int:
        """Delete the oldest finished rows beyond the retention limits; returns how many.

        Rows go in chain order (a prefix of the chain, never one from the middle), at most ``batch`` per
        transaction so that requests are not held up by a long delete; each transaction first writes a
        signed checkpoint of its last deleted row, so the rows left still verify.
        """
        if self.audit_key is None:
            raise ValueError("pruning needs the audit key: the chain could not be verified after it")
        total = 0
        while deleted := self._prune_batch(retention, batch):
            total += deleted
        return total

    def _prune_batch(self, retention: Retention, batch: int) -> int:
        with self._write(chain=True):
            through = self._prune_through(retention)
            if through is None:
                return 0
            through = min(through, self._nth_oldest_seq(batch) or through)
            digest = self.db.execute("SELECT digest FROM requests WHERE seq = ?", [through]).fetchone()[0]
            deleted = self.db.execute("DELETE FROM requests WHERE seq <= ?", [through]).rowcount
            checkpoint = self.chain.checkpoint("prune", Link(through, digest), pruned_rows=deleted)
            self.db["audit_checkpoints"].insert(checkpoint)
            return deleted

    def _prune_through(self, retention: Retention) -> int | None:
        """The highest seq to delete so that what is left keeps within every limit; None: nothing."""
        marks = [0]
        cutoff = retention.cutoff()
        if cutoff:  # the rows before the first one that is still young: a clock stepped back deletes no newer row
            marks.append(self.db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM requests WHERE seq IS NOT NULL AND seq < COALESCE("
                "(SELECT MIN(seq) FROM requests WHERE seq IS NOT NULL AND finished >= ?), 9e18)", [cutoff]
            ).fetchone()[0])
        chained = self.db.execute("SELECT COUNT(*) FROM requests WHERE seq IS NOT NULL").fetchone()[0]
        excess = excess_rows(retention, chained, self._used_bytes() if retention.megabytes and chained else 0)
        if excess:
            marks.append(self._nth_oldest_seq(excess))
        return max(marks) or None

    def _nth_oldest_seq(self, n: int) -> int | None:
        row = self.db.execute("SELECT seq FROM requests WHERE seq IS NOT NULL ORDER BY seq LIMIT 1 OFFSET ?",
                              [n - 1]).fetchone()
        return row[0] if row else None

    def _used_bytes(self) -> int:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0] - self.db.execute("PRAGMA freelist_count"
                                                                                      ).fetchone()[0]
        return pages * self.db.execute("PRAGMA page_size").fetchone()[0]

    def chained_rows(self, batch: int = 500):
        """Every chained row in chain order, a batch at a time (the log may be large)."""
        last = -1
        while True:
            with self._lock:
                rows = list(self.db["requests"].rows_where("seq > ?", [last], order_by="seq", limit=batch))
            if not rows:
                return
            yield from rows
            last = rows[-1]["seq"]

    @contextmanager
    def snapshot(self):
        """Reads inside see one state of the file, whatever the service writes or prunes meanwhile (WAL)."""
        with self._lock:
            self.db.execute("BEGIN")
        try:
            yield self
        finally:
            with self._lock:
                self.db.execute("COMMIT")

    def chained_row(self, seq: int) -> dict | None:
        return self._first("requests", "seq = ?", [seq])

    def _first(self, table: str, where: str, args: list) -> dict | None:
        """The first row that matches, or None."""
        with self._lock:
            rows = list(self.db[table].rows_where(where, args, limit=1))
        return rows[0] if rows else None

    def unchained_rows(self) -> list[int]:
        """Ids of finished rows without a place in the chain: the service never leaves one."""
        with self._lock:
            return [r[0] for r in self.db.execute(
                "SELECT id FROM requests WHERE finished IS NOT NULL AND seq IS NULL ORDER BY id")]

    def checkpoints(self) -> list[dict]:
        with self._lock:
            return list(self.db["audit_checkpoints"].rows_where(order_by="seq, id"))

    def open_row_count(self) -> int:
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM requests WHERE finished IS NULL").fetchone()[0]

    def record_action(self, endpoint: str, client: str, key_id: str | None, details: str) -> int:
        """A change made outside the HTTP API (``appliance keys``): one finished row, in the audit chain."""
        request_id = self.start_request(endpoint, client, key_id=key_id, prompt=details)
        self.finish_request(request_id, status=200)
        return request_id

    def record_power_event(self, **fields) -> int:
        with self._write():
            return self.db["power_events"].insert({"time": utcnow(), **fields}).last_pk

    def power_events(self, limit: int = 100) -> list[dict]:
        with self._lock:
            return list(self.db["power_events"].rows_where(order_by="id desc", limit=limit))

    def record_model_event(self, **fields) -> int:
        with self._write():
            return self.db["model_events"].insert({"time": utcnow(), **fields}).last_pk

    def model_events(self, limit: int = 100) -> list[dict]:
        with self._lock:
            return list(self.db["model_events"].rows_where(order_by="id desc", limit=limit))

    def model_event_counts(self) -> list[tuple[str, str, str, int]]:
        """(event, model, outcome, count) over the whole table: the Prometheus counters."""
        with self._lock:
            return self.db.execute("SELECT event, model, outcome, COUNT(*) FROM model_events "
                                   "GROUP BY event, model, outcome").fetchall()

    def recent_requests(self, limit: int = 20, offset: int = 0) -> list[dict]:
        """Newest first, skipping the ``offset`` newest: pages of the log."""
        with self._lock:
            return list(self.db["requests"].rows_where(order_by="id desc", limit=limit, offset=offset))

    def query_requests(self, where: str = "1", args: list | None = None, limit: int = 50, offset: int = 0,
                       before_id: int | None = None) -> list[dict]:
        """Rows matching a filter (``log_export.where_clause``), newest first: a page of a filtered log view.

        ``before_id`` starts below that row instead of skipping ``offset`` rows, so an export that walks the
        whole log in batches neither repeats nor misses rows while new ones arrive."""
        sql, params = f"SELECT * FROM requests WHERE ({where})", list(args or [])
        if before_id is not None:
            sql, params = sql + " AND id < ?", params + [before_id]
        with self._lock:
            cursor = self.db.execute(sql + " ORDER BY id DESC LIMIT ? OFFSET ?", params + [limit, offset])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def iter_requests(self, where: str = "1", args: list | None = None, batch: int = 500):
        """Every row matching a filter, newest first, read in batches (the lock is not held between them)."""
        before = None
        while True:
            rows = self.query_requests(where, args, limit=batch, before_id=before)
            yield from rows
            if len(rows) < batch:
                return
            before = rows[-1]["id"]

    def get_request(self, request_id: int) -> dict:
        with self._lock:
            return self.db["requests"].get(request_id)

    # -- API keys (auth.py hashes and checks them; only their hashes are here) ------------------
    def add_api_key(self, **fields) -> None:
        with self._write():
            self.db["api_keys"].insert({"created": utcnow(), **fields})

    def get_api_key(self, key_id: str) -> dict | None:
        return self._first("api_keys", "id = ?", [key_id])

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
        """Sign the chain's head (when this is the service's log) and close the file; closing twice is harmless."""
        if self._closed:
            return
        if self.audit_key is not None:
            try:
                self.checkpoint("shutdown")
            except LogUnavailable as exc:
                log.warning("no shutdown checkpoint of the audit chain: %s", exc.message)
        with self._lock:
            self._closed = True
            self.db.close()
