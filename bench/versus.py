"""This checkout against an earlier commit, side by side: did a change make one stream slower?

Both versions serve the same model from their own code (the older one from a git worktree in a
temporary folder, run with this venv's packages), on the same machine at the same time. Each round
sends one greedy chat to each, in alternating order, with a prompt new to both, so drift and noise on
the box hit them alike. Reports the median decode tok/s and time to first token of each, and the ratio.

    python -m bench.versus 8487f1a --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.common import PROMPTS, machine, start_server, stream_completion
from bench.results import command_line, record
from models import find_model

ROOT = Path(__file__).resolve().parent.parent


def start(source: Path, threads: int, parallel: int):
    env = {"APPLIANCE_HOME": tempfile.mkdtemp(prefix="bench-versus-"), "PYTHONPATH": str(source)}
    return start_server(lambda port: ["-m", "appliance", "serve", "--port", str(port), "--threads", str(threads),
                                      "--parallel", str(parallel)], ready_path="/readyz", extra_env=env)


def one_chat(port: int, text: str, max_tokens: int) -> tuple[float, float]:
    """(decode tok/s, time to first token in ms) of one streamed greedy chat."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    run = stream_completion(port, body, "/v1/chat/completions")
    stamps, tokens = run["stamps"], run["usage"]["completion_tokens"]
    return (tokens - 1) / (stamps[-1] - stamps[0]), (stamps[0] - run["start"]) * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the earlier commit (any git revision)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-versus-") as tmp:
        worktree = Path(tmp) / commit
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            results = run_rounds({commit: worktree, "this checkout": ROOT}, args)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    report(commit, results, args, command_line("versus", argv))


def run_rounds(sources: dict[str, Path], args) -> dict[str, list[tuple[float, float]]]:
    servers = {name: start(source, args.threads, args.parallel) for name, source in sources.items()}
    try:
        for _, port in servers.values():
            one_chat(port, "Say hello.", 8)  # not counted
        results = {name: [] for name in servers}
        names = list(servers)
        for rnd in range(args.rounds):
            for name in names if rnd % 2 == 0 else reversed(names):
                results[name].append(one_chat(servers[name][1], f"(round {rnd}) {PROMPTS[rnd % len(PROMPTS)]}",
                                              args.max_tokens))
        return results
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)


def report(commit: str, results: dict[str, list[tuple[float, float]]], args, command: str) -> None:
    medians = median_pairs(results)
    lines = [f"# This checkout against {commit}, one stream, side by side", "",
             f"`python -m bench.versus {commit} --rounds {args.rounds}` on {machine()['cpu']}: SmolLM2-135M Q4_1, "
             f"{args.threads} threads, {args.parallel} slots; each round one greedy chat of up to {args.max_tokens} "
             "tokens to each version, in alternating order, a new prompt every round.", "",
             "| version | decode tok/s, median | runs | TTFT ms, median |", "|---|---|---|---|"]
    for name, runs in results.items():
        lines.append(f"| {name} | {medians[name][0]:.1f} | {', '.join(f'{r[0]:.0f}' for r in runs)} | "
                     f"{medians[name][1]:.0f} |")
    speed, ttft = ratios(medians, commit)
    lines += ["", f"This checkout decodes at **{speed:.2f}x** the speed of {commit}, with {ttft:.2f}x its time to "
              "first token."]
    data = {"machine": machine(), "commit": commit, "rounds": args.rounds, "results": results}
    run = record("versus", about=__doc__.splitlines()[0], goal="none set: 1.0x is no change; below, the change slowed it",
                 figure=figure(data), command=command, report="\n".join(lines) + "\n", data=data,
                 inputs=[find_model("smollm2-135m-instruct").path])
    print((run / "report.md").read_text())


def median_pairs(results: dict[str, list]) -> dict[str, tuple[float, float]]:
    """(decode tok/s, TTFT ms) medians per version."""
    return {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            for name, runs in results.items()}


def ratios(medians: dict[str, tuple[float, float]], commit: str) -> tuple[float, float]:
    """This checkout's decode speed and TTFT over the earlier commit's."""
    old, new = medians[commit], medians["this checkout"]
    return new[0] / old[0], new[1] / old[1]


def figure(data: dict) -> str:
    speed, ttft = ratios(median_pairs(data["results"]), data["commit"])
    return f"this checkout decodes at {speed:.2f}x the speed of {data['commit']}, TTFT {ttft:.2f}x"


if __name__ == "__main__":
    main()
