"""The request log as an audit trail: a hash chain, signed checkpoints, retention and redaction.

Chain. When a request row is finished it takes the next sequence number ``seq``
and ``digest = sha256(previous digest + the row)``: the row's every non-NULL
column in canonical JSON. A row changed afterwards no longer matches its digest;
a row deleted leaves a gap in ``seq``. Rows are chained in the order they finish,
which is the order they stop changing.

Signatures. sha256 has no key, so someone who edits a row could recompute every
digest after it. The service signs the chain's head (seq and digest) with an
Ed25519 key kept beside the database (``audit-key.pem``, readable by the service
only): into ``audit-head.json`` after every row, which also shows rows deleted
from the end, and as a checkpoint row every ``audit_checkpoint_rows`` rows, at
shutdown and before pruning. A rewritten chain no longer meets its signed heads.

Retention. Pruning deletes the oldest rows (lowest seq) and first writes a signed
checkpoint holding the digest of the last deleted row, so the rows left still
verify from there.

Redaction. Patterns from the config are replaced before text is stored, and
stored text is capped; the sha256 of the original text is always kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from appliance.files import write_new_file

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the "previous digest" of the first row ever
REDACTED = "[REDACTED]"
KEY_FILE = "audit-key.pem"
PUBLIC_KEY_FILE = "audit-key.pub"
HEAD_FILE = "audit-head.json"
HEAD_BEGINS = "head file begins"  # checkpoint reasons the service's start writes
HEAD_MISSING = "head file missing at start"


# -- the chain --------------------------------------------------------------------------------
def canonical(record: dict, skip: tuple[str, ...] = ("digest",)) -> bytes:
    """A row as the bytes its digest covers. NULL columns are left out, so a column that a later
    migration adds (NULL in old rows) does not change the digests of rows written before it."""
    kept = {k: v for k, v in record.items() if v is not None and k not in skip}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def row_digest(previous: str, row: dict) -> str:
    return hashlib.sha256(previous.encode() + b"\n" + canonical(row)).hexdigest()


# -- the signing key --------------------------------------------------------------------------
class AuditKey:
    """The Ed25519 key that signs checkpoints; created on first use, private part readable by its owner only."""

    def __init__(self, private_key):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._key = private_key
        # The raw public key in hex: what checkpoints and heads record and ``logs verify --public-key`` takes.
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    @classmethod
    def load_or_create(cls, home: Path) -> "AuditKey":
        """The service's key: made on its first start."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = cls.load(home)
        if key is not None:
            return key
        key = cls(Ed25519PrivateKey.generate())
        try:
            key._write(Path(home) / KEY_FILE)
        except FileExistsError:  # another process of the box made it just now
            return cls.load(home)
        return key

    @classmethod
    def load(cls, home: Path) -> "AuditKey | None":
        """The key where this user may read it; None where it is not (another user's, or not made yet)."""
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            return cls(load_pem_private_key((Path(home) / KEY_FILE).read_bytes(), password=None))
        except (FileNotFoundError, PermissionError):
            return None

    def _write(self, path: Path) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        path.parent.mkdir(parents=True, exist_ok=True)
        write_new_file(path, self._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), mode=0o600)
        (path.parent / PUBLIC_KEY_FILE).write_text(self.public_key + "\n")

    def sign(self, payload: bytes) -> str:
        return self._key.sign(payload).hex()


def signature_valid(public_key: str, payload: bytes, signature: str | None) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key)).verify(bytes.fromhex(signature or ""), payload)
        return True
    except (InvalidSignature, ValueError):
        return False


def signed_payload(record: dict) -> bytes:
    """What the signature of a checkpoint or a head covers: all of it but the signature (and a row's id)."""
    return canonical(record, skip=("id", "signature"))


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
        self.seq, self.digest = 0, GENESIS
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
            head = {"seq": seq, "digest": digest, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "public_key": self.key.public_key}
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


