"""ONNX Runtime on the CPU: the backend module of this tree against an earlier version of it (a file), same package,
same process, interleaved round by round (how the CPU's re-packing of the KV cache was chosen: numpy, not the GPU's
helper graphs; bench/results/onnx_cpu_path).

    python -m bench.onnx_cpu_path --onnx PACKAGE --old OLD_onnx_runtime.py [--threads 8] [--rounds 5]
           [--concurrency 1 8 32] [--max-tokens 64] [--label NAME]

The old module is a file, e.g. ``git show 3539ab6:appliance/backends/onnx_runtime.py > old.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from appliance.backends import onnx_runtime
from appliance.backends.base import SamplingParams
from appliance.runner import protocol as msg
from appliance.runner.scheduler import Scheduler, prepare
from bench.onnx_vs_llama import Timed
from bench.results import command_line, record

GOAL = "the step loop on the CPU no slower than before (issue 25: the GPU's path on the CPU only if it measures faster)"


def load_old(path: Path):
    spec = importlib.util.spec_from_file_location("appliance.backends.onnx_runtime_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def timed(backend, facts, n: int, tokens: int) -> float:
    """n greedy requests at once through a fresh Scheduler, end of generation ignored (each makes max_tokens);
    seconds until all are done."""
    backend = Timed(backend)
    scheduler = Scheduler(backend, facts, lambda event: None)
    params = SamplingParams(temperature=0, max_tokens=tokens)
    for rid in range(n):
        content = f"Question {rid}: describe a market, a river and a mountain."
        scheduler.inbox.put(prepare(backend, facts, msg.Submit(rid, params, messages=[{"role": "user", "content": content}])))
    start = time.perf_counter()
    while True:
        scheduler.tick()
        if not any(slot.seq for slot in scheduler.slots) and scheduler.inbox.empty():
            break
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--label")
    args = parser.parse_args(argv)
    most = max(args.concurrency)
    engines = {}
    for name, module in (("before", load_old(args.old)), ("now", onnx_runtime)):
        backend = module.OnnxRuntimeBackend(args.onnx, threads=args.threads, context_length=1024, n_slots=most,
                                            provider="cpu")
        engines[name] = (backend, backend.load())
    seconds = {name: {n: [] for n in args.concurrency} for name in engines}
    for i in range(args.rounds + 1):  # round 0 warms up and is dropped
        for name, (backend, facts) in engines.items():
            for n in args.concurrency:
                took = timed(backend, facts, n, args.max_tokens)
                if i:
                    seconds[name][n].append(took)
    medians = {name: {n: statistics.median(v) for n, v in by_n.items()} for name, by_n in seconds.items()}
    tok_s = {name: {n: round(n * args.max_tokens / s, 1) for n, s in by_n.items()} for name, by_n in medians.items()}
    ratios = {n: round(tok_s["now"][n] / tok_s["before"][n], 3) for n in args.concurrency}
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_avg": os.getloadavg()},
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "tok_s": tok_s, "ratio_now_over_before": ratios, "seconds": seconds,
              "command": command_line("onnx_cpu_path", argv)}
    lines = ["# ONNX Runtime on the CPU: this tree's step loop against an earlier one", "",
             f"`{report['command']}`, {args.threads} threads, greedy, {args.max_tokens} tokens a request, "
             f"medians of {args.rounds} rounds, interleaved.", "",
             "| requests at once | before tok/s | now tok/s | now / before |", "|---|---|---|---|"]
    lines += [f"| {n} | {tok_s['before'][n]} | {tok_s['now'][n]} | {ratios[n]:.3f} |"
              for n in args.concurrency]
    figure = "now / before: " + ", ".join(f"{ratios[n]:.2f}x at {n}" for n in args.concurrency)
    print("\n".join(lines))
    run = record("onnx_cpu_path", about=__doc__.splitlines()[0], goal=GOAL, figure=figure, command=report["command"],
                 report="\n".join(lines + ["", figure + ".", ""]), data=report, inputs=[args.onnx / "model.onnx"],
                 label=args.label)
    print("report:", run / "report.md")


if __name__ == "__main__":
    main()
