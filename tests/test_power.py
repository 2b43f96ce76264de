"""Low-power idle on a real service and the real model: schedule, memory, wake, one reload for many requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import requests

from appliance import power_profiles
from tests.helpers import assert_openai_error

FAST_IDLE = {"APPLIANCE_IDLE_AFTER": "1", "APPLIANCE_DEEP_IDLE_AFTER": "2.5", "APPLIANCE_POWER_PROFILE": "none"}


def status(svc) -> dict:
    return requests.get(svc.url + "/api/status", timeout=60).json()


def wait_for_state(svc, state: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = status(svc)
        if info["state"] == state:
            return info
        time.sleep(0.1)
    raise AssertionError(f"state stayed {info['state']!r}, expected {state!r}")


def complete(svc, prompt="Hello", max_tokens=4) -> requests.Response:
    return requests.post(svc.url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens}, timeout=120)


@pytest.mark.slow
def test_idle_then_deep_idle_on_schedule_then_a_request_wakes_it(fresh_service):
    svc = fresh_service(**FAST_IDLE)
    assert complete(svc).status_code == 200
    active_rss = status(svc)["system"]["rss"]
    # On a slow start the box may already have idled once before this first request woke it.
    earlier = len(svc.power_rows())

    idle = wait_for_state(svc, "idle", timeout=5)
    assert idle["model"]["loaded"], "idle keeps the model loaded"
    deep = wait_for_state(svc, "deep_idle", timeout=5)
    assert not deep["model"]["loaded"]
    assert deep["system"]["rss"] < 0.75 * active_rss, (deep["system"]["rss"], active_rss)
    assert requests.get(svc.url + "/readyz").status_code == 200, "deep idle still serves"

    reply = complete(svc, "The capital of France is", 6)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0
    woke = status(svc)
    assert woke["state"] == "active" and woke["model"]["loaded"]
    assert woke["model"]["load_count"] == 2 + sum(r["to_state"] == "active" and r["from_state"] == "deep_idle" for r in svc.power_rows()[:earlier])
    assert woke["last_wake_ms"] > 0

    rows = svc.power_rows()[earlier:]
    assert [(r["from_state"], r["to_state"]) for r in rows] == [("active", "idle"), ("idle", "deep_idle"), ("deep_idle", "active")]
    assert rows[0]["reason"].startswith("no requests") and rows[2]["reason"] == "request"
    assert rows[1]["rss_after"] < rows[1]["rss_before"]
    assert rows[2]["wake_ms"] == pytest.approx(woke["last_wake_ms"], abs=0.1)


@pytest.mark.slow
def test_eight_concurrent_requests_during_a_wake_trigger_one_reload(fresh_service):
    svc = fresh_service(APPLIANCE_POWER_PROFILE="none")
    before = status(svc)["model"]["load_count"]
    forced = requests.post(svc.url + "/api/power", json={"state": "deep_idle"}, timeout=60).json()
    assert forced["state"] == "deep_idle" and not forced["model"]["loaded"]

    codes = []
    threads = [threading.Thread(target=lambda i=i: codes.append(complete(svc, f"Item {i}:").status_code)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert codes == [200] * 8
    after = status(svc)
    assert after["model"]["load_count"] == before + 1
    wakes = [r for r in svc.power_rows() if r["to_state"] == "active"]
    assert len(wakes) == 1


@pytest.mark.slow
def test_admin_can_force_states_and_bad_requests_get_the_error_shape(service):
    url = service.url + "/api/power"
    assert requests.post(url, json={"state": "idle"}, timeout=60).json()["state"] == "idle"
    assert requests.post(url, json={"state": "active"}, timeout=60).json()["state"] == "active"
    assert_openai_error(requests.post(url, json={"state": "asleep"}), 400, "invalid_value", "state")
    assert_openai_error(requests.post(url, data="{oops", headers={"Content-Type": "application/json"}), 400, "invalid_json")
    assert_openai_error(requests.post(url, json={}), 400, "missing_field", "state")
    events = requests.get(service.url + "/api/power/events").json()["data"]
    assert events[0]["to_state"] == "active" and events[0]["reason"] == "admin request"


@pytest.mark.slow
def test_status_command_reads_the_running_service(service):
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "status", "--url", service.url], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "state      active" in out.stdout and "smollm2-135m-instruct" in out.stdout
    raw = subprocess.run(
        [sys.executable, "-m", "appliance", "status", "--url", service.url, "--json"], capture_output=True, text=True, timeout=60
    )
    assert json.loads(raw.stdout)["model"]["id"] == "smollm2-135m-instruct"


def test_status_command_without_a_service_explains():
    out = subprocess.run([sys.executable, "-m", "appliance", "status", "--url", "http://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "appliance serve" in out.stderr


# -- the power-manager thread ------------------------------------------------------


class StubPool:
    """Just enough of a model pool for the power manager; release_cache raises what is queued in .failures."""

    name, is_loaded, load_count = "stub", True, 1

    def __init__(self):
        self.on_begin, self.on_end, self.failures, self.releases = [], [], [], 0

    def ensure_loaded(self):
        pass

    def release_cache(self):
        self.releases += 1
        if self.failures:
            raise self.failures.pop()

    def unload_all(self):
        pass


def stub_power(tmp_path, **kw):
    from appliance.db import Database
    from appliance.power import PowerManager

    settings = dict(idle_after=0.05, deep_idle_after=0.1, memory_low_mb=0, sample_every=0.3, profile="none") | kw
    return PowerManager(StubPool(), Database(tmp_path / "logs.db"), **settings)


def test_the_power_manager_thread_survives_any_exception_and_tries_again(tmp_path, monkeypatch):
    power = stub_power(tmp_path)
    power.models.failures.append(RuntimeError("cache release failed"))  # the first idle attempt fails
    record = power.db.record_power_event
    failures = [OSError("event not written")]  # and then the record of the second

    def flaky_record(**event):
        if failures:
            raise failures.pop()
        return record(**event)

    monkeypatch.setattr(power.db, "record_power_event", flaky_record)
    power.start()
    try:
        deadline = time.monotonic() + 10
        # The state changes first, then its event is written: wait for both.
        while (power.state != "deep_idle" or not power.db.power_events()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert power.state == "deep_idle" and power._thread.is_alive()
        assert power.models.releases == 2  # failed once, tried again at the next sample: no busy retry loop
        assert [(e["from_state"], e["to_state"]) for e in power.db.power_events()] == [("idle", "deep_idle")]
    finally:
        power.stop()


def test_a_power_event_the_full_log_cannot_take_does_not_fail_the_change(tmp_path, monkeypatch):
    from appliance.errors import LogUnavailable

    power = stub_power(tmp_path, idle_after=60, deep_idle_after=60)

    def full(**event):
        raise LogUnavailable(tmp_path / "logs.db", "database or disk is full")

    monkeypatch.setattr(power.db, "record_power_event", full)
    power.set_state("idle", "test")
    assert power.state == "idle"


# -- power profiles ------------------------------------------------------------


def test_cpufreq_profile_writes_every_governor(tmp_path):
    for cpu in ("cpu0", "cpu1"):
        folder = tmp_path / f"sys/devices/system/cpu/{cpu}/cpufreq"
        folder.mkdir(parents=True)
        (folder / "scaling_governor").write_text("performance")
    profile = power_profiles.get_profile("linux-cpufreq")
    [result] = power_profiles.apply(profile.on_idle, root=str(tmp_path))
    assert result["ok"] and result["detail"] == "2 files"
    assert (tmp_path / "sys/devices/system/cpu/cpu1/cpufreq/scaling_governor").read_text() == "powersave"


def test_profile_reports_instead_of_failing_when_it_cannot_act(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvpmodel, no jetson_clocks here
    results = power_profiles.apply(power_profiles.get_profile("jetson").on_idle)
    assert [r["ok"] for r in results] == [False, False]
    assert "not found" in results[1]["detail"]
    [missing] = power_profiles.apply(power_profiles.get_profile("linux-cpufreq").on_idle, root=str(tmp_path))
    assert not missing["ok"] and "no such files" in missing["detail"]


def test_dry_run_records_what_would_run():
    results = power_profiles.apply(power_profiles.get_profile("jetson").on_active, dry_run=True)
    assert [r["step"] for r in results] == ["nvpmodel -m 0", "jetson_clocks"]
    assert all(r["detail"] == "dry run" for r in results)


def test_profile_command_runs_for_real(tmp_path, monkeypatch):
    tool = tmp_path / "nvpmodel"
    tool.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/called\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    [result] = power_profiles.apply((power_profiles.Command(("nvpmodel", "-m", "1")),))
    assert result["ok"]
    assert (tmp_path / "called").read_text().strip() == "-m 1"


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="linux-cpufreq"):
        power_profiles.get_profile("turbo")
