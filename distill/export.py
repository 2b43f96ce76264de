"""``appliance export``: one HF model -> INT4 model packages for one target, each with its report.

For every format the target serves (``distill/targets.py``) a package folder
``OUT/<name>-<target>-<format>`` is built in a hidden temporary folder beside
it and renamed into place only when complete: the model files, the tokenizer
(ONNX), ``report.md``/``report.json`` and a ``manifest.json`` with the sha256 of
every file. A failure names its step and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

from distill.targets import GGUF_QUANT_TYPES, TargetProfile, formats_for, get_target
from models.manifest import CACHE_DIR, sha256_file, write_manifest

REPORT_JSON, REPORT_MD = "report.json", "report.md"


class ExportError(RuntimeError):
    """An export step failed; the message names the step and the cause."""


@dataclass(frozen=True)
class ExportRequest:
    src: Path  # HF model folder: config.json, *.safetensors, tokenizer.json
    out: Path  # packages go in OUT/<name>-<target>-<format>
    target: str = "cpu"
    format: str = "both"  # onnx, gguf or both (every format the target serves)
    name: str | None = None  # model name in the manifests [default: the source folder's name]
    algorithm: str = "rtn"  # rounding, one of ALGORITHMS
    calibration: Path | None = None  # gptq, qat, imatrix: a text file to calibrate on [default: the model's own answers]
    gguf_quant: str | None = None  # llama.cpp type instead of the target's (distill/targets.py), e.g. Q4_0
    calibration_sequences: int | None = None  # [default: CALIBRATION_SEQUENCES, by algorithm]
    qat_steps: int | None = None  # [default: distill.qat.STEPS]
    measure: bool = True  # write report.md/report.json (perplexity, agreement, speed, RSS)
    threads: int = 2
    aliases: tuple[str, ...] = ()


Progress = Callable[[str], None]

# Rounding methods, and the formats whose quantizer takes them.
ALGORITHMS = {
    "rtn": ("onnx", "gguf"),  # round to nearest, each weight on its own; needs no data
    "hqq": ("onnx",),  # half-quadratic (ONNX Runtime's); needs no data
    # calibrated: rounding errors weighed by the activations of a calibration text (distill/calibration.py)
    "gptq": ("onnx", "gguf"),  # GPTQ (distill/gptq.py); GGUF: Q4_0/Q5_0/IQ4_NL rows, llama.cpp's imatrix for the rest
    "qat": ("onnx", "gguf"),  # fine-tuned through the rounding to follow the float model (distill/qat.py); GGUF: as gptq
    "imatrix": ("gguf",),  # llama.cpp's own quantizer, weighted by the importance matrix (llama-quantize --imatrix)
}
CALIBRATED = ("gptq", "qat", "imatrix")
ROUNDED_BEFORE_EXPORT = ("gptq", "qat")  # these put the weights on the exporters' grids themselves
# Calibration sequences of 256 tokens: QAT trains on them, so it takes as many answers as the prompts give.
CALIBRATION_SEQUENCES = {"qat": 256}


def export(request: ExportRequest, progress: Progress = print, reference=None,
           calibration: Calibration | None = None) -> list[Path]:
    """Build one package per format; returns their folders.

    reference: the source's measured answers (``export_report.reference_from_hf``), to reuse across targets.
    calibration: a ``Calibration`` of the same source, to reuse its text and importance matrix across targets.
    """
    profile = get_target(request.target)
    if request.gguf_quant:
        profile = replace(profile, gguf_quant=check_gguf_quant(request.gguf_quant))
    request = replace(request, src=Path(request.src), out=Path(request.out), name=request.name or Path(request.src).name)
    formats = formats_for(profile, request.format)
    check_algorithm(request.algorithm, formats)
    if request.measure and reference is None:
        with step("measure the fp32 source", progress):
            from distill.export_report import reference_from_hf

            reference = reference_from_hf(request.src)
    reference = reference if request.measure else None
    if request.algorithm not in CALIBRATED:
        calibration = None
    elif calibration is None:
        calibration = Calibration(request, progress)
    return [_export_one(request, profile, fmt, reference, progress, calibration) for fmt in formats]


def check_gguf_quant(quant: str) -> str:
    if quant not in GGUF_QUANT_TYPES:
        raise ExportError(f"unknown GGUF quant type {quant!r}: use one of {', '.join(GGUF_QUANT_TYPES)}")
    return quant


def check_algorithm(algorithm: str, formats: tuple[str, ...]) -> None:
    if algorithm not in ALGORITHMS:
        raise ExportError(f"unknown rounding algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    for fmt in formats:
        if fmt not in ALGORITHMS[algorithm]:
            takes = ", ".join(name for name, served in ALGORITHMS.items() if fmt in served)
            raise ExportError(f"--algorithm {algorithm} does not apply to {fmt} ({fmt} takes {takes}): choose one of "
                              f"those, or export only {' and '.join(ALGORITHMS[algorithm])} with --format")


@contextmanager
def step(name: str, progress: Progress) -> Iterator[None]:
    progress(f"[export] {name} ...")
    start = time.perf_counter()
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:  # any library error becomes one that names the step
        raise ExportError(f"export step '{name}' failed: {type(exc).__name__}: {exc}") from exc
    progress(f"[export] {name}: done in {time.perf_counter() - start:.1f} s")


def package_name(request: ExportRequest, profile: TargetProfile, fmt: str) -> str:
    return f"{request.name}-{profile.name}-{fmt}"


def _export_one(request: ExportRequest, profile: TargetProfile, fmt: str, reference, progress: Progress,
                calibration: Calibration | None = None) -> Path:
    final = request.out / package_name(request, profile, fmt)
    request.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=request.out))
    try:
        folder = work / "package"
        rounded = None
        if calibration and request.algorithm in ROUNDED_BEFORE_EXPORT:
            rounded = _rounded_source(request, profile, fmt, calibration, work / "rounded-source", progress)
        built = replace(request, src=rounded.folder) if rounded else request
        if fmt == "onnx":
            quantization = _build_onnx(built, profile, folder, progress)
        else:
            # llama.cpp weighs what was not rounded before (K-quant rows) by the importance matrix
            importance = calibration.importance(skip=rounded.names if rounded else ()) if calibration else None
            quantization = _build_gguf(built, profile, folder, progress, importance)
            quantization += (f"-{request.algorithm}" if rounded else "") + ("-imatrix" if importance else "")
        _write_manifest(request, profile, fmt, folder, quantization)
        if reference is not None:
            _write_report(request, profile, fmt, folder, quantization, reference, progress)
        _publish(folder, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"[export] {fmt} package: {final}")
    return final


def _build_onnx(request: ExportRequest, profile: TargetProfile, folder: Path, progress: Progress) -> str:
    from distill.export_onnx import ExportOptions, export_package
    from distill.quantize_onnx import Int4Options, convert_fp16, quantize_int4

    options = Int4Options(block_size=profile.block_size, symmetric=profile.symmetric,
                          accuracy_level=profile.accuracy_level, algorithm=request.algorithm,
                          embedding=profile.quantize_embedding, lm_head_bits=profile.lm_head_bits, mixed=profile.mixed)
    with step("export the ONNX decoder with KV cache (fp32)", progress):
        export_package(request.src, folder, ExportOptions(name=request.name, int4=None, target=profile.provider))
    if profile.compute == "fp16":
        with step("convert the ONNX graph to fp16", progress):
            convert_fp16(folder / "model.onnx")
    with step(f"quantize ONNX weights to INT4 ({options.label(profile.compute == 'fp16')})", progress):
        quantize_int4(folder / "model.onnx", options)
    return options.label(profile.compute == "fp16")


def _build_gguf(request: ExportRequest, profile: TargetProfile, folder: Path, progress: Progress,
                importance: dict | None = None) -> str:
    from distill.export_gguf import quantize_gguf, write_gguf

    folder.mkdir(parents=True)
    full = folder.parent / "model.f32.gguf"  # outside the package: only the quantized file ships
    with step("write the GGUF from the HF weights (f32)", progress):
        write_gguf(request.src, full, request.name, progress=True)
    weighted = " weighted by the importance matrix" if importance else ""
    with step(f"quantize the GGUF to {profile.gguf_quant} with llama.cpp{weighted}", progress):
        quantize_gguf(full, folder / f"{request.name}.{profile.gguf_quant}.gguf", profile.gguf_quant, request.threads,
                      importance=importance)
    full.unlink()
    return profile.gguf_quant


# -- calibration: GPTQ's rounded copy of the source, llama.cpp's importance matrix -----
class Calibration:
    """The calibration text of one source and what is measured on it, each made once, when first needed.

    The request's source, calibration settings and algorithm decide them, never its target, so one
    Calibration serves every target's export."""

    def __init__(self, request: ExportRequest, progress: Progress = print):
        self.request, self.progress, self._samples, self._importance = request, progress, None, None

    def samples(self):
        if self._samples is None:
            self._samples = calibration_samples(self.request, self.progress)
        return self._samples

    def importance(self, skip=()) -> dict:
        """GGUF tensor name -> importance matrix row, for the decoder Linears not in skip (llama-imatrix collects
        no others)."""
        if self._importance is None:
            self._importance = source_importance(self.request, self.samples(), self.progress)
        return {gguf: row for name, (gguf, row) in self._importance.items() if name not in skip}


