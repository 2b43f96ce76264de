"""The committed soak report is what bench/soak.py writes from its committed data; its judgement reads the samples
the way the report says (warm-up left out, one runner generation at a time, paused samples not compared)."""

from __future__ import annotations

import json

import pytest

import bench.soak as soak
from bench.results import RESULTS, load_runs

MIB = 2**20


def test_committed_soak_report_is_what_the_bench_writes():
    runs = [r for r in load_runs().get("soak", []) if "report.json" in r["reports"]]
    if not runs:
        pytest.skip("no soak run under bench/results/soak yet: python -m bench.soak --minutes 30 --clients 16")
    run = RESULTS / "soak" / "runs" / runs[-1]["run"]
    data = json.loads((run / "report.json").read_text())
    assert soak.markdown(data) == (run / "report.md").read_text(), "re-run python -m bench.soak, or re-render its report"
    assert soak.figure(data) == runs[-1]["figure"]
    assert soak.judge(data) == data["verdict"]
    assert "report.png" in runs[-1]["reports"] and (run / "report.png").is_file()


def sample(t, http_mib, runner_pid, runner_mib, phase="load", fds=20, threads=268):
    return {"t": t, "phase": phase, "http_rss": int(http_mib * MIB), "fds": fds, "threads": threads,
            "runner_pid": runner_pid, "runner_rss": None if runner_pid is None else int(runner_mib * MIB), "done": 0}


def synthetic(http_end_mib: float = 80.0, unfinished: int = 0) -> dict:
    """A 10-minute run sampled every 10 s: a warm-up of 60 s, windows of 60 s, deep idle at 300 s."""
    samples = []
    for t in range(0, 600, 10):
        http = 100.0 if t < 60 else 80.0 + (http_end_mib - 80.0) * (t - 60) / 530  # warm-up bulge, then a trend
        if t < 300:
            samples.append(sample(t, http, 11, 500.0 if t >= 60 else 400.0))
        elif t < 320:  # clients paused, the model unloaded: no runner, and the HTTP process drops
            samples.append(sample(t, 50.0, None, None, phase="cycle", threads=267))
        else:
            samples.append(sample(t, http, 12, 300.0 if t < 380 else 520.0 + (t - 380) / 10))
    meta = {"warm_up_s": 60.0, "window_s": 60.0, "fd_spread_bound": 40, "thread_spread_bound": 4, "clients": 16,
            "minutes": 10, "elapsed_s": 600.0, "sample_every_s": 10, "hold_s": 10, "model": "m", "threads": 2,
            "weights": soak.WEIGHTS, "http_pid": 10, "date": "d", "load_average": [0.0], "load_average_end": [0.0],
            "command": "python -m bench.soak --minutes 10",
            "machine": {"cpu": "cpu", "physical_cores": 2, "logical_cpus": 2, "python": "3", "llama_cpp_python": "0"}}
    requests = {kind: {"sent": 5, "ok": 5, "errors": 0} for kind in [*soak.WEIGHTS, "power"]}
    cycles = [{"t": 300.0, "state": "deep_idle", "state_seen": "deep_idle", "runner_before": 11, "runner_after": 12,
               "wake_request_ms": 900, "error": None, "end_t": 320.0}]
    return {"meta": meta, "requests": requests, "bad_inputs": {name: 1 for name in soak.BAD_INPUTS},
            "error_samples": [], "cycles": cycles, "samples": samples, "service_exit_status": 0,
            "runners_left_running": [], "log": {"rows": 30, "unfinished": unfinished, "by_status": {"200": 30}},
            "logs_verify": {"exit_status": 0, "output": "OK"}}


def test_the_soak_judges_after_warm_up_and_per_runner_generation():
    verdict = soak.judge(synthetic())
    # The warm-up's 100 MiB and the paused samples' 50 MiB are not compared: flat at 80 MiB.
    assert verdict["http_rss"]["growth"] == 0.0 and verdict["http_rss"]["first_mib"] == 80.0
    first, second = verdict["runners"]
    assert (first["pid"], first["growth"]) == (11, 0.0)
    # The second runner's own warm-up (320-380 s, 300 MiB) is left out: 522.5 -> 538.5 MiB.
    assert (second["pid"], second["first_mib"], second["last_mib"]) == (12, 522.5, 538.5)
    assert 0.03 < second["growth"] < 0.04
    assert verdict["threads"] == {"min": 267, "max": 268, "spread": 1} and verdict["passed"]

    leaking = soak.judge(synthetic(http_end_mib=90.0, unfinished=1))
    assert leaking["http_rss"]["growth"] > 0.10 and not leaking["passed"]
    failed = [name for name, ok in leaking["checks"].items() if not ok]
    assert failed == ["HTTP process RSS growth < 10%", "0 unfinished rows"]
    text = soak.markdown(synthetic(http_end_mib=90.0))
    assert "- ❌ HTTP process RSS growth < 10%" in text and "| runner generation 2 (pid 12) | 320 - 590 |" in text
    assert soak.figure(synthetic()).startswith("✅ after warm-up RSS growth: HTTP process +0.0%, runner +0.0%, +3.1%")
