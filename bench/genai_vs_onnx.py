"""Our ONNX backend against onnxruntime-genai's own generators on the same model-builder folder: one stream, and 8 at once.

One folder written by ``onnxruntime_genai.models.builder`` (INT4, CPU), the same prompt tokens (the model's
chat template), greedy, the same thread count (ONNX Runtime's intra-op threads; one inter-op thread both
sides), end of generation ignored so every sequence decodes the same count (onnxruntime-genai: min_length),
interleaved round by round so both see the same machine state, each side first in turn; round 0 warms up and
is dropped.

- ours: the appliance's ONNX backend driven by the runner's step loop (``Scheduler``), continuous batching;
- genai: ``og.Generator``, one sequence, or static batching (prompts left-padded to the longest, one
  generator of batch 8);
- genai-engine: ``og.Engine``, onnxruntime-genai's request scheduler, with its default CPU configuration.

Per side and number of sequences: TTFT (median over the sequences), decode tok/s per sequence, aggregate tok/s
of all sequences end to end (prefill included) and decode only. Issue 26's goal: ours >= 1.0x genai at
single-stream decode tok/s and TTFT, and at aggregate tok/s with 8 sequences.

    python -m bench.genai_vs_onnx --folder BUILDER_FOLDER [--rounds 5] [--max-tokens 64] [--threads 2]
    python -m bench.genai_vs_onnx --build WORK_DIR   # writes WORK_DIR/builder from the bundled SmolLM2 GGUF first

BUILDER_FOLDER needs a manifest: ``appliance models add BUILDER_FOLDER`` writes it (``--build`` does too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import onnxruntime_genai as og

from appliance.backends import create_backend
from appliance.runner.prompt import chat_tokens
from bench.onnx_vs_llama import QUESTIONS, _timings, timed_run
from bench.results import command_line, record
from models.builder_folder import write_builder_manifest
from models.manifest import is_package, read_manifest

GOAL = "ours >= 1.0x onnxruntime-genai: single-stream decode tok/s and TTFT, aggregate tok/s at 8 sequences (issue 26)"
SIDES = ("ours", "genai", "genai-engine")


def genai_model(folder: Path, threads: int) -> og.Model:
    config = og.Config(str(folder))
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def genai_generator(model: og.Model, prompts: list[list[int]], max_tokens: int, pad: int) -> dict:
    """One og.Generator over all prompts (left-padded to the longest): onnxruntime-genai's static batching."""
    width = max(len(p) for p in prompts)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, batch_size=len(prompts), max_length=width + max_tokens,
                              min_length=width + max_tokens)
    generator = og.Generator(model, params)
    batch = np.array([[pad] * (width - len(p)) + p for p in prompts], dtype=np.int32)
    stamps: list[float] = []
    start = time.perf_counter()
    generator.append_tokens(batch)
    while not generator.is_done():
        generator.generate_next_token()
        stamps.append(time.perf_counter())
    end = time.perf_counter()
    tokens = [list(generator.get_sequence(row)[width:]) for row in range(len(prompts))]
    return _timings([stamps] * len(prompts), start, end) | {"tokens": tokens}