def calibration_samples(request: ExportRequest, progress: Progress = print):
    """The calibration sequences, shared by every format of this export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.calibration import best_device, sampled_calibration, text_calibration

    tokenizer = AutoTokenizer.from_pretrained(request.src)
    count = request.calibration_sequences or CALIBRATION_SEQUENCES.get(request.algorithm, 64)
    if request.calibration is not None:
        with step(f"read the calibration text {request.calibration}", progress):
            return text_calibration(tokenizer, Path(request.calibration).read_text(encoding="utf-8"), count=count)
    with step("sample calibration text from the source (its answers to the distillation prompts)", progress):
        model = AutoModelForCausalLM.from_pretrained(request.src).eval().to(best_device())
        return sampled_calibration(model, tokenizer, count=count, progress=progress)


def source_importance(request: ExportRequest, samples, progress: Progress = print) -> dict:
    """Linear name -> (its GGUF tensor name, its importance matrix row), measured on the float source."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.calibration import best_device, importance
    from distill.export_gguf import gguf_name

    with step("measure the importance matrix on the calibration text", progress):
        model = AutoModelForCausalLM.from_pretrained(request.src, dtype=torch.float32).eval().to(best_device())
        rows = importance(model, samples)
    return {name: (gguf_name(name + ".weight"), row) for name, row in rows.items() if name.startswith("model.layers.")}


