"""The log's schema, as migrations: short named functions in a list, applied in order, each once.

``sqlite_utils.Migrations`` records each one applied in the table ``_sqlite_migrations``, so a log that
any earlier release made upgrades in place when the service opens it. Migrations only add (tables,
columns), so an older build still runs on a migrated log after a rollback. A migration that has shipped
never changes: add the next one at the end.
"""

from __future__ import annotations

import sqlite_utils
from sqlite_utils import Migrations

from appliance.audit.chain import START, next_link

migrations = Migrations("appliance")


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


@migrations()
def m004_audit(db: sqlite_utils.Database):
    requests = db["requests"]
    requests.add_column("seq", int)  # place in the audit chain, given when the row is finished
    requests.add_column("digest", str)  # sha256 over the previous row's digest and this row
    requests.add_column("text_cap", int)  # most characters of each text stored when the row was written
    requests.add_column("prompt_chars", int)  # length of the text received / sent, before redaction and cap
    requests.add_column("response_chars", int)
    requests.add_column("redactions", int)  # matches of the redaction patterns replaced in the stored texts
    requests.create_index(["seq"], unique=True)
    db["api_keys"].add_column("rpm", int)  # the key's own token buckets; NULL: the service's setting
    db["api_keys"].add_column("tpm", int)
    _chain_existing_rows(db)
    db["audit_checkpoints"].create(
        {
            "id": int,
            "time": str,
            "seq": int,  # the chain's head this checkpoint vouches for (0: before any row)
            "digest": str,  # that row's digest
            "reason": str,  # every N rows, shutdown, prune
            "pruned_rows": int,  # rows deleted right after it (retention); 0 otherwise
            "public_key": str,  # hex Ed25519 key that signed it
            "signature": str,  # hex, over the other columns but id
        },
        pk="id",
    )


@migrations()
def m005_model_events(db: sqlite_utils.Database):
    db["model_events"].create(
        {
            "id": int,
            "time": str,  # ISO 8601, UTC
            "event": str,  # load, load_failed, unload, evict, expire, swap, probe_failed, restart, rollback, crash
            "model": str,
            "who": str,  # the admin key's id, or "system" (a request's load, keep-alive, deep idle, eviction)
            "duration_ms": float,
            "outcome": str,  # ok or failed
            "detail": str,  # why, or what failed
        },
        pk="id",
    )


@migrations()
def m006_request_priority(db: sqlite_utils.Database):
    # The priority class a generation or embedding ran in, for the log's filters; NULL in older rows and in rows
    # of requests that never reached the queue. The chain leaves NULL columns out, so older digests still hold.
    db["requests"].add_column("priority", str)


def _chain_existing_rows(db: sqlite_utils.Database) -> None:
    """Rows an older release finished join the chain in the order they were written, so the audit
    covers the log from the upgrade back; the first checkpoint the service signs vouches for them."""
    head = START
    finished = db.execute("SELECT id FROM requests WHERE finished IS NOT NULL ORDER BY id").fetchall()
    for (request_id,) in finished:
        head = next_link(head, db["requests"].get(request_id))
        db.execute("UPDATE requests SET seq = ?, digest = ? WHERE id = ?", [head.seq, head.digest, request_id])
