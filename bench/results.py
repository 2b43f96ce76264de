"""Where benchmark runs go, and the pages made from them: one writer for every benchmark.

    bench/results/<benchmark>/runs/<date>-<id>/run.json   the command, git commit, machine, sha256 of the inputs,
                                                          the goal and the run's headline figure
    bench/results/<benchmark>/runs/<date>-<id>/...        the run's reports (report.json the data, report.md from it)
    bench/results/<benchmark>/summary.md                  generated from the benchmark's run.json files
    bench/results/README.md                               the index, generated from all of them

A benchmark calls ``record`` once, at its end. ``python -m bench.results`` regenerates the pages (after a run
folder was copied back from another machine); ``python -m bench.results record NAME ...`` records a run for a
shell benchmark. BENCH_RESULTS puts the runs elsewhere (a lent machine's $OUT); BENCH_COMMIT names the commit
where the tree has no git (a `git archive` unpacked there).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


def record(benchmark: str, *, about: str, goal: str, figure: str, command: str, report: str | None = None,
           data: dict | None = None, files: dict[str, Path | str] | None = None, inputs=(), label: str | None = None,
           root: Path | None = None) -> Path:
    """One run of `benchmark`: its folder runs/<date>-<label or commit>/ with report.md (the text), report.json
    (the data), the other files (a name: a path to copy or a text to write) and run.json; then the benchmark's
    summary.md and the index are written again. Returns the run's folder."""
    root = results_root(root)
    commit = git_commit()
    run = new_run_folder(root / benchmark / "runs", label or commit[:7])
    files = dict(files or {})
    if report is not None:
        files = {"report.md": report, **files}
    if data is not None:
        files["report.json"] = json.dumps(data, indent=2) + "\n"
    for name, content in files.items():
        if isinstance(content, str):
            (run / name).write_text(content)
        else:
            shutil.copy(content, run / name)
    meta = {"benchmark": benchmark, "run": run.name, "date": run.name[:10],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "about": about, "goal": goal,
            "figure": figure, "command": command, "commit": commit, "machine": machine(), "inputs": sha256s(inputs),
            "report": main_report(list(files)), "reports": list(files)}
    (run / "run.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    write_pages(root)
    return run


def results_root(root: Path | None = None) -> Path:
    return Path(root or os.environ.get("BENCH_RESULTS") or RESULTS)


def command_line(module: str, argv: list[str] | None = None) -> str:
    """How a Python benchmark was started, for its run.json and its report's "Reproduce" line."""
    return " ".join(["python -m", f"bench.{module}", *(sys.argv[1:] if argv is None else argv)])


def git_commit() -> str:
    """HEAD, with -dirty when tracked files differ from it; BENCH_COMMIT where the tree has no git; else unknown."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _git(*args: str) -> str:
    return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def sha256s(paths) -> list[dict]:
    """Path and sha256 of every input file; a folder stands for every file in it."""
    found = (sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] for p in map(Path, paths))
    return [{"path": str(f), "sha256": file_sha256(f)} for f in itertools.chain.from_iterable(found)]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def new_run_folder(runs: Path, run_id: str) -> Path:
    """runs/<today, UTC>-<run_id>, with -2, -3... when that run already exists."""
    stem = f"{time.strftime('%Y-%m-%d', time.gmtime())}-{run_id}"
    for n in itertools.count(1):
        folder = runs / (stem if n == 1 else f"{stem}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue


def main_report(names: list[str]) -> str:
    """The file a run's link opens: its report.md, else its first Markdown file; none (its folder) otherwise."""
    return next((n for n in ["report.md", *names] if n in names and n.endswith(".md")), "")


# The pages: JSON is the source, these are generated from it.

def load_runs(root: Path | None = None) -> dict[str, list[dict]]:
    """Every run.json under root, by benchmark folder (sorted by name), each benchmark's runs oldest first."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(results_root(root).glob("*/runs/*/run.json")):
        run = json.loads(path.read_text())
        # Folders a run keeps beside its reports (a diagnosis's data and scripts), named in the index.
        run["folders"] = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
        runs.setdefault(path.parents[2].name, []).append(run)
    return {name: sorted(found, key=_order) for name, found in sorted(runs.items())}


def _order(run: dict):
    """When it was recorded, then its id with numbers read as numbers (run9 before run10)."""
    return run["time"], [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", run["run"])]


def summary_markdown(benchmark: str, runs: list[dict]) -> str:
    latest = runs[-1]
    lines = [f"# {benchmark}: {latest['about']}", "", f"Goal: {latest['goal']}", "",
             f"Latest ({_link(latest)}, {describe_machine(latest['machine'])}): {latest['figure']}", "",
             "| run | figure | command | commit | machine |", "|---|---|---|---|---|"]
    lines += [f"| {_link(r)} | {_cell(r['figure'])} | {_cell('`' + r['command'] + '`')} | {describe_commit(r)} | "
              f"{_cell(describe_machine(r['machine']))} |" for r in reversed(runs)]
    notes = [f"- {r['run']}: {r['notes']}" for r in reversed(runs) if r.get("notes")]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += ["", "Each run's folder holds its run.json (command, commit, machine, sha256 of its inputs) and its "
              "reports. This page is generated from the run.json files by `python -m bench.results`.", ""]
    return "\n".join(lines)


def index_markdown(runs: dict[str, list[dict]]) -> str:
    lines = ["# Benchmark results", "",
             "One folder per benchmark. A run is `<benchmark>/runs/<date>-<id>/`: its `run.json` (the command, git "
             "commit, machine, sha256 of its inputs, the goal and the run's headline figure) and its reports: "
             "`report.json` the data and `report.md` generated from it, as the benchmark wrote them, and `notes.md` "
             "where someone wrote a reading by hand. `<benchmark>/summary.md` lists the runs. This page and the "
             "summaries are generated from the run.json files by `bench/results.py` (`python -m bench.results`); "
             "every benchmark records its run through `bench.results.record`. For runs made before this layout, "
             "run.json holds what git history could recover, and `unknown` where it could not.", "",
             "| benchmark | measures | goal | latest figure | runs, newest first |", "|---|---|---|---|---|"]
    for name, found in runs.items():
        latest = found[-1]
        lines.append(f"| [{name}]({name}/summary.md) | {_cell(latest['about'])} | {_cell(latest['goal'])} | "
                     f"{_cell(latest['figure'])} | {', '.join(_link(r, f'{name}/') for r in reversed(found))} |")
    kept = [f"`{name}/runs/{r['run']}/{folder}`" for name, found in runs.items() for r in found
            for folder in r.get("folders", [])]
    if kept:
        lines += ["", f"Folders a run keeps beside its reports (a diagnosis's data and scripts): {', '.join(kept)}."]
    return "\n".join(lines + [""])


def write_pages(root: Path | None = None) -> None:
    """Every benchmark's summary.md and the index, from the run.json files."""
    root = results_root(root)
    runs = load_runs(root)
    for name, found in runs.items():
        (root / name / "summary.md").write_text(summary_markdown(name, found))
    (root / "README.md").write_text(index_markdown(runs))


def describe_machine(machine: dict | str) -> str:
    if isinstance(machine, str):
        return machine
    cpus = machine.get("logical_cpus") or machine.get("cores")
    return ", ".join([f"{machine.get('cpu', 'unknown CPU')} ({cpus} CPUs)", *machine.get("gpus", [])])


def describe_commit(run: dict) -> str:
    sha, _, dirty = run["commit"].partition("-")
    if sha == "unknown":
        return f"unknown (recorded in {run['recorded_in'][:7]})" if run.get("recorded_in") else "unknown"
    return sha[:7] + ("-" + dirty if dirty else "")


def _link(run: dict, prefix: str = "") -> str:
    """The run's main report, or its folder where it has none."""
    return f"[{run['run']}]({prefix}runs/{run['run']}/{run['report']})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate every summary.md and the index from the run.json "
                                                 "files, or record a run of a shell benchmark.")
    parser.add_argument("--root", type=Path, help="the results folder (default: bench/results, or BENCH_RESULTS)")
    sub = parser.add_subparsers(dest="action")
    rec = sub.add_parser("record", help="record a run: its run.json, reports and the pages")
    rec.add_argument("benchmark")
    for option in ("about", "goal", "figure", "command"):
        rec.add_argument(f"--{option}", required=True)
    rec.add_argument("--report", type=Path, help="the run's report.md")
    rec.add_argument("--file", type=Path, nargs="*", default=[], help="more files of the run, kept by name")
    rec.add_argument("--input", type=Path, nargs="*", default=[], help="files or folders whose sha256 go in run.json")
    rec.add_argument("--label", help="the run's id (default: the commit's first 7 characters)")
    args = parser.parse_args(argv)
    if args.action != "record":
        write_pages(args.root)
        return
    files = {"report.md": args.report.read_text()} if args.report else {}
    run = record(args.benchmark, about=args.about, goal=args.goal, figure=args.figure, command=args.command,
                 files=files | {f.name: f for f in args.file}, inputs=args.input, label=args.label, root=args.root)
    print(run)


if __name__ == "__main__":
    main()