class RoundedSource(NamedTuple):
    folder: Path  # an HF folder like the source, its rounded Linears on the format's grids
    names: list[str]  # the Linears rounded


def _rounded_source(request: ExportRequest, profile: TargetProfile, fmt: str, calibration: Calibration, dst: Path,
                    progress: Progress) -> RoundedSource | None:
    """A copy of the source whose low-bit weights GPTQ or QAT put on the format's grids; None where none applies."""
    from distill.gptq import quantize_model, write_rounded_copy
    from distill.qat import STEPS as QAT_STEPS
    from distill.qat import train_on_grids

    name = request.algorithm.upper()
    with step(f"choose the {fmt} weights {name} can round", progress):
        grid_for = onnx_grids(request.src, profile) if fmt == "onnx" else gguf_grids(request, profile, dst.parent)
    if grid_for is None:
        progress(f"[export] {request.algorithm}: llama.cpp's {profile.gguf_quant} has no Q4_0/Q5_0/IQ4_NL weights here: it "
                 "rounds them all itself, weighted by the importance matrix")
        return None
    qat = partial(train_on_grids, steps=request.qat_steps or QAT_STEPS)
    method = {"gptq": quantize_model, "qat": qat}[request.algorithm]
    with step(f"round the {fmt} weights with {name}", progress):
        rounded = write_rounded_copy(request.src, dst, grid_for, calibration.samples(),
                                     progress=lambda line: progress(f"[export] {line}"), method=method)
    progress(f"[export] {request.algorithm}: {len(rounded)} weights rounded")
    return RoundedSource(dst, rounded)


