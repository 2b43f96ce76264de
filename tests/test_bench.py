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


@pytest.mark.parametrize("name", ["overhead", "power", "peer_server"])
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
