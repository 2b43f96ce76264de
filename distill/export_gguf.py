"""HF folder -> GGUF (f32) with llama.cpp's own converter -> llama.cpp's own quantizer.

The converter is ``convert_hf_to_gguf.py`` from the llama.cpp that llama-cpp-python
0.3.36 vendors (100+ architectures: Llama, Qwen2, Gemma 3, ...), extracted by the
Makefile from that sdist, pinned by sha256 in ``distill/llama-cpp-converter.txt``;
``distill/llama_cpp_convert.py`` runs it in a process of its own. What it cannot
convert is refused with its own words.

    python -m distill.export_gguf SRC_FOLDER OUT.gguf --quant Q4_K_M
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

from distill.targets import GGUF_QUANT_TYPES as QUANT_TYPES

CONVERTER_ENV = "LLAMA_CPP_CONVERTER"
CONVERTER_RUNNER = Path(__file__).with_name("llama_cpp_convert.py")
CONVERT_TIMEOUT_S = 3600  # a 1.5B model converts in minutes on two cores; a stuck one must not hang the export


class GgufExportError(ValueError):
    """The source model cannot be written as GGUF; the message says what is unsupported."""


def converter_dir() -> Path:
    """Where the Makefile put llama.cpp's converter: $LLAMA_CPP_CONVERTER, else inside this Python's prefix."""
    folder = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "share" / "edge-appliance" / "llama-cpp-converter")
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise GgufExportError(f"llama.cpp's convert_hf_to_gguf.py is not in {folder}: `make test` "
                              f"extracts it from the llama-cpp-python sdist pinned in distill/llama-cpp-converter.txt; "
                              f"or point {CONVERTER_ENV} at a folder holding it")
    return folder


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    """llama.cpp's name for an HF tensor, from gguf's tensor map (the one the converter uses). The decoder Linears
    (q/k/v/o, gate/up/down) have the same names in every architecture this exports."""
    block = re.search(r"\.layers\.(\d+)\.", hf_name)
    names = gguf.get_tensor_name_map(_arch(arch), int(block.group(1)) + 1 if block else 1)
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GgufExportError(f"tensor {hf_name!r} has no GGUF name in the {arch} architecture")
    return name


def _arch(name: str) -> gguf.MODEL_ARCH:
    arches = {value: key for key, value in gguf.MODEL_ARCH_NAMES.items()}
    if name not in arches:
        raise GgufExportError(f"{name!r} is no GGUF architecture known to gguf {gguf.__version__}")
    return arches[name]


# -- writing and quantizing ----------------------------------------------------
def write_gguf(src: Path, out: Path, name: str, outtype: str = "F32") -> Path:
    """Write the HF model in src as an unquantized GGUF (F32, or F16 for 2-D weights) with llama.cpp's converter."""
    src, out = Path(src), Path(out)
    if outtype not in ("F32", "F16"):
        raise GgufExportError(f"the converter writes F32 or F16, not {outtype}: quantize its output with quantize_gguf")
    cmd = [sys.executable, str(CONVERTER_RUNNER), str(converter_dir()), str(src), "--outfile", str(out),
           "--outtype", outtype.lower(), "--model-name", name]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=CONVERT_TIMEOUT_S, check=False)
    if done.returncode != 0 or not out.is_file():
        out.unlink(missing_ok=True)
        raise GgufExportError(f"llama.cpp's converter cannot convert {src}: {_cause(done.stderr or '')}")
    return out


def _cause(stderr: str) -> str:
    """The converter's own reason: its last error or exception line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    at = max((i for i, line in enumerate(lines) if line.startswith("ERROR:") or re.match(r"^\w+(Error|Exception)\b", line)),
             default=len(lines) - 1)
    if at < 0:
        return "no output"
    source = [line for line in lines[:at] if not re.fullmatch(r"[\^~]+", line)]
    bare = re.fullmatch(r"\w+Error", lines[at]) and source  # a failed assert: its source line says what
    return f"{lines[at]} at `{source[-1]}`" if bare else lines[at]


def quantize_gguf(src: Path, out: Path, quant: str, threads: int | None = None,
                  importance: dict[str, np.ndarray] | None = None) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize), as `llama-quantize` does.

    importance: GGUF tensor name -> importance matrix row (``distill.calibration.importance``), as
    ``llama-quantize --imatrix`` reads it: llama.cpp then weighs each weight's rounding error by it.
    """
    import llama_cpp

    if quant not in QUANT_TYPES:
        raise GgufExportError(f"unknown GGUF quant type {quant!r}: use one of {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = threads or os.cpu_count() or 1
    keep_alive: list = []  # the C array and the buffers it points into, alive until llama.cpp returns
    if importance:
        params.imatrix = _importance_array(importance, keep_alive)
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0 or not Path(out).is_file():
        raise GgufExportError(f"llama.cpp could not quantize {src} to {quant} (status {status})")
    return Path(out)


def _importance_array(importance: dict[str, np.ndarray], keep_alive: list):
    """A null-terminated C array of llama_model_imatrix_data."""
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
    for entry, (name, values) in zip(entries, importance.items()):
        values = np.ascontiguousarray(values, dtype=np.float32)
        keep_alive += [name.encode(), values]
        entry.name, entry.size = keep_alive[-2], values.size
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    keep_alive.append(entries)
    return entries


def llama_cpp_types(src: Path, quant: str, threads: int | None = None, scratch: Path | None = None) -> dict[str, str]:
    """GGUF tensor name -> the type llama.cpp's quant recipe gives it for this model (e.g. Q4_K_M keeps rows that
    are not whole 256-blocks in Q5_0), found by quantizing a copy in a temporary folder under scratch."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        quantized = export_gguf(src, Path(tmp) / f"probe.{quant}.gguf", "probe", quant, threads)
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(quantized).tensors}


def export_gguf(src: Path, out: Path, name: str, quant: str, threads: int | None = None) -> Path:
    """HF folder -> quantized GGUF file out; the unquantized intermediate is removed."""
    out = Path(out)
    full = out.with_name(out.stem + ".f32.gguf")
    try:
        write_gguf(src, full, name)
        if quant == "F32":
            return full.replace(out)
        return quantize_gguf(full, out, quant, threads)
    finally:
        full.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="HF model folder (config.json, weights, tokenizer.json)")
    parser.add_argument("out", type=Path, help="GGUF file to write")
    parser.add_argument("--quant", default="Q4_K_M", choices=sorted(QUANT_TYPES))
    parser.add_argument("--name", help="model name in the GGUF metadata [default: the source folder's name]")
    args = parser.parse_args(argv)
    print(export_gguf(args.src, args.out, args.name or args.src.name, args.quant))


if __name__ == "__main__":
    main()
