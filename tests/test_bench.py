"""Committed benchmark results are exactly what the benchmark code writes from the committed data, and
bench/results/ stays readable: every folder in the index, no manifest of files that are not in git."""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess

import pytest

from bench.common import verdict
from bench.results import RESULTS, ROOT, index_markdown, load_runs, record, summary_markdown


def latest_run_with_data(benchmark: str):
    """The newest run of a benchmark that kept its report.json, as a folder."""
    run = [r for r in load_runs()[benchmark] if "report.json" in r["reports"]][-1]
    return RESULTS / benchmark / "runs" / run["run"]


@pytest.mark.parametrize("name", ["overhead", "power", "peer_server", "load"])
def test_committed_report_is_what_the_bench_writes(name):
    if name in ("overhead", "peer_server"):  # they drive llama.cpp directly
        pytest.importorskip("llama_cpp")
    module = importlib.import_module(f"bench.{name}")
    run = latest_run_with_data(name)
    data = json.loads((run / "report.json").read_text())
    if name == "power":  # its medians are worked out from the cycles on the way to the report
        data = module.report_data(data["meta"], data["cycles"], data["idle"], data["import_floor"])
    assert module.markdown(data) == (run / "report.md").read_text(), f"re-run python -m bench.{name}, or re-render its report"


def test_a_verdict_needs_the_middle_half_of_the_rounds_on_one_side():
    assert verdict([0.98, 1.02], 0.97) == "✅"
    assert verdict([0.90, 0.96], 0.97) == "❌"
    assert verdict([0.95, 1.01], 0.97) == "(within noise)"


def test_the_export_report_is_what_the_bench_writes_from_the_committed_reports():
    from bench.export_smollm2 import committed_published, committed_reports, report_markdown, run_folders

    expected = report_markdown(committed_reports(), committed_published())
    assert (run_folders()[-1] / "report.md").read_text() == expected, "re-run python -m bench.export_smollm2"


def test_the_load_bench_counts_lost_rows_and_sums_a_level():
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
            "servers": {"appliance": {"command": "python -m appliance serve", "note": ""}},
            "command": "python -m bench.load"}
    data = {"meta": meta, "runs": runs}
    text = load.markdown(data)
    assert "| 4 | appliance | 10.0 | 1.00 | 7.5 | 1.00 | 200 | 1.00 | 298 | 1 | 3 |" in text  # per-stream ratio too
    assert "- 4 clients: aggregate ✅, TTFT ✅, no errors or lost rows ❌" in text
    assert load.figure(data) == "aggregate 1.00x llama-server's at 4 clients, TTFT p50 1.00-1.00x; 1 errors, 3 lost rows"


def test_a_run_is_recorded_with_its_provenance_and_the_pages_follow(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights")
    root = tmp_path / "results"
    run = record("demo", about="what it measures", goal="at least 1.0x", figure="1.05x", command="python -m bench.demo",
                 report="# demo\n", data={"ratio": 1.05}, inputs=[model], label="try", root=root)
    meta = json.loads((run / "run.json").read_text())
    assert run.parent == root / "demo" / "runs" and run.name == f"{meta['date']}-try"
    assert meta["inputs"] == [{"path": str(model), "sha256": hashlib.sha256(b"weights").hexdigest()}]
    assert meta["command"] == "python -m bench.demo" and meta["commit"] and meta["machine"]["cpu"]
    assert (meta["report"], meta["reports"]) == ("report.md", ["report.md", "report.json"])
    assert json.loads((run / "report.json").read_text()) == {"ratio": 1.05}
    again = record("demo", about="what it measures", goal="at least 1.0x", figure="0.99x", command="python -m bench.demo",
                   report="# demo\n", label="try", root=root)
    assert again.name == f"{meta['date']}-try-2"
    index, summary = (root / "README.md").read_text(), (root / "demo" / "summary.md").read_text()
    assert "| [demo](demo/summary.md) | what it measures | at least 1.0x | 0.99x |" in index
    assert summary.index(again.name) < summary.index(f"{run.name}/report.md") and "1.05x" in summary


def test_the_pages_are_generated_from_the_run_json_files():
    runs = load_runs()
    assert (RESULTS / "README.md").read_text() == index_markdown(runs), "run python -m bench.results"
    for name, found in runs.items():
        assert (RESULTS / name / "summary.md").read_text() == summary_markdown(name, found), name


def test_every_folder_under_the_results_is_named_in_the_index():
    index = (RESULTS / "README.md").read_text()
    folders = [path.relative_to(RESULTS).as_posix() for path in RESULTS.rglob("*") if path.is_dir()]
    assert folders and [folder for folder in folders if folder not in index] == []
    for name, found in load_runs().items():  # and each run keeps the files its run.json names
        assert all((RESULTS / name / "runs" / r["run"] / f).is_file() for r in found for f in r["reports"]), name


def test_no_manifest_under_the_results_names_a_file_git_does_not_track():
    listed = subprocess.run(["git", "ls-files", "--", RESULTS.relative_to(ROOT).as_posix()], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = set(listed.stdout.splitlines())
    absent = [f"{manifest.relative_to(ROOT)}: {entry['path']}" for manifest in RESULTS.rglob("manifest.json")
              for entry in json.loads(manifest.read_text()).get("files", [])
              if (manifest.parent / entry["path"]).relative_to(ROOT).as_posix() not in tracked]
    assert absent == []
