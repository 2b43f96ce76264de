"""A full disk under the data folder: the log refuses with a typed 503 error, says why, and recovers by itself."""

from __future__ import annotations


import pytest

from appliance.db import Database
from appliance.errors import LogUnavailable
from tests.helpers import fill_disk

BIG = "x" * 512 * 1024  # more than any free room SQLite's files may have kept


def test_a_full_disk_is_log_unavailable_until_space_returns(small_disk):
    db = Database(small_disk / "logs.db")
    open_row = db.start_request("/v1/chat/completions", "127.0.0.1", prompt="before")
    filler = fill_disk(small_disk)

    with pytest.raises(LogUnavailable) as caught:
        db.start_request("/v1/chat/completions", "127.0.0.1", prompt=BIG)
    error = caught.value
    assert error.status == 503 and error.body()["error"]["type"] == "server_error"
    assert error.code == "log_unavailable" and "free disk space" in error.message and str(small_disk) in error.message
    assert db.log_error == error.message
    with pytest.raises(LogUnavailable):
        db.record_power_event(from_state="active", to_state="idle", reason="test", actions=BIG)
    reopened = Database(small_disk / "logs.db")  # a restart on a full disk still starts, and says why
    assert reopened.log_error and "free disk space" in reopened.log_error
    reopened.close()

    filler.unlink()
    row = db.start_request("/v1/chat/completions", "127.0.0.1", prompt=BIG)
    assert db.log_error is None and db.get_request(row)["prompt"] == BIG
    assert db.close_open_rows(503, "service shut down") == 2
    closed = db.get_request(open_row)
    assert closed["finished"] and closed["status"] == 503 and closed["error"] == "service shut down"
    assert db.close_open_rows(503, "service shut down") == 0
    db.close()


def test_close_open_rows_keeps_what_a_row_already_has(tmp_path):
    db = Database(tmp_path / "logs.db")
    done = db.start_request("/v1/completions", "127.0.0.1")
    db.finish_request(done, status=200)
    failing = db.start_request("/v1/completions", "127.0.0.1")
    db.update_request(failing, error="client went away")
    waiting = db.start_request("/v1/completions", "127.0.0.1")
    assert db.close_open_rows(503, "service shut down") == 2
    rows = {r["id"]: r for r in db.recent_requests(10)}
    assert rows[done]["status"] == 200 and rows[done]["error"] is None
    assert (rows[failing]["status"], rows[failing]["error"]) == (503, "client went away")
    assert (rows[waiting]["status"], rows[waiting]["error"]) == (503, "service shut down")


def test_only_storage_failures_become_log_unavailable(tmp_path):
    import sqlite3

    db = Database(tmp_path / "logs.db")
    with pytest.raises(sqlite3.OperationalError, match="no such column"):
        db.update_request(db.start_request("/v1/completions", "127.0.0.1"), no_such_column=1)
    assert db.log_error is None
