"""``appliance export``: one HF model -> INT4 model packages for one target, each with its report.

For every format the target serves (``distill/targets.py``) a package folder
``OUT/<name>-<target>-<format>`` is built in a hidden temporary folder beside
it and renamed into place only when complete: the model files, the tokenizer
(ONNX), ``report.md``/``report.json`` and a ``manifest.json`` with the sha256 of
every file. A failure names its step and leaves nothing behind.

This module runs the steps in order. The work is elsewhere: calibration text and
importance matrix in ``distill.calibration``, rounding onto the exporters' grids in
``distill.rounding``, the formats in ``distill.export_onnx``/``distill.export_gguf``,
the measurements and the report in ``distill.export_report``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from distill.export_request import ExportError, ExportRequest, Progress, step
from distill.rounding import rounded_source
from distill.targets import GGUF_QUANT_TYPES, TargetProfile, formats_for, get_target
from models.manifest import CACHE_DIR, Manifest, sha256_file, write_manifest

if TYPE_CHECKING:
    from distill.calibration import Calibration

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
    with torch_threads(request.threads):
        return _export_formats(request, profile, formats, progress, reference, calibration)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's steps (measuring the source, calibrating, the ONNX trace) on `threads` too, not on every core: two
    exports side by side, or one beside a training run, otherwise oversubscribe the CPU (on 16 cores, measuring a
    1.1B source took over 10 minutes beside another export, 43 s alone)."""
    try:
        import torch
    except ImportError:  # a GGUF export from the converter alone needs no torch
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _export_formats(request: ExportRequest, profile: TargetProfile, formats, progress: Progress, reference,
                    calibration: Calibration | None) -> list[Path]:
    if request.measure and reference is None:
        with step("measure the fp32 source", progress):
            from distill.export_report import held_out_text, reference_from_hf

            reference = reference_from_hf(request.src, text=held_out_text(request.held_out))
    reference = reference if request.measure else None
    if request.algorithm not in CALIBRATED:
        calibration = None
    elif calibration is None:
        from distill.calibration import Calibration

        calibration = Calibration(request, progress)
    source = source_record(request.src)  # hashed once for every package's manifest
    return [_export_one(request, profile, fmt, reference, progress, calibration, source) for fmt in formats]


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


def package_name(request: ExportRequest, profile: TargetProfile, fmt: str) -> str:
    return f"{request.name}-{profile.name}-{fmt}"


def _export_one(request: ExportRequest, profile: TargetProfile, fmt: str, reference, progress: Progress,
                calibration: Calibration | None, source: dict) -> Path:
    final = request.out / package_name(request, profile, fmt)
    request.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=request.out))
    try:
        folder = work / "package"
        quantization = _build(request, profile, fmt, folder, calibration, progress)
        write = partial(_write_manifest, request, profile, fmt, folder, quantization, source)
        metrics, known = None, ()
        if reference is not None:
            from distill.export_report import write_report

            if fmt == "onnx":  # ONNX Runtime's backend loads only a package with a manifest; the report loads it
                known = write().files  # the final manifest hashes only the report's files
            metrics = write_report(request, profile, fmt, folder, quantization, reference, progress)
        write(metrics, known)
        _publish(folder, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"[export] {fmt} package: {final}")
    return final


def _build(request: ExportRequest, profile: TargetProfile, fmt: str, folder: Path, calibration: Calibration | None,
           progress: Progress) -> str:
    """The package's model files in folder; returns their quantization label."""
    rounded = None
    if calibration:
        rounded = rounded_source(request, profile, fmt, calibration, folder.parent / "rounded-source", progress)
    built = replace(request, src=rounded.folder) if rounded else request
    if fmt == "onnx":
        return _build_onnx(built, profile, folder, progress)
    # llama.cpp weighs what was not rounded before (K-quant rows) by the importance matrix
    importance = calibration.importance(skip=rounded.names if rounded else ()) if calibration else None
    quantization = _build_gguf(built, profile, folder, progress, importance)
    return quantization + (f"-{request.algorithm}" if rounded else "") + ("-imatrix" if importance else "")


def _build_onnx(request: ExportRequest, profile: TargetProfile, folder: Path, progress: Progress) -> str:
    from distill.export_onnx import ExportOptions, build_package
    from distill.quantize_onnx import Int4Options, convert_fp16, quantize_int4

    options = Int4Options(block_size=profile.block_size, symmetric=profile.symmetric,
                          accuracy_level=profile.accuracy_level, algorithm=request.algorithm,
                          embedding=profile.quantize_embedding, lm_head_bits=profile.lm_head_bits, mixed=profile.mixed)
    with step("export the ONNX decoder with KV cache (fp32)", progress):
        build_package(request.src, folder, ExportOptions(name=request.name, int4=None))
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
    with step("write the GGUF from the HF weights (f32, llama.cpp's converter)", progress):
        write_gguf(request.src, full, request.name)
    weighted = " weighted by the importance matrix" if importance else ""
    with step(f"quantize the GGUF to {profile.gguf_quant} with llama.cpp{weighted}", progress):
        quantize_gguf(full, folder / f"{request.name}.{profile.gguf_quant}.gguf", profile.gguf_quant, request.threads,
                      importance=importance)
    full.unlink()
    return profile.gguf_quant


def _write_manifest(request: ExportRequest, profile: TargetProfile, fmt: str, folder: Path, quantization: str,
                    source: dict, metrics: dict | None = None, known: tuple = ()) -> Manifest:
    shutil.rmtree(folder / CACHE_DIR, ignore_errors=True)  # the backend's optimized graph: derived, never shipped
    config = json.loads((request.src / "config.json").read_text())
    return write_manifest(
        folder, name=package_name(request, profile, fmt), architecture=config["model_type"], format=fmt,
        quantization=quantization, target=profile.name, context_length=int(config["max_position_embeddings"]),
        source=source, metrics=metrics, aliases=request.aliases, known=known, serving=request.serving,
    )


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
