"""What ``appliance export`` is asked to do, and how each of its steps reports.

Every module of the export (calibration, rounding, the report, the orchestration
in ``distill.export``) reads the one ``ExportRequest`` and runs its work in named
``step``s, so a failure anywhere says which step failed and why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

Progress = Callable[[str], None]


class ExportError(RuntimeError):
    """An export step failed; the message names the step and the cause."""


@dataclass(frozen=True)
class ExportRequest:
    src: Path  # HF model folder: config.json, *.safetensors, tokenizer.json
    out: Path  # packages go in OUT/<name>-<target>-<format>
    target: str = "cpu"
    format: str = "both"  # onnx, gguf or both (every format the target serves)
    name: str | None = None  # model name in the manifests [default: the source folder's name]
    algorithm: str = "rtn"  # rounding, one of distill.export.ALGORITHMS
    calibration: Path | None = None  # gptq, qat, imatrix: a text file to calibrate on [default: the model's own answers]
    held_out: Path | None = None  # a text file to compare perplexities on [default: export_report.HELD_OUT_TEXT]
    gguf_quant: str | None = None  # llama.cpp type instead of the target's (distill/targets.py), e.g. Q4_0
    calibration_sequences: int | None = None  # [default: distill.calibration.CALIBRATION_SEQUENCES, by algorithm]
    qat_steps: int | None = None  # [default: distill.qat.STEPS]
    measure: bool = True  # write report.md/report.json (perplexity, agreement, speed, RSS)
    threads: int = 2
    aliases: tuple[str, ...] = ()
    serving: dict = field(default_factory=dict)  # the manifest's "serving": how the box should serve the packages


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
