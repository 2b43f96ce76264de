"""The request log as an audit trail: chain, checkpoints, verify, retention, redaction (appliance.audit)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from appliance.audit.chain import HEAD_FILE, read_head, row_digest
from appliance.audit.keys import AuditKey, trusted_public_key
from appliance.audit.redaction import TextPolicy
from appliance.audit.verify import verify_log
from appliance.config import Retention
from appliance.db import Database


def sqlite_shell(path, sql: str) -> None:
    """What someone with shell access to the box would do: the sqlite3 shell where it is installed."""
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", str(path), sql], check=True, capture_output=True)
    else:  # the same statement through the same library
        with sqlite3.connect(path) as conn:
            conn.executescript(sql)


@pytest.fixture
def audited(tmp_path):
    """A log with an audit key, and a way to add finished rows to it."""
    key = AuditKey.load_or_create(tmp_path)
    db = Database(tmp_path / "logs.db", audit_key=key, checkpoint_rows=5)

    def add(n: int) -> list[int]:
        ids = []
        for i in range(n):
            rid = db.start_request("/v1/chat/completions", "10.0.0.7", prompt=f"question {i}", key_id="abc")
            db.finish_request(rid, status=200, response=f"answer {i}", completion_tokens=i, total_ms=12.5)
            ids.append(rid)
        return ids

    yield db, key, add
    db.close()


def head_of(path) -> dict | None:
    """The signed head file beside a log."""
    return read_head(path.parent / HEAD_FILE)


def verify(db, key, **options):
    return verify_log(Database(db.path, readonly=True), key.public_key, **options)


def test_an_untouched_log_verifies_and_checkpoints_are_signed(audited):
    db, key, add = audited
    add(12)
    result = verify(db, key)
    assert result.ok, result.problems
    assert (result.rows, result.first_seq, result.last_seq) == (12, 1, 12)
    assert [c["seq"] for c in db.checkpoints()] == [0, 5, 10]  # the head file's start, then one every 5 rows
    assert result.signed_through == 12 and result.unsigned_tail == 0  # and the signed head after every row
    assert head_of(db.path)["seq"] == 12
    db.close()  # shutdown signs a checkpoint of the head
    reader = Database(db.path, readonly=True)
    assert [c["seq"] for c in reader.checkpoints()] == [0, 5, 10, 12] and verify(db, key).ok


def test_an_update_with_the_sqlite3_shell_is_caught_and_located(audited):
    db, key, add = audited
    ids = add(8)
    sqlite_shell(db.path, f"UPDATE requests SET response = 'something else' WHERE id = {ids[3]};")
    result = verify(db, key)
    assert not result.ok
    assert result.problems == [f"row id {ids[3]} (seq 4) was changed after it was written: "
                               "its content no longer matches its digest"]


def test_a_delete_in_the_middle_is_caught_and_located(audited):
    db, key, add = audited
    ids = add(8)
    sqlite_shell(db.path, f"DELETE FROM requests WHERE id IN ({ids[2]}, {ids[3]});")
    result = verify(db, key)
    assert result.problems == [f"row(s) seq 3 to 4 missing before row id {ids[4]} (seq 5): deleted"]


def test_a_delete_at_the_end_is_caught_by_the_signed_head(audited):
    db, key, add = audited
    ids = add(8)  # the last checkpoint is at row 5
    sqlite_shell(db.path, f"DELETE FROM requests WHERE id IN ({ids[-2]}, {ids[-1]});")
    assert verify(db, key).problems == ["row(s) seq 7 to 8 missing at the end: the signed head says the chain "
                                        "reached seq 8: deleted (or lost in a power cut)"]
    # Without the head file only the checkpoints speak: rows up to the last one.
    (db.path.parent / HEAD_FILE).unlink()
    sqlite_shell(db.path, f"DELETE FROM requests WHERE id IN ({ids[4]}, {ids[5]});")
    assert verify(db, key).problems[0] == "row(s) seq 5 missing at the end: checkpoint 2 signed seq 5: deleted"


def test_rows_cut_from_the_end_stay_a_gap_after_the_service_goes_on(audited, caplog):
    db, key, add = audited
    ids = add(3)
    db.close()
    sqlite_shell(db.path, f"DELETE FROM requests WHERE id = {ids[-1]};")
    reopened = Database(db.path, audit_key=key)  # the service starts again, and serves
    assert "ends at seq 2 but its signed head says seq 3" in caplog.text
    rid = reopened.start_request("/v1/completions", "127.0.0.1")
    reopened.finish_request(rid, status=200)
    assert reopened.get_request(rid)["seq"] == 4
    assert verify(reopened, key).problems == [f"row(s) seq 3 missing before row id {rid} (seq 4): deleted"]
    reopened.close()


def test_a_log_pruned_to_nothing_verifies(audited):
    db, key, add = audited
    add(4)
    sqlite_shell(db.path, "UPDATE requests SET finished = '2020-01-01T00:00:00.000+00:00';")
    assert db.prune(Retention(days=1)) == 4 and db.recent_requests() == []
    assert verify(db, key).ok, verify(db, key).problems


def test_a_log_from_before_the_head_file_gets_one_when_the_service_starts(audited):
    db, key, add = audited
    add(3)
    db.close()
    (db.path.parent / HEAD_FILE).unlink()  # as the previous release left the data folder and its log
    sqlite_shell(db.path, "DELETE FROM audit_checkpoints WHERE reason = 'head file begins';")
    assert "is missing" in verify(db, key).problems[0]
    Database(db.path, audit_key=key).close()  # the service starts (and stops)
    assert head_of(db.path)["seq"] == 3 and verify(db, key).ok


def test_a_head_file_deleted_with_the_newest_rows_is_recorded_when_the_service_starts(audited):
    db, key, add = audited
    ids = add(3)
    db.close()
    (db.path.parent / HEAD_FILE).unlink()
    sqlite_shell(db.path, f"DELETE FROM requests WHERE id = {ids[-1]}; DELETE FROM audit_checkpoints WHERE seq = 3;")
    Database(db.path, audit_key=key).close()
    assert "was missing or replaced when the service started" in verify(db, key).problems[0]


@pytest.mark.parametrize("content", ['{"seq": "3"}', "[1, 2]", "not json", '{"seq": 99999999999999999999999}'])
def test_a_head_file_that_is_not_the_boxs_does_not_stop_the_service(audited, content, caplog):
    db, key, add = audited
    add(2)
    db.close()
    (db.path.parent / HEAD_FILE).write_text(content)
    reopened = Database(db.path, audit_key=key)  # starts, says so, and signs the head anew
    assert "it was deleted or replaced" in caplog.text
    rid = reopened.start_request("/v1/completions", "127.0.0.1")
    reopened.finish_request(rid, status=200)
    assert head_of(db.path)["seq"] == 3
    [problem] = verify(db, key).problems  # for good: rows cut before the new head would not show
    assert problem.startswith(f"the signed head {HEAD_FILE} was missing or replaced when the service started")
    reopened.close()


def test_an_edited_head_file_is_caught(audited):
    db, key, add = audited
    add(3)
    head = head_of(db.path)
    (db.path.parent / HEAD_FILE).write_text(json.dumps(head | {"seq": 2}))
    assert verify(db, key).problems == [f"the signed head {HEAD_FILE} does not carry a valid signature of the "
                                        "trusted key: it was edited"]


def test_a_rewritten_chain_fails_at_its_signed_checkpoint(audited):
    """Recomputing every digest after an edit (sha256 has no key) does not get past a signed head."""
    db, key, add = audited
    ids = add(7)
    sqlite_shell(db.path, f"UPDATE requests SET response = 'forged' WHERE id = {ids[1]};")
    with sqlite3.connect(db.path) as conn:
        conn.row_factory = sqlite3.Row
        previous = "0" * 64
        for row in conn.execute("SELECT * FROM requests ORDER BY seq").fetchall():
            digest = row_digest(previous, dict(row))
            conn.execute("UPDATE requests SET digest = ? WHERE id = ?", [digest, row["id"]])
            previous = digest
    problems = verify(db, key).problems
    assert problems == [f"row id {ids[4]} (seq 5) differs from the signed checkpoint 2: the chain up to it was rewritten",
                        f"row id {ids[6]} (seq 7) differs from the signed head: the chain up to it was rewritten"]


def test_an_edited_checkpoint_or_another_key_is_caught(audited, tmp_path):
    db, key, add = audited
    add(5)
    sqlite_shell(db.path, "UPDATE audit_checkpoints SET seq = 4;")
    assert any("signature that does not match" in p for p in verify(db, key).problems)
    other = AuditKey.load_or_create(tmp_path / "elsewhere")
    assert any("signed by another key" in p for p in verify_log(Database(db.path, readonly=True),
                                                                  other.public_key).problems)


def test_finished_rows_are_not_changed_by_later_writes(audited):
    db, key, add = audited
    [rid] = add(1)
    db.update_request(rid, error="late")
    db.finish_request(rid, status=500)
    assert db.get_request(rid)["status"] == 200 and db.get_request(rid)["error"] is None
    assert verify(db, key).ok


def test_a_recomputed_chain_with_its_newest_checkpoints_deleted_is_caught(audited):
    """Deleting the signed heads that would expose a rewrite leaves an unsigned end longer than the interval."""
    db, key, add = audited
    ids = add(14)  # checkpoints at 5 and 10
    sqlite_shell(db.path, f"UPDATE requests SET response = 'forged' WHERE id = {ids[6]}; "
                          "DELETE FROM audit_checkpoints WHERE seq = 10;")
    with sqlite3.connect(db.path) as conn:
        conn.row_factory = sqlite3.Row
        previous = conn.execute("SELECT digest FROM requests WHERE seq = 6").fetchone()[0]
        for row in conn.execute("SELECT * FROM requests WHERE seq >= 7 ORDER BY seq").fetchall():
            previous = row_digest(previous, dict(row))
            conn.execute("UPDATE requests SET digest = ? WHERE id = ?", [previous, row["id"]])
    assert verify(db, key).problems == [f"row id {ids[-1]} (seq 14) differs from the signed head: the chain up to "
                                        "it was rewritten"]
    (db.path.parent / HEAD_FILE).unlink()  # and the head goes too
    problems = verify(db, key, checkpoint_rows=5).problems
    assert problems == [f"the signed head {HEAD_FILE} is missing: it was deleted, and rows deleted from the end "
                        "since the last checkpoint would not show",
                        "9 rows after seq 5 are not signed, but a checkpoint comes every 5 rows: checkpoints "
                        "were deleted (or audit_checkpoint_rows was lowered)"]


def test_a_row_inserted_behind_the_services_back_is_caught(audited):
    db, key, add = audited
    add(3)
    sqlite_shell(db.path, "INSERT INTO requests (started, finished, endpoint, status) "
                          "VALUES ('2026-12-01', '2026-12-01', '/v1/completions', 200);")
    [problem] = verify(db, key).problems
    assert problem.endswith("is finished but has no place in the chain: it was added behind the service's back")


def test_verify_reads_one_snapshot_while_the_service_prunes(audited):
    db, key, add = audited
    add(12)
    reader = Database(db.path, readonly=True)
    checkpoints = reader.checkpoints

    def prune_meanwhile():  # the retention worker prunes between verify's reads
        found = checkpoints()
        db.prune(Retention(rows=2))
        return found

    reader.checkpoints = prune_meanwhile
    result = verify_log(reader, key.public_key.upper())  # a key in capitals is the same key
    assert result.ok and (result.first_seq, result.last_seq) == (1, 12), result.problems
    assert verify(db, key).first_seq == 11


def test_pruning_goes_in_batches_each_behind_its_checkpoint(audited):
    db, key, add = audited
    add(10)
    assert db.prune(Retention(rows=1), batch=3) == 9
    assert [c["pruned_rows"] for c in db.checkpoints() if c["reason"] == "prune"] == [3, 3, 3]
    assert verify(db, key).ok


def test_a_clock_stepped_back_prunes_no_newer_row(audited):
    db, key, add = audited
    ids = add(3)
    old = "2020-01-01T00:00:00.000+00:00"
    sqlite_shell(db.path, f"UPDATE requests SET finished = '{old}' WHERE id IN ({ids[0]}, {ids[2]});")
    assert db.prune(Retention(days=30)) == 1  # the second row is young: the third, stamped old, stays behind it


def test_a_writer_beside_the_service_never_makes_the_key(tmp_path):
    from appliance.config import load_settings

    settings = load_settings(overrides={"home": tmp_path}, environ={})
    beside = Database.from_settings(settings, service=False)  # appliance chat before the service ever ran
    assert beside.audit_key is None and not (tmp_path / "audit-key.pem").exists()
    beside.close()
    service = Database.from_settings(settings)
    assert service.audit_key is not None and (tmp_path / "audit-key.pem").exists()
    service.close()
    assert Database.from_settings(settings, service=False).audit_key.public_key == service.audit_key.public_key


def test_rows_closed_at_startup_join_the_chain(tmp_path):
    key = AuditKey.load_or_create(tmp_path)
    db = Database(tmp_path / "logs.db", audit_key=key)
    db.start_request("/v1/completions", "127.0.0.1", prompt="cut off")
    db.db.conn.close()  # killed: no shutdown
    reopened = Database(tmp_path / "logs.db", audit_key=key)
    [row] = reopened.recent_requests()
    assert row["status"] == 500 and row["seq"] == 1
    assert verify_log(reopened, key.public_key).ok


def test_pruning_by_rows_keeps_the_chain_verifiable(audited):
    db, key, add = audited
    ids = add(12)
    assert db.prune(Retention(rows=4)) == 8
    assert [r["id"] for r in reversed(db.recent_requests())] == ids[8:]
    result = verify(db, key)
    assert result.ok, result.problems
    assert (result.first_seq, result.last_seq) == (9, 12)
    add(3)  # the chain goes on after a prune
    assert verify(db, key).ok
    assert db.prune(Retention(rows=4)) == 3 and verify(db, key).ok
    # Deleting the first row left after pruning still shows.
    sqlite_shell(db.path, "DELETE FROM requests WHERE seq = (SELECT MIN(seq) FROM requests);")
    assert verify(db, key).problems[0].startswith("row(s) seq 12 missing")


def test_pruning_by_age_and_size(audited):
    db, key, add = audited
    add(6)
    sqlite_shell(db.path, "UPDATE requests SET finished = '2020-01-01T00:00:00.000+00:00' WHERE seq <= 4;")
    assert db.prune(Retention(days=30)) == 4  # the edit is gone with the rows it touched
    assert verify(db, key).ok
    big = "x" * 50_000
    for _ in range(40):
        rid = db.start_request("/v1/completions", "127.0.0.1", prompt=big)
        db.finish_request(rid, status=200)
    assert db.prune(Retention(megabytes=0.5)) > 0
    assert db._used_bytes() <= 0.5 * 2**20
    assert verify(db, key).ok


def test_everything_pruned_then_new_rows_chain_on(audited):
    db, key, add = audited
    add(3)
    assert db.prune(Retention(rows=1)) == 2
    sqlite_shell(db.path, "UPDATE requests SET finished = '2020-01-01T00:00:00.000+00:00';")
    db.prune(Retention(days=1))
    assert db.recent_requests() == []
    add(2)
    result = verify(db, key)
    assert result.ok and (result.first_seq, result.last_seq) == (4, 5)


def test_redaction_and_cap_keep_the_sha256_of_the_whole_text(tmp_path):
    policy = TextPolicy(patterns=[r"\b\d{3}-\d{2}-\d{4}\b", r"(?i)password: \S+"], max_chars=40)
    db = Database(tmp_path / "logs.db", text_policy=policy)
    prompt = "my ssn is 123-45-6789 and Password: hunter2, thanks " + "." * 50
    rid = db.start_request("/v1/completions", "127.0.0.1", prompt=prompt)
    db.finish_request(rid, status=200, response="noted 987-65-4321")
    row = db.get_request(rid)
    assert row["prompt"] == "my ssn is [REDACTED] and [REDACTED] than"
    assert row["response"] == "noted [REDACTED]"
    assert row["redactions"] == 3 and row["text_cap"] == 40
    assert (row["prompt_chars"], row["response_chars"]) == (len(prompt), len("noted 987-65-4321"))
    assert row["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    assert "123-45-6789" not in (tmp_path / "logs.db").read_bytes().decode("latin-1")


def test_log_text_off_keeps_only_hashes_and_lengths(tmp_path):
    db = Database(tmp_path / "logs.db", store_text=False, text_policy=TextPolicy(max_chars=10))
    rid = db.start_request("/v1/completions", "127.0.0.1", prompt="a secret")
    db.finish_request(rid, status=200, response="another")
    row = db.get_request(rid)
    assert row["prompt"] is None and row["response"] is None and row["text_cap"] is None
    assert row["prompt_chars"] == 8 and row["response_sha256"] == hashlib.sha256(b"another").hexdigest()


def test_a_bad_redaction_pattern_is_a_config_error(tmp_path):
    from appliance.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="log_redact.*unterminated"):
        load_settings(overrides={"home": tmp_path, "log_redact": ["(unclosed"]}, environ={})


def test_the_key_file_is_private_and_the_public_key_is_beside_it(tmp_path):
    key = AuditKey.load_or_create(tmp_path)
    assert (tmp_path / "audit-key.pem").stat().st_mode & 0o777 == 0o600
    assert trusted_public_key(tmp_path) == key.public_key
    assert AuditKey.load_or_create(tmp_path).public_key == key.public_key  # loaded, not replaced


def test_logs_verify_command(audited, tmp_path):
    db, key, add = audited
    ids = add(6)
    db.close()

    def run(*args):
        return subprocess.run([sys.executable, "-m", "appliance", "logs", "verify", "--home", str(tmp_path), *args],
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})

    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert "OK   6 chained row(s) (seq 1 to 6), signed through seq 6; 0 not yet signed, 0 still open" in ok.stdout
    sqlite_shell(db.path, f"UPDATE requests SET status = 404 WHERE id = {ids[2]};")
    bad = run("--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["problems"] == [f"row id {ids[2]} (seq 3) was changed after it was written: "
                                                  "its content no longer matches its digest"]


# -- on a real service ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_served_log_verifies_catches_tampering_and_survives_retention(tmp_path):
    """The real service with the real model and the openai client; tampering with the sqlite3 shell."""
    import openai

    from tests.helpers import MODEL, start_service

    home = tmp_path / "home"
    redact = {"APPLIANCE_LOG_REDACT": '["\\\\b\\\\d{4}-\\\\d{4}-\\\\d{4}-\\\\d{4}\\\\b"]'}  # card numbers

    def verify_cli(*args):
        return subprocess.run([sys.executable, "-m", "appliance", "logs", "verify", "--home", str(home), *args],
                              capture_output=True, text=True)

    service = start_service(home, extra_env=redact)
    client = openai.OpenAI(base_url=service.url + "/v1", api_key="x", max_retries=0, timeout=120)
    client.chat.completions.create(model=MODEL, max_tokens=8,
                                   messages=[{"role": "user", "content": "my card is 4111-1111-1111-1111"}])
    for chunk in client.chat.completions.create(model=MODEL, max_tokens=8, stream=True,
                                                messages=[{"role": "user", "content": "Say hi"}]):
        pass
    client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    client.models.list()  # not logged
    assert service.stop() == 0
    rows = service.rows()
    assert [r["seq"] for r in rows] == [1, 2, 3, 4] and rows[-1]["status"] == 400
    assert "4111" not in rows[0]["prompt"] and "[REDACTED]" in rows[0]["prompt"] and rows[0]["redactions"] == 1
    assert all(r["prompt_sha256"] and r["client"] == "127.0.0.1" for r in rows[:3])
    ok = verify_cli()
    assert ok.returncode == 0 and "4 chained row(s) (seq 1 to 4), signed through seq 4" in ok.stdout, ok.stdout

    sqlite_shell(service.db_path, f"UPDATE requests SET completion_tokens = 1 WHERE id = {rows[2]['id']};")
    tampered = verify_cli()
    assert tampered.returncode == 1 and f"row id {rows[2]['id']} (seq 3) was changed" in tampered.stdout
    sqlite_shell(service.db_path, f"DELETE FROM requests WHERE id = {rows[1]['id']};")
    assert "row(s) seq 2 missing" in verify_cli().stdout

    # Retention keeps the newest row (pruning runs at start, then every minute): the rows tampered with go.
    service = start_service(home, extra_env={"APPLIANCE_LOG_KEEP_ROWS": "1"})
    client = openai.OpenAI(base_url=service.url + "/v1", api_key="x", max_retries=0, timeout=120)
    client.completions.create(model=MODEL, prompt="Three, four,", max_tokens=4)
    assert service.stop() == 0
    assert [r["seq"] for r in service.rows()] == [4, 5]
    result = json.loads(verify_cli("--json").stdout)
    assert result["ok"] and (result["first_seq"], result["last_seq"], result["signed_through"]) == (4, 5, 5), result

    # The newest row deleted: the signed head and the shutdown checkpoint both still name it.
    sqlite_shell(service.db_path, "DELETE FROM requests WHERE seq = 5;")
    cut = verify_cli()
    assert cut.returncode == 1 and "row(s) seq 5 missing at the end" in cut.stdout, cut.stdout


def test_an_older_log_joins_the_chain_when_it_upgrades(tmp_path):
    import sqlite_utils

    from appliance.migrations import migrations

    path = tmp_path / "logs.db"
    old = sqlite_utils.Database(path)
    migrations.apply(old, stop_before="m004_audit")  # the log as the previous release left it
    for i in range(3):
        old["requests"].insert({"started": f"2026-11-0{i + 1}", "finished": f"2026-11-0{i + 1}",
                                "endpoint": "/v1/completions", "status": 200, "prompt": f"old {i}"})
    old["requests"].insert({"started": "2026-11-04", "endpoint": "/v1/completions"})  # cut off by a kill
    old.close()
    key = AuditKey.load_or_create(tmp_path)
    db = Database(path, audit_key=key)
    rows = list(reversed(db.recent_requests()))
    assert [r["seq"] for r in rows] == [1, 2, 3, 4] and rows[3]["status"] == 500  # closed at start, then chained
    db.close()
    result = verify_log(Database(path, readonly=True), key.public_key)
    assert result.ok and result.signed_through == 4, result.problems
