"""The committed Locust report is what bench/locust_load.py writes from its committed data; its CSV reading counts
served, rejected and errors the way the report says (no Locust needed: it lives in its own venv)."""

from __future__ import annotations

import json

import bench.locust_load as locust_load
from bench.results import RESULTS, load_runs


def test_committed_locust_report_is_what_the_bench_writes():
    runs = [r for r in load_runs().get("locust", []) if "report.json" in r["reports"]]
    assert runs, "no Locust run under bench/results/locust: run python -m bench.locust_load"
    run = RESULTS / "locust" / "runs" / runs[-1]["run"]
    data = json.loads((run / "report.json").read_text())
    assert locust_load.markdown(data) == (run / "report.md").read_text(), "re-run python -m bench.locust_load"
    assert locust_load.figure(data) == runs[-1]["figure"]
    assert [lv["users"] for lv in data["levels"]] == [50, 200, 500]


def test_locust_csv_is_read_into_served_rejected_and_errors(tmp_path):
    columns = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
               "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
               "99.99%,100%")
    rows = ["POST,chat,12,2,900,950,100,3000,10.5,1,0,900,0,0,0,0,0,0,2900,0,0,3000",
            "POST,rejected (429),30,0,5,6,1,20,0.0,1,0,5,0,0,0,0,0,0,19,0,0,20",
            "SSE,chat long,2,0,9000,9000,8000,10000,64.0,0,0,9000,0,0,0,0,0,0,10000,0,0,10000",
            "SSE,chat short,8,0,2000,2000,1000,3000,16.0,0,0,2000,0,0,0,0,0,0,3000,0,0,3000",
            "SSE,ttft,10,0,700,800,100,2500,0.0,0,0,700,0,0,0,0,0,0,2400,0,0,2500",
            "SSE,ttft batch,3,0,1500,1500,100,2500,0.0,0,0,1500,0,0,0,0,0,0,2500,0,0,2500",
            "WAIT,retry-after batch,30,0,4000,4500,1000,9000,0.0,0,0,4000,0,0,0,0,0,0,9000,0,0,9000",
            "GET,healthz,100,0,4,5,2,60,16.0,2,0,4,0,0,0,0,0,0,41,0,0,60",
            "GET,readyz,100,1,5,6,2,70,513.0,2,0,5,0,0,0,0,0,0,45,0,0,N/A",
            ",Aggregated,300,3,5,6,1,10000,1.0,7,0,5,0,0,0,0,0,0,3000,0,0,10000"]
    (tmp_path / "l_stats.csv").write_text("\n".join([columns, *rows]) + "\n")
    stats = locust_load.read_stats(tmp_path / "l")
    assert stats["readyz"]["max_ms"] == 70 and stats["readyz"]["failures"] == 1
    level = locust_load.level_figures(stats, duration=10, classes=["interactive", "batch"])
    assert (level["served"], level["rejected"], level["errors"]) == (10, 30, 2)
    assert (level["served_short"], level["served_long"], level["completion_tokens"]) == (8, 2, 256)
    assert level["tokens_per_s"] == 25.6 and (level["ttft_p50_ms"], level["ttft_p99_ms"]) == (700, 2400)
    assert level["by_class"]["batch"] == {"served": 3, "rejected": 30, "ttft_p50_ms": 1500, "ttft_p99_ms": 2500,
                                          "retry_after_mean_s": 4.5}
    assert level["by_class"]["interactive"]["served"] == 0  # a class Locust never reported
    assert level["healthz"] == {"requests": 100, "failures": 0, "p50_ms": 4, "p99_ms": 41, "max_ms": 60}
