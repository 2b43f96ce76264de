"""Committed benchmark reports are exactly what the benchmark code writes from the committed data."""

from __future__ import annotations

import importlib
import json

import pytest

from bench.common import verdict


def _write(module, data: dict) -> None:
    if module.__name__ == "bench.power":
        module.write_report(data["meta"], data["cycles"], data["idle"], data["import_floor"])
    else:
        module.write_report(data["meta"], data["runs"])


@pytest.mark.parametrize("name", ["overhead", "power", "peer_server", "load"])
def test_committed_report_is_what_the_bench_writes(name, tmp_path, monkeypatch):
    module = importlib.import_module(f"bench.{name}")
    committed = (module.RESULTS / f"{name}.md").read_text()
    data = json.loads((module.RESULTS / f"{name}.json").read_text())
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    _write(module, data)
    assert (tmp_path / f"{name}.md").read_text() == committed, f"re-run python -m bench.{name}, or re-render its report"


def test_a_verdict_needs_the_middle_half_of_the_rounds_on_one_side():
    assert verdict([0.98, 1.02], 0.97) == "✅"
    assert verdict([0.90, 0.96], 0.97) == "❌"
    assert verdict([0.95, 1.01], 0.97) == "(within noise)"


def test_the_export_summary_is_what_the_bench_writes_from_the_committed_reports():
    from bench.export_smollm2 import RESULTS, committed_reports, summary_markdown

    published = json.loads((RESULTS / "smollm2-vs-published.json").read_text())
    expected = summary_markdown(committed_reports(RESULTS), published)
    assert (RESULTS / "summary.md").read_text() == expected, "re-run python -m bench.export_smollm2"


def test_the_load_bench_counts_lost_rows_and_sums_a_level(tmp_path, monkeypatch):
    import bench.load as load

    rows = [{"id": 3, "finished": "t", "status": 200, "completion_tokens": 5},
            {"id": 4, "finished": None, "status": None, "completion_tokens": None},
            {"id": 5, "finished": "t", "status": 499, "completion_tokens": 2}]
    assert load.lost_rows(rows, sent=4) == {"rows": 3, "missing": 1, "unfinished": 1, "non_200": 1, "lost": 3,
                                            "logged_completion_tokens": 7}
    requests = [{"start": 0.0, "end": 2.0, "tokens": 10, "ttft_ms": 100.0, "decode_tps": 5.0},
                {"start": 1.0, "end": 4.0, "tokens": 30, "ttft_ms": 300.0, "decode_tps": 10.0},
                {"start": 0.5, "end": 1.0, "error": "HTTP 500"}]
    summary = load.summarize(requests)
    assert summary["aggregate_tps"] == 10.0  # 40 tokens over the level's 4 s, not the sum of per-stream speeds
    assert (summary["errors"], summary["ttft_p50_ms"], summary["ttft_p99_ms"]) == (1, 200.0, 298.0)

    peer = {"server": "llama-server", "clients": 4, "summary": load.summarize(requests[:2])}
    ours = {"server": "appliance", "clients": 4, "summary": summary, "log_rows": load.lost_rows(rows, 4)}
    runs = load.with_ratios([ours, peer], servers_per_round=2)
    assert runs[0]["aggregate_ratio"] == 1.0 and runs[0]["ttft_p50_ratio"] == 1.0
    faster = peer | {"summary": summary | {"aggregate_tps": 20.0}}  # a repeat of the level: its own peer
    assert [r["aggregate_ratio"] for r in load.with_ratios([ours, peer, ours, faster], 2)] == [1.0, 1.0, 0.5, 1.0]
    meta = {"model": "m.gguf", "threads": 2, "parallel": 8, "context": 4096, "requests_per_client": 2, "max_tokens": 128,
            "machine": {"cpu": "cpu", "physical_cores": 2, "logical_cpus": 2, "python": "3", "llama_cpp_python": "0"},
            "llama_server_version": "v", "date": "d", "load_average": [0.0], "load_average_end": [0.0],
            "servers": {"appliance": {"command": "python -m appliance serve", "note": ""}}, "report": "load",
            "command": "python -m bench.load"}
    monkeypatch.setattr(load, "RESULTS", tmp_path)
    text = load.write_report(meta, runs).read_text()
    assert "| 4 | appliance | 10.0 | 1.00 | 7.5 | 200 | 1.00 | 298 | 1 | 3 |" in text
    assert "- 4 clients: aggregate ✅, TTFT ✅, no errors or lost rows ❌" in text
