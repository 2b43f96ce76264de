"""Checking the request log's audit chain: every row against its digest, the checkpoints and the signed head.

What ``appliance logs verify`` runs; each problem names the row (id and seq) where it shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.audit.chain import GENESIS, HEAD_FILE, HEAD_MISSING, head_valid, read_head, row_digest, signed_payload
from appliance.audit.keys import PUBLIC_KEY_FILE, signature_valid


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