def trusted_public_key(home: Path) -> str | None:
    """The box's own checkpoint key, from its public key file (the private one may not be readable)."""
    path = Path(home) / PUBLIC_KEY_FILE
    return path.read_text().strip() if path.exists() else None


# -- what text is stored ------------------------------------------------------------------------
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


def check_patterns(patterns: list[str]) -> str | None:
    """The first pattern that does not compile, with why; None when all do."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            return f"{pattern!r}: {exc}"
    return None


# -- retention ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Retention:
    """How much of the log to keep; 0 means no limit of that kind."""

    days: float = 0
    rows: int = 0
    megabytes: float = 0

    @property
    def active(self) -> bool:
        return bool(self.days or self.rows or self.megabytes)

    def cutoff(self, now: datetime | None = None) -> str | None:
        """Rows finished before this time are due for pruning."""
        if not self.days:
            return None
        now = now or datetime.now(timezone.utc)
        return (now - timedelta(days=self.days)).isoformat(timespec="milliseconds")


class RetentionWorker:
    """Prunes the log at start and then every ``every`` seconds, on a thread of its own."""

    def __init__(self, db, retention: Retention, every: float = 60.0):
        self.db, self.retention, self.every = db, retention, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-retention", daemon=True)

    def start(self) -> None:
        if self.retention.active:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pruned = self.db.prune(self.retention)
                if pruned:
                    log.info("log retention: pruned %d row(s)", pruned)
            except Exception:  # a full disk, a locked file: try again next time
                log.exception("log retention: pruning failed; trying again in %.0f s", self.every)
            self._stop.wait(self.every)


# -- verification -------------------------------------------------------------------------------
@dataclass
class Verification:
    rows: int = 0  # chained rows checked
    first_seq: int | None = None
    last_seq: int | None = None
    signed_through: int | None = None  # the highest seq a valid checkpoint vouches for
    open_rows: int = 0  # rows of requests still running: chained when they finish
    chain_end: int = 0  # the seq the chain has reached, pruned rows counted
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned_tail(self) -> int:
        if self.last_seq is None:
            return 0
        return self.last_seq - (self.signed_through or 0)


def verify_log(db, public_key: str | None, checkpoint_rows: int = 0) -> Verification:
    """Walk the chain, the checkpoints and the signed head beside the file, the chain in one snapshot;
    every problem names the row (id and seq) where it shows. ``checkpoint_rows``: how often the service
    signs (the setting)."""
    public_key = public_key.lower() if public_key else None
    head = read_head(db.head_path)
    with db.snapshot():
        result = _verify(db, public_key)
        if public_key is not None:
            _check_head(db, head, public_key, result)
    if checkpoint_rows and result.unsigned_tail >= checkpoint_rows:
        # The service signs every checkpoint_rows rows, so the unsigned end is always shorter than that.
        result.problems.append(
            f"{result.unsigned_tail} rows after seq {result.signed_through or 0} are not signed, but a checkpoint "
            f"comes every {checkpoint_rows} rows: checkpoints were deleted (or audit_checkpoint_rows was lowered)")
    return result


def _verify(db, public_key: str | None) -> Verification:
    result = Verification()
    checkpoints = _checked_checkpoints(db.checkpoints(), public_key, result)
    # Where the chain left in the database must start: after the last pruning, else at seq 1.
    pruned = [c for c in checkpoints if c["pruned_rows"]]
    expected_seq, previous = (pruned[-1]["seq"] + 1, pruned[-1]["digest"]) if pruned else (1, GENESIS)
    heads = {c["seq"]: c for c in checkpoints}
    for row in db.chained_rows():
        seq = row["seq"]
        if result.first_seq is None:
            result.first_seq = seq
        if seq < expected_seq:
            result.problems.append(f"row id {row['id']} has seq {seq}, already taken or pruned: the chain forked")
            continue
        if seq > expected_seq:
            gap = f"seq {expected_seq}" if seq == expected_seq + 1 else f"seq {expected_seq} to {seq - 1}"
            result.problems.append(f"row(s) {gap} missing before row id {row['id']} (seq {seq}): deleted")
            previous = None  # unknown: resume from this row's own digest
        if previous is not None and row_digest(previous, row) != row["digest"]:
            result.problems.append(f"row id {row['id']} (seq {seq}) was changed after it was written: "
                                   "its content no longer matches its digest")
        head = heads.get(seq)
        if head is not None and head["digest"] != row["digest"]:
            result.problems.append(f"row id {row['id']} (seq {seq}) differs from the signed checkpoint "
                                   f"{head['id']}: the chain up to it was rewritten")
        previous, expected_seq = row["digest"], seq + 1
        result.rows += 1
        result.last_seq = seq
    result.chain_end = expected_seq - 1
    _check_tail(checkpoints, result, expected_seq)
    for cp in checkpoints:
        if cp["reason"] == HEAD_MISSING:
            result.problems.append(f"the signed head {HEAD_FILE} was missing or replaced when the service started at "
                                   f"{cp['time']} (checkpoint {cp['id']}, seq {cp['seq']}): rows deleted from the end "
                                   "before then would not show")
    for request_id in db.unchained_rows():
        result.problems.append(f"row id {request_id} is finished but has no place in the chain: "
                               "it was added behind the service's back")
    result.open_rows = db.open_row_count()
    return result


def _check_head(db, head: dict | None, public_key: str, result: Verification) -> None:
    """The signed head: the chain must reach it, and meet it."""
    if head is None:
        if result.chain_end:  # the service writes the head at start and after every row
            result.problems.append(f"the signed head {HEAD_FILE} is missing: it was deleted, and rows deleted from "
                                   "the end since the last checkpoint would not show")
        return
    if not head_valid(head, public_key):
        result.problems.append(f"the signed head {HEAD_FILE} does not carry a valid signature of the trusted key: "
                               "it was edited")
        return
    seq, last = head["seq"], result.chain_end
    if seq > last:
        gap = f"seq {last + 1}" if seq == last + 1 else f"seq {last + 1} to {seq}"
        result.problems.append(f"row(s) {gap} missing at the end: the signed head says the chain reached seq {seq}: "
                               "deleted (or lost in a power cut)")
        return
    row = db.chained_row(seq)
    if row is not None and row["digest"] != head["digest"]:
        result.problems.append(f"row id {row['id']} (seq {seq}) differs from the signed head: the chain up to it "
                               "was rewritten")
        return
    result.signed_through = max(result.signed_through or 0, seq)


def _checked_checkpoints(checkpoints: list[dict], public_key: str | None, result: Verification) -> list[dict]:
    """The checkpoints whose signature holds under the trusted key; the others are problems."""
    good = []
    for cp in checkpoints:
        if public_key is None:
            result.problems.append("no public key to check checkpoint signatures with: pass --public-key "
                                   f"or keep {PUBLIC_KEY_FILE} in the data folder")
            return good
        if cp["public_key"] != public_key:
            result.problems.append(f"checkpoint {cp['id']} (seq {cp['seq']}) is signed by another key "
                                   f"({cp['public_key'][:16]}...), not the trusted one")
        elif not signature_valid(public_key, signed_payload(cp), cp["signature"]):
            result.problems.append(f"checkpoint {cp['id']} (seq {cp['seq']}) has a signature that does not match: "
                                   "it was edited")
        else:
            good.append(cp)
            result.signed_through = max(result.signed_through or 0, cp["seq"])
    return good


def _check_tail(checkpoints: list[dict], result: Verification, next_seq: int) -> None:
    """A checkpoint that vouches for rows beyond the last one left: rows were deleted from the end."""
    if checkpoints and checkpoints[-1]["seq"] >= next_seq:
        last = checkpoints[-1]["seq"]
        gap = f"seq {next_seq}" if last == next_seq else f"seq {next_seq} to {last}"
        result.problems.append(f"row(s) {gap} missing at the end: checkpoint {checkpoints[-1]['id']} "
                               f"signed seq {last}: deleted")