def onnx_grids(src: Path, profile: TargetProfile):
    """The profile's 4-bit grid for every decoder Linear, less the ones the mixed profile keeps at 8 bits."""
    from distill.gptq import Grid
    from distill.quantize_onnx import more_bits_layers

    # A row's short last block (576 = 4.5 x 128) is padded with zeros by ONNX Runtime, which leaves its grid alone.
    grid = Grid(block_size=profile.block_size, symmetric=profile.symmetric, fp16=profile.compute == "fp16")
    eight_bit = more_bits_layers(json.loads((src / "config.json").read_text())["num_hidden_layers"]) if profile.mixed else set()

    def grid_for(name: str, width: int):
        kept = int(name.split(".")[2]) in eight_bit and name.endswith(("self_attn.v_proj", "mlp.down_proj"))
        return None if kept else grid

    return grid_for


def gguf_grids(request: ExportRequest, profile: TargetProfile, scratch: Path | None = None):
    """The grids of the Linears llama.cpp's recipe stores in Q4_0, Q5_0 or IQ4_NL (K-quants set their own scales).

    scratch: where the probe's full-precision GGUF goes (the export's own folder, not a small /tmp).
    """
    from distill.export_gguf import gguf_name, llama_cpp_types
    from distill.gptq import IQ4_NL_VALUES, Grid

    # Blocks of 32, scale = largest / -8 (Q4_0) or / -16 (Q5_0), or largest / -127 over IQ4_NL's values.
    grids = {"Q4_0": Grid(bits=4), "Q5_0": Grid(bits=5), "IQ4_NL": Grid(table=IQ4_NL_VALUES)}
    types = llama_cpp_types(request.src, profile.gguf_quant, request.threads, scratch)
    if not any(t in grids for t in types.values()):
        return None

    def grid_for(name: str, width: int):
        return grids.get(types.get(gguf_name(name + ".weight"), ""))

    return grid_for


def _write_manifest(request: ExportRequest, profile: TargetProfile, fmt: str, folder: Path, quantization: str,
                    metrics: dict | None = None) -> None:
    shutil.rmtree(folder / CACHE_DIR, ignore_errors=True)  # the backend's optimized graph: derived, never shipped
    write_manifest(
        folder, name=f"{request.name}-{profile.name}-{fmt}", architecture=_architecture(request.src), format=fmt,
        quantization=quantization, target=profile.name, context_length=_context_length(request.src),
        source=source_record(request.src), metrics=metrics, aliases=request.aliases,
    )


def _architecture(src: Path) -> str:
    return json.loads((src / "config.json").read_text())["model_type"]


def _context_length(src: Path) -> int:
    return int(json.loads((src / "config.json").read_text())["max_position_embeddings"])


def source_record(src: Path) -> dict:
    weights = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin"))
    return {"model": str(src.resolve()), "sha256": {w.name: sha256_file(w) for w in weights}}


