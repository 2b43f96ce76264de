"""llama.cpp types x rounding on one source: which GGUF a target should ship, measured side by side.

Every package is built by ``appliance export --format gguf`` with one llama.cpp type and one rounding
(rtn, gptq, imatrix), all against the same fp32 reference and the same calibration text.

    python -m bench.gguf_rounding SRC_FOLDER [--types Q4_0 IQ4_NL Q4_K_M] [--algorithms rtn gptq imatrix]

Records a run in bench/results/gguf_rounding/runs/<date>-<name>/ (report.md, report.json); the packages stay
in --work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.results import command_line, record

GOAL = "perplexity <= 1.05x fp32, GGUF greedy agreement >= 90% (issue 5)"


def run(src: Path, work: Path, types: list[str], algorithms: list[str], threads: int, name: str) -> list[dict]:
    from distill.calibration import Calibration
    from distill.export import CALIBRATED, ExportRequest, export
    from distill.export_report import reference_from_hf

    reference = reference_from_hf(src)
    calibration, rows = None, []
    for quant in types:
        for algorithm in algorithms:
            request = ExportRequest(src=src, out=work / f"{quant}-{algorithm}", target="cpu", format="gguf", name=name,
                                    algorithm=algorithm, gguf_quant=quant, threads=threads)
            if algorithm in CALIBRATED and calibration is None:
                # one calibration text and importance matrix for every package (gptq and imatrix take as many sequences)
                calibration = Calibration(request)
            package, = export(request, reference=reference, calibration=calibration)
            report = json.loads((package / "report.json").read_text())
            rows.append({"type": quant, "algorithm": algorithm, **report})
    return rows


def markdown(rows: list[dict], src: Path) -> str:
    lines = [f"# GGUF types x rounding: {rows[0]['model']}", "",
             f"Source: `{src}`. One fp32 reference, one calibration text (the source's own answers to the "
             "distillation prompts) for every calibrated package. Built by `appliance export --format gguf "
             "--gguf-quant TYPE --algorithm A` (`python -m bench.gguf_rounding`).", "",
             "| type | rounding | label | size MB | ppl ratio | agreement | tok/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['type']} | {r['algorithm']} | {r['quantization']} | {r['model_bytes'] / 1e6:.1f} | "
                     f"{r['perplexity_ratio']:.3f} | {r['greedy_agreement']:.1%} | {r['decode_tokens_per_s']:.0f} |")
    machine = rows[0]["machine"]
    lines += ["", f"Perplexity ratio: INT4 over fp32 on the report's held-out text ({rows[0]['held_out_tokens']} "
              f"tokens). Agreement: teacher-forced, {rows[0]['prompts']} prompts x {rows[0]['new_tokens']} tokens. "
              f"tok/s: one run each, {rows[0]['threads']} threads on {machine['cpu']} ({machine['cores']} cores); "
              "not an edge box's speed.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="HF model folder (fp32)")
    parser.add_argument("--name", help="model name [default: the folder's name]")
    parser.add_argument("--types", nargs="+", default=["Q4_0", "IQ4_NL", "Q4_K_M"])
    parser.add_argument("--algorithms", nargs="+", default=["rtn", "gptq", "imatrix"], choices=["rtn", "gptq", "imatrix"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-rounding"))
    parser.add_argument("--results", type=Path, help="the results folder (default: bench/results, or BENCH_RESULTS)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    name = args.name or args.src.name
    rows = run(args.src, args.work, args.types, args.algorithms, args.threads, name)
    slim = [{k: r[k] for k in ("type", "algorithm", "quantization", "model_bytes", "perplexity_ratio",
                               "greedy_agreement", "decode_tokens_per_s", "peak_rss_mb")} for r in rows]
    record("gguf_rounding", about=__doc__.splitlines()[0], goal=GOAL, figure=figure(slim),
           command=command_line("gguf_rounding", argv), report=markdown(rows, args.src), data=slim, inputs=[args.src],
           label=name, root=args.results)
    print(markdown(rows, args.src))


def figure(rows: list[dict]) -> str:
    best = min(rows, key=lambda r: r["perplexity_ratio"])
    return (f"closest to fp32: {best['type']} with {best['algorithm']}, {best['perplexity_ratio']:.3f}x perplexity, "
            f"{best['greedy_agreement']:.1%} agreement")


if __name__ == "__main__":
    main()