def genai_engine(model: og.Model, prompts: list[list[int]], max_tokens: int) -> dict:
    """og.Engine: every prompt a request of its own, scheduled by onnxruntime-genai."""
    engine = og.Engine(model)
    buffer = engine.create_event_buffer(256)
    turns = {}
    start = time.perf_counter()
    for row, prompt in enumerate(prompts):
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_do_sample(False)
        options.set_max_generated_tokens(max_tokens)
        options.set_min_generated_tokens(max_tokens)
        turns[(id(request), request.begin_turn(np.array(prompt, dtype=np.int32), options))] = (row, request)
    stamps: list[list[float]] = [[] for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    by_request = {id(request): row for (_, _), (row, request) in turns.items()}
    while engine.has_pending_requests():
        events = engine.run(buffer)
        now = time.perf_counter()
        for event in events:
            if event.token is not None and event.token >= 0:
                row = by_request[id(event.request)] if id(event.request) in by_request else _row_of(turns, event)
                stamps[row].append(now)
                tokens[row].append(int(event.token))
    end = time.perf_counter()
    return _timings(stamps, start, end) | {"tokens": tokens}


def _row_of(turns: dict, event) -> int:
    """The prompt an event belongs to, by its turn id (the event's request object is a new wrapper)."""
    return next(row for (_, turn), (row, _) in turns.items() if turn == event.turn_id)


def ours(backend, facts, questions: list[str], max_tokens: int) -> dict:
    return timed_run(backend, facts, questions, max_tokens)


def bench(folder: Path, threads: int, rounds: int, max_tokens: int, concurrency: list[int]) -> dict:
    backend = create_backend("onnx", folder, threads=threads, context_length=1024, n_slots=max(concurrency),
                             provider="cpu")
    facts = backend.load()
    model = genai_model(folder, threads)
    pad = int(json.loads((folder / "genai_config.json").read_text())["model"].get("pad_token_id") or 0)
    runs = {side: {n: [] for n in concurrency} for side in SIDES}
    agreement = []
    try:
        for i in range(rounds + 1):  # round 0 warms caches and is dropped
            turn = i % len(QUESTIONS)
            questions = [f"(run {i}) {q}" for q in QUESTIONS[turn:] + QUESTIONS[:turn]]
            for n in concurrency:
                asked = (questions * n)[:n]
                prompts = [chat_tokens(backend, [{"role": "user", "content": q}]) for q in asked]
                runs_of = {"ours": lambda: ours(backend, facts, asked, max_tokens),
                           "genai": lambda: genai_generator(model, prompts, max_tokens, pad),
                           "genai-engine": lambda: genai_engine(model, prompts, max_tokens)}
                # Each side first in turn: what one run leaves behind (threads still spinning, memory to take
                # back) must not fall on the same side every round.
                order = SIDES[i % len(SIDES):] + SIDES[:i % len(SIDES)]
                results = {side: runs_of[side]() for side in order}
                print(f"round {i} n={n}: " + ", ".join(
                    f"{side} {r['aggregate_tok_s']:.1f} tok/s ttft {r['ttft_ms']:.0f} ms" for side, r in results.items()),
                    flush=True)
                if n == 1:
                    agreement.append(_greedy_agreement(backend, facts, prompts[0], results["genai"]["tokens"][0]))
                if i:
                    for side, result in results.items():
                        runs[side][n].append({k: v for k, v in result.items() if k != "tokens"})
    finally:
        backend.close()
    medians = {side: {n: _medians(r) for n, r in by_n.items()} for side, by_n in runs.items()}
    return {"results": medians, "ratios": _ratios(medians, max(concurrency)),
            "greedy_tokens_equal_genai_single_stream": agreement}


def _greedy_agreement(backend, facts, prompt: list[int], genai_tokens: list[int]) -> float:
    """Share of positions where our greedy tokens (alone, from the same prompt tokens) equal genai's."""
    from appliance.backends.base import SamplingParams, token_stream

    stream = token_stream(backend, facts, prompt, SamplingParams(temperature=0))
    mine = [next(stream) for _ in genai_tokens]
    return float(np.mean(np.array(mine) == np.array(genai_tokens)))


def _medians(runs: list[dict]) -> dict:
    return {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]} | {"runs": runs}


def _ratios(results: dict, most: int) -> dict:
    """ours / genai, above 1 where ours is better (for TTFT, genai's time over ours): the median over the rounds of
    each round's ratio, so load that changes between rounds (this box is shared) cancels out within a round."""
    def paired(key: str, n: int, other: str = "genai") -> float:
        pairs = zip(results["ours"][n]["runs"], results[other][n]["runs"])
        ratios = [(b[key] / a[key]) if key == "ttft_ms" else (a[key] / b[key]) for a, b in pairs]
        return round(statistics.median(ratios), 3)

    return {
        "single_decode_tok_s": paired("decode_tok_s", 1),
        "single_ttft": paired("ttft_ms", 1),
        f"aggregate_{most}": paired("aggregate_tok_s", most),
        f"aggregate_decode_{most}": paired("aggregate_decode_tok_s", most),
        f"aggregate_{most}_vs_engine": paired("aggregate_tok_s", most, "genai-engine"),
    }