def _publish(folder: Path, final: Path) -> None:
    """Put the finished package at final; an older package there is replaced only once the new one is whole."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    folder.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- report ------------------------------------------------------------------------
def _write_report(request: ExportRequest, profile: TargetProfile, fmt: str, folder: Path, quantization: str,
                  reference, progress: Progress) -> None:
    from distill.export_report import context_needed, measure_speed, quality, scorer

    model_path = _served_path(fmt, folder)
    with step(f"measure the {fmt} package (perplexity, greedy agreement)", progress):
        metrics = quality(scorer(fmt, model_path, request.threads, context_needed(reference)), reference)
    with step(f"measure the {fmt} package (decode tokens/s, peak RSS)", progress):
        metrics |= measure_speed(fmt, model_path, request.threads)
    report = build_report(request, profile, fmt, folder, quantization, reference, metrics)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (folder / REPORT_MD).write_text(render_markdown(report))
    summary = {k: report[k] for k in ("perplexity_ratio", "greedy_agreement", "size_vs_fp32")}
    _write_manifest(request, profile, fmt, folder, quantization, metrics=summary)


def _served_path(fmt: str, folder: Path) -> Path:
    return next(folder.glob("*.gguf")) if fmt == "gguf" else folder


def build_report(request, profile, fmt, folder, quantization, reference, metrics) -> dict:
    fp32_bytes = source_fp32_bytes(request.src)
    model_bytes = sum(p.stat().st_size for p in _model_files(fmt, folder))
    return {
        "model": request.name, "target": profile.name, "format": fmt, "quantization": quantization,
        "profile": asdict(profile), "source": str(request.src.resolve()),
        "model_bytes": model_bytes, "fp32_bytes": fp32_bytes, "fp16_bytes": fp32_bytes // 2,
        "size_vs_fp32": model_bytes / fp32_bytes, "size_vs_fp16": model_bytes / (fp32_bytes / 2),
        "perplexity_fp32": reference.perplexity, "perplexity_int4": metrics["perplexity"],
        "perplexity_ratio": metrics["perplexity"] / reference.perplexity,
        "held_out_tokens": len(reference.text_ids), "prompts": len(reference.prompt_ids),
        "new_tokens": len(reference.greedy[0]) if reference.greedy else 0,
        **{k: v for k, v in metrics.items() if k != "perplexity"},
        "machine": _machine(),
    }


def _model_files(fmt: str, folder: Path) -> list[Path]:
    return list(folder.glob("*.gguf")) if fmt == "gguf" else list(folder.glob("model.onnx*"))


def source_fp32_bytes(src: Path) -> int:
    """Bytes of the source's weights at fp32 (the parameter count times 4, whatever dtype they are stored in)."""
    from safetensors import safe_open

    total = 0
    for path in src.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            total += sum(4 * _numel(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _machine() -> dict:
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}


def render_markdown(r: dict) -> str:
    mb = 1 / 1e6
    lines = [
        f"# {r['model']} for {r['target']}: {r['format']} {r['quantization']}", "",
        "| measure | value |", "|---|---|",
        f"| model files | {r['model_bytes'] * mb:.1f} MB |",
        f"| fp32 / fp16 source | {r['fp32_bytes'] * mb:.1f} MB / {r['fp16_bytes'] * mb:.1f} MB |",
        f"| size vs fp32 / fp16 | {r['size_vs_fp32']:.3f}x / {r['size_vs_fp16']:.3f}x |",
        f"| held-out perplexity fp32 -> INT4 ({r['held_out_tokens']} tokens) | {r['perplexity_fp32']:.3f} -> "
        f"{r['perplexity_int4']:.3f} ({r['perplexity_ratio']:.3f}x) |",
        f"| greedy agreement with the source (teacher-forced, {r['prompts']} prompts x {r['new_tokens']} tokens) | "
        f"{r['greedy_agreement']:.1%} |",
        f"| identical free-running prefix per prompt (of {r['new_tokens']}) | "
        f"{', '.join(str(n) for n in r['free_running_identical_prefix'])} |",
        f"| decode speed ({r['threads']} threads) | {r['decode_tokens_per_s']:.1f} tokens/s |",
        f"| peak RSS (load + {r['new_tokens']} tokens, fresh process) | {r['peak_rss_mb']:.0f} MB |",
        f"| load time | {r['load_s']:.2f} s |", "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores. Source: `{r['source']}`.", "",
        "Teacher-forced agreement: the share of the source's greedy tokens that the package also ranks first "
        "when given the same prefix. The free-running prefix counts tokens until the first divergence.", "",
    ]
    return "\n".join(lines)
