"""A full disk under the data folder: the log refuses with a typed 503 error, says why, and recovers by itself."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from appliance.db import Database
from appliance.errors import LogUnavailable

BIG = "x" * 512 * 1024  # more than any free room SQLite's files may have kept


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs of this test's own, so that filling it harms nothing else."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                                 capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command here to make a small tmpfs to fill")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    yield folder
    # Lazy: a test that failed may leave a database open on it; the kernel detaches it once closed.
    subprocess.run(["umount", "--lazy", str(folder)], check=True, timeout=30)


def fill(folder: Path) -> Path:
    """Write a file until the disk is full; deleting it frees the space again."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_a_full_disk_is_log_unavailable_until_space_returns(small_disk):
    db = Database(small_disk / "logs.db")
    open_row = db.start_request("/v1/chat/completions", "127.0.0.1", prompt="before")
    filler = fill(small_disk)

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
