"""The hash chain: what a finished row's digest covers, how rows link, and the checkpoints and head the service signs.

This module computes and signs; ``appliance.db`` reads the rows asked for and writes what comes back, in
one transaction that holds SQLite's write lock, so that the head a row links to is still the head when
it is written. ``appliance.audit.verify`` checks the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

from appliance.audit.keys import AuditKey, signature_valid
from appliance.timestamps import utcnow

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the "previous digest" of the first row ever
HEAD_FILE = "audit-head.json"
HEAD_BEGINS = "head file begins"  # checkpoint reasons the service's start writes
HEAD_MISSING = "head file missing at start"


class Link(NamedTuple):
    """A row's place in the chain; the chain's head is its last row's."""

    seq: int
    digest: str


START = Link(0, GENESIS)  # the head before any row


# -- what is hashed and signed ----------------------------------------------------------------
def canonical(record: dict, skip: tuple[str, ...] = ("digest",)) -> bytes:
    """A row as the bytes its digest covers. NULL columns are left out, so a column that a later
    migration adds (NULL in old rows) does not change the digests of rows written before it."""
    kept = {k: v for k, v in record.items() if v is not None and k not in skip}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def row_digest(previous: str, row: dict) -> str:
    return hashlib.sha256(previous.encode() + b"\n" + canonical(row)).hexdigest()


def signed_payload(record: dict) -> bytes:
    """What the signature of a checkpoint or a head covers: all of it but the signature (and a row's id)."""
    return canonical(record, skip=("id", "signature"))


def next_link(head: Link, row: dict) -> Link:
    """The place of a just-finished row: the next seq after ``head``, and its digest over ``head`` and itself."""
    seq = head.seq + 1
    return Link(seq, row_digest(head.digest, row | {"seq": seq}))


# -- what the service writes --------------------------------------------------------------------
class Chain:
    """The writer's side of the chain: the head each new row links to, the checkpoints it signs, its head file.

    ``key`` signs a checkpoint every ``checkpoint_rows`` rows (0: only at shutdown and pruning) and,
    given ``head_path``, the head file after every row. Without a key rows are still chained, unsigned.
    """

    def __init__(self, key: AuditKey | None = None, checkpoint_rows: int = 0, head_path: Path | None = None):
        self.key, self.checkpoint_rows = key, checkpoint_rows
        self.head_file = SignedHead(head_path, key) if key and head_path else None

    def head_of(self, last_row: tuple | None, last_checkpoint: tuple | None) -> Link:
        """Where the next row links: the last chained row's (seq, digest); after pruning everything, the last
        checkpoint's.

        Where the signed head is further on, rows were deleted from the end: the chain goes on from the
        signed head, so that the gap stays in the log for ``logs verify`` to report.
        """
        signed = (self.head_file.seq, self.head_file.digest) if self.head_file is not None else None
        candidates = [tuple(c) for c in (last_row, last_checkpoint, signed) if c is not None]
        return Link(*max(candidates)) if candidates else START

    def checkpoint(self, reason: str, head: Link, pruned_rows: int = 0) -> dict:
        """A signed checkpoint row that vouches for the chain up to ``head``."""
        checkpoint = {"time": utcnow(), "seq": head.seq, "digest": head.digest, "reason": reason,
                      "pruned_rows": pruned_rows, "public_key": self.key.public_key}
        checkpoint["signature"] = self.key.sign(signed_payload(checkpoint))
        return checkpoint

    def due_checkpoint(self, link: Link) -> dict | None:
        """The checkpoint signed every ``checkpoint_rows`` rows, where the row at ``link`` is one of them."""
        if self.key and self.checkpoint_rows and link.seq % self.checkpoint_rows == 0:
            return self.checkpoint("every %d rows" % self.checkpoint_rows, link)
        return None

    def start_checkpoints(self, head: Link, began: bool) -> list[dict]:
        """What the service's start signs about its head file; ``began``: a checkpoint marks that the file began.

        A log from before the head file (an upgrade) just gets one. Where one was written before, its
        absence means it was deleted: a signed checkpoint says so for good, since the new file made now
        could not show what was cut before it.
        """
        checkpoints = []
        if began and self.head_file.seq == 0 and head.seq > 0:
            log.warning("the audit chain's signed head %s is missing or not this box's: it was deleted or "
                        "replaced; recorded, and 'appliance logs verify' reports it", self.head_file.path)
            checkpoints.append(self.checkpoint(HEAD_MISSING, head))
        if not began:
            checkpoints.append(self.checkpoint(HEAD_BEGINS, head))
        return checkpoints

    def warn_if_cut(self, end: int) -> None:
        """At the start: where the log ends (``end``: its last seq, or the last pruned) before the signed head."""
        if self.head_file is not None and self.head_file.seq > end:
            log.warning("the request log ends at seq %d but its signed head says seq %d: rows were deleted from the "
                        "end (or an older copy of logs.db was put back); the chain goes on after seq %d, and "
                        "'appliance logs verify' reports the gap", end, self.head_file.seq, self.head_file.seq)

    def advance(self, head: Link | None) -> None:
        """After the commit: the signed head file follows the chain."""
        if self.head_file is not None and head is not None:
            self.head_file.advance(*head)


# -- the signed head file -------------------------------------------------------------------------
class SignedHead:
    """The chain's newest (seq, digest), signed, in a file beside the database, rewritten after each row.

    It is what catches rows deleted from the end between two checkpoints: the file says how far the chain
    went, and only the key can sign a shorter one. It is written after the row's transaction commits, so
    a crash may leave it behind the log; only a power cut that loses the log's last commits (WAL with
    synchronous=NORMAL) leaves it ahead, and then those rows are indeed lost and verify says so.
    """

    def __init__(self, path: Path, key: AuditKey):
        self.path, self.key = Path(path), key
        self._lock = threading.Lock()
        self.seq, self.digest = START
        current = read_head(self.path)
        if current is not None and head_valid(current, key.public_key):
            self.seq, self.digest = current["seq"], current["digest"]
        elif current is not None:
            log.warning("%s is not a head this box signed: it is ignored, and the next row replaces it "
                        "('appliance logs verify' reports it until then)", self.path)

    def advance(self, seq: int, digest: str) -> None:
        with self._lock:
            if seq <= self.seq:
                return  # another thread got there with a newer row
            head = {"seq": seq, "digest": digest, "time": utcnow(), "public_key": self.key.public_key}
            head["signature"] = self.key.sign(signed_payload(head))
            try:
                self._replace(json.dumps(head).encode())
            except OSError as exc:  # the row is committed; only the head lags, as after a crash
                log.warning("the audit chain's signed head was not written: %s", exc)
                return
            self.seq, self.digest = seq, digest

    def _replace(self, data: bytes) -> None:
        """Whole or not at all, through a scratch file of this writer's own (the service and 'appliance chat'
        may both write)."""
        fd, scratch = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(scratch, 0o644)  # readable by 'logs verify' as another user, like the public key
            os.replace(scratch, self.path)
        except BaseException:
            Path(scratch).unlink(missing_ok=True)
            raise


def read_head(path: Path) -> dict | None:
    """The head file's content; None when there is none, or it cannot be read or parsed."""
    try:
        head = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None


def head_valid(head: dict, public_key: str) -> bool:
    """Whether a head has the right shape and carries the key's signature."""
    seq, digest = head.get("seq"), head.get("digest")
    if not (type(seq) is int and 0 <= seq < 2**62 and isinstance(digest, str) and len(digest) == 64):
        return False
    return head.get("public_key") == public_key and signature_valid(public_key, signed_payload(head),
                                                                    head.get("signature"))