def build_folder(work: Path) -> Path:
    """WORK/builder: the bundled SmolLM2-135M-Instruct GGUF, dequantized by transformers into an HF folder, then
    written by the model builder (INT4, CPU), with its manifest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models import find_model

    gguf = find_model("smollm2-135m-instruct").path
    hf, out = work / "hf", work / "builder"
    if not (hf / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # transformers refuses to save a model it loaded from a GGUF as is
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(model.state_dict())
        fresh.generation_config = model.generation_config
        fresh.save_pretrained(hf)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf)
    if not is_package(out):
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str(work / "cache")], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        write_builder_manifest(out, "smollm2-135m-instruct-genai-int4")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="a model-builder folder with its manifest")
    parser.add_argument("--build", type=Path, help="work folder: build the SmolLM2 builder folder there first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    folder = build_folder(args.build) if args.build else args.folder
    if folder is None:
        parser.error("give --folder or --build")
    concurrency = sorted({1, *args.concurrency})
    load_before = os.getloadavg()
    result = bench(folder, args.threads, args.rounds, args.max_tokens, concurrency)
    manifest = read_manifest(folder)
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "model": f"{manifest.name} ({manifest.architecture}, {manifest.quantization})",
              "versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": og.__version__},
              "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
              "command": command_line("genai_vs_onnx", argv), **result}
    print(json.dumps({"results": _without_runs(result["results"]), "ratios": result["ratios"]}, indent=1))
    run = record("genai_vs_onnx", about=__doc__.splitlines()[0], goal=GOAL, figure=figure(report),
                 command=report["command"], report=markdown(report), data=report,
                 inputs=[folder / "model.onnx", folder / "model.onnx.data"])
    print("report:", run / "report.md")


def _without_runs(results: dict) -> dict:
    return {side: {n: {k: v for k, v in m.items() if k != "runs"} for n, m in by_n.items()}
            for side, by_n in results.items()}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# Our ONNX backend against onnxruntime-genai on one model-builder folder", "",
             f"`{report['command']}`: {report['model']}, onnxruntime {report['versions']['onnxruntime']}, "
             f"onnxruntime-genai {report['versions']['onnxruntime_genai']}, {s['threads']} threads both sides, greedy, "
             f"{s['max_tokens']} tokens a sequence, medians of {s['rounds']} rounds. Load average before/after: "
             f"{report['load_avg_before'][0]:.2f} / {report['load_avg_after'][0]:.2f}.", "",
             "| side | sequences at once | TTFT ms | decode tok/s per sequence | aggregate tok/s "
             "| aggregate tok/s, decode only |", "|---|---|---|---|---|---|"]
    for side, by_n in report["results"].items():
        lines += [f"| {side} | {n} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | {r['aggregate_tok_s']:.1f} | "
                  f"{r['aggregate_decode_tok_s']:.1f} |" for n, r in by_n.items()]
    agreement = report["greedy_tokens_equal_genai_single_stream"]
    lines += ["", f"Ratios, ours over genai (TTFT: genai's time over ours), medians of the rounds' own ratios: "
              f"`{json.dumps(report['ratios'])}`.", "",
              f"Greedy tokens equal to genai's, one stream, per round: {[round(a, 3) for a in agreement]}.", "",
              f"{figure(report)}.", ""]
    return "\n".join(lines)


def figure(report: dict) -> str:
    r = report["ratios"]
    most = max(report["settings"]["concurrency"])
    met = all(v >= 1.0 for v in (r["single_decode_tok_s"], r["single_ttft"], r[f"aggregate_{most}"]))
    return (f"ours/genai: single-stream decode {r['single_decode_tok_s']:.2f}x, TTFT {r['single_ttft']:.2f}x, "
            f"aggregate at {most} sequences {r[f'aggregate_{most}']:.2f}x ({r[f'aggregate_{most}_vs_engine']:.2f}x "
            f"og.Engine); goal 1.0x {'met' if met else 'missed'}")


if __name__ == "__main__":
    main()
