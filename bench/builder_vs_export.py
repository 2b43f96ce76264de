"""onnxruntime-genai's model builder against the pipeline's exporter (torch.onnx.export + MatMulNBits): quality, size, speed.

From one fp32 HF folder (the bundled SmolLM2-135M-Instruct GGUF dequantized, as ``bench.genai_vs_onnx
--build`` makes it), three INT4 packages for the CPU:

- export: ``distill.export_onnx`` with the served options (block 16, zero points, lm_head at 8 bits);
- builder: the model builder's defaults (``-p int4 -e cpu``: block 32, symmetric, embeddings and lm_head INT4);
- builder-block16: the builder with the export's block size (block_size=16; still symmetric, lm_head and
  embeddings INT4). The export's other choices do not build with onnxruntime-genai 0.18.0 on this tied-embedding
  model: is_symmetric=false writes a graph onnxruntime refuses ("Type (tensor(uint8)) of output arg
  (/model/embed_tokens/Reshape/output_0) ... does not match expected type (tensor(float))"), and
  matmul_mixed_precision=last_matmul:int8 one that names a missing input ("lm_head.MatMul.weight_Q8G16").

Each is measured through the appliance's ONNX backend, as the service runs it, against the fp32 source with
``distill.export_report``'s own measures: held-out perplexity (its HELD_OUT_TEXT) over fp32's, teacher-forced
greedy agreement on its prompts, the model files' size, and single-stream decode tok/s in a fresh process.

    python -m bench.builder_vs_export --work WORK_DIR [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.genai_vs_onnx import build_folder
from bench.results import command_line, record
from distill.export_onnx import SERVED_INT4, ExportOptions, export_package
from distill.export_report import OnnxScorer, context_needed, measure_speed, quality, reference_from_hf
from models.builder_folder import write_builder_manifest
from models.manifest import is_package, read_manifest

GOAL = "issue 26: is the builder a better exporter for the pipeline? (perplexity, size, decode speed)"
BLOCK16 = ("block_size=16",)


def build_packages(work: Path) -> dict[str, tuple[Path, float]]:
    """Each package's folder and the seconds its export took (0 when it was already there)."""
    hf = work / "hf"
    built = {"builder": (build_folder(work), 0.0)}
    built["export"] = _timed(work / "export", lambda out: export_package(
        hf, out, ExportOptions(name="smollm2-export", int4=SERVED_INT4, target="cpu")))
    built["builder-block16"] = _timed(work / "builder-block16", lambda out: _builder(hf, out, work / "cache", BLOCK16))
    return built


def _timed(out: Path, make) -> tuple[Path, float]:
    if is_package(out):
        return out, 0.0
    start = time.perf_counter()
    make(out)
    return out, time.perf_counter() - start


def _builder(hf: Path, out: Path, cache: Path, extra: tuple[str, ...]) -> None:
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p",
                    "int4", "-e", "cpu", "-c", str(cache), "--extra_options", *extra], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
    write_builder_manifest(out, out.name)


def measure(packages: dict[str, tuple[Path, float]], hf: Path, threads: int) -> dict:
    reference = reference_from_hf(hf)
    fp32_bytes = (hf / "model.safetensors").stat().st_size
    rows = {}
    for name, (folder, export_s) in packages.items():
        manifest = read_manifest(folder)
        scored = quality(OnnxScorer(folder, threads, context_needed(reference)), reference)
        size = sum(f.size for f in manifest.files if f.path.startswith("model.onnx"))
        rows[name] = {"quantization": manifest.quantization, "perplexity": scored["perplexity"],
                      "perplexity_ratio": scored["perplexity"] / reference.perplexity,
                      "greedy_agreement": scored["greedy_agreement"],
                      "free_running_identical_prefix": scored["free_running_identical_prefix"],
                      "model_bytes": size, "size_vs_fp32": size / fp32_bytes, "export_s": export_s,
                      "speed": [measure_speed("onnx", folder, threads) for _ in range(3)]}
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "speed"}), flush=True)
    return {"perplexity_fp32": reference.perplexity, "held_out_tokens": len(reference.text_ids), "packages": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    packages = build_packages(args.work)
    load_before = os.getloadavg()
    report = measure(packages, args.work / "hf", args.threads) | {
        "threads": args.threads, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "command": command_line("builder_vs_export", argv)}
    run = record("builder_vs_export", about=__doc__.splitlines()[0], goal=GOAL, figure=figure(report),
                 command=report["command"], report=markdown(report), data=report,
                 inputs=[args.work / "hf" / "model.safetensors"])
    print("report:", run / "report.md")


def _decode(row: dict) -> float:
    speeds = sorted(s["decode_tokens_per_s"] for s in row["speed"])
    return speeds[len(speeds) // 2]


def markdown(report: dict) -> str:
    lines = ["# The model builder against the pipeline's exporter (SmolLM2-135M-Instruct, INT4, CPU)", "",
             f"`{report['command']}`: fp32 held-out perplexity {report['perplexity_fp32']:.3f} "
             f"({report['held_out_tokens']} tokens); every package served by the appliance's ONNX backend, "
             f"{report['threads']} threads; decode: median of 3 fresh processes. Load average before/after: "
             f"{report['load_avg_before'][0]:.2f} / {report['load_avg_after'][0]:.2f}.", "",
             "| package | quantization | perplexity (x fp32) | greedy agreement | model MB (x fp32) | decode tok/s "
             "| export s (0: built before this run) |", "|---|---|---|---|---|---|---|"]
    for name, r in report["packages"].items():
        lines.append(f"| {name} | {r['quantization']} | {r['perplexity']:.3f} ({r['perplexity_ratio']:.3f}x) | "
                     f"{r['greedy_agreement']:.3f} | {r['model_bytes'] / 1e6:.1f} ({r['size_vs_fp32']:.3f}x) | "
                     f"{_decode(r):.1f} | {r['export_s']:.0f} |")
    return "\n".join(lines + ["", f"{figure(report)}.", ""])


def figure(report: dict) -> str:
    rows = report["packages"]
    return "; ".join(f"{name}: perplexity {r['perplexity_ratio']:.3f}x fp32, {r['size_vs_fp32']:.3f}x size, "
                     f"{_decode(r):.1f} tok/s" for name, r in rows.items())


if __name__ == "__main__":
    main()
