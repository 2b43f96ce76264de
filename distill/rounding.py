"""Rounding before export: a copy of the source whose weights GPTQ or QAT put on the exporters' own grids.

ONNX Runtime's and llama.cpp's quantizers round to nearest. GPTQ (``distill.gptq``)
and QAT (``distill.qat``) instead choose each weight's step themselves, on exactly
the grid the format's quantizer will use (``onnx_grids``, ``gguf_grids``), so the
quantizer keeps their choice and the package carries it bit for bit.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from distill.export_request import ExportRequest, Progress, step
from distill.targets import TargetProfile

if TYPE_CHECKING:
    from distill.calibration import Calibration

ROUNDED_BEFORE_EXPORT = ("gptq", "qat")  # the algorithms that put the weights on the exporters' grids themselves


class RoundedSource(NamedTuple):
    folder: Path  # an HF folder like the source, its rounded Linears on the format's grids
    names: list[str]  # the Linears rounded


def rounded_source(request: ExportRequest, profile: TargetProfile, fmt: str, calibration: Calibration, dst: Path,
                   progress: Progress) -> RoundedSource | None:
    """A copy of the source whose low-bit weights GPTQ or QAT put on the format's grids; None where none applies."""
    if request.algorithm not in ROUNDED_BEFORE_EXPORT:
        return None
    name = request.algorithm.upper()
    with step(f"choose the {fmt} weights {name} can round", progress):
        grid_for = onnx_grids(request.src, profile) if fmt == "onnx" else gguf_grids(request, profile, dst.parent)
    if grid_for is None:
        progress(f"[export] {request.algorithm}: llama.cpp's {profile.gguf_quant} has no Q4_0/Q5_0/IQ4_NL weights here: it "
                 "rounds them all itself, weighted by the importance matrix")
        return None
    with step(f"round the {fmt} weights with {name}", progress):
        rounded = _write_rounded_copy(request, dst, grid_for, calibration.samples(), progress)
    progress(f"[export] {request.algorithm}: {len(rounded)} weights rounded")
    return RoundedSource(dst, rounded)


def _write_rounded_copy(request: ExportRequest, dst: Path, grid_for, samples, progress: Progress) -> list[str]:
    from distill.gptq import quantize_model, write_rounded_copy
    from distill.qat import STEPS as QAT_STEPS
    from distill.qat import train_on_grids

    qat = partial(train_on_grids, steps=request.qat_steps or QAT_STEPS)
    method = {"gptq": quantize_model, "qat": qat}[request.algorithm]
    return write_rounded_copy(request.src, dst, grid_for, samples, progress=lambda line: progress(f"[export] {line}"),
                              method=method)


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
