"""The model package format both backends share: a folder of files plus ``manifest.json``.

The export pipeline writes it with ``write_manifest``; the service reads it
with ``read_manifest`` and refuses a folder whose files no longer match their
recorded sha256 (``verify_files``). The format is documented in ``models/README.md``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.kinds import KINDS

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FORMATS = ("gguf", "onnx")
CACHE_DIR = ".cache"  # derived files a backend may keep inside a package; not part of it
# What a package may suggest for serving it (the service's settings of these names are the default, and the
# config's model_settings for it override the package): slots, tokens of context per slot, threads, keep-alive s.
SERVING_OPTIONS = ("parallel", "context_length", "threads", "keep_alive")


class ManifestError(ValueError):
    """A model package is incomplete, malformed or corrupted; the message names the file."""


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the package folder, "/"-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    architecture: str  # e.g. "llama", as in config.json model_type / GGUF general.architecture
    format: str  # "gguf" or "onnx": picks the backend
    quantization: str  # e.g. "Q4_1", "int4-block32", "fp32"
    target: str  # what the package was built for, e.g. "cpu", "cuda", "any"
    context_length: int
    files: tuple[FileRecord, ...]
    source: dict = field(default_factory=dict)  # {"model": ..., "sha256": ...}
    metrics: dict | None = None  # optional, e.g. {"greedy_agreement_vs_fp32": 0.97}
    aliases: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION
    kind: str = "chat"  # "chat" or "embedding" (models.kinds); manifests written before kinds existed are chat
    serving: dict = field(default_factory=dict)  # SERVING_OPTIONS the package suggests, e.g. {"parallel": 2}

    def file(self, suffix: str) -> FileRecord:
        """The one listed file whose name ends with suffix (e.g. ".gguf", "model.onnx")."""
        hits = [f for f in self.files if f.path.endswith(suffix)]
        if len(hits) != 1:
            raise ManifestError(f"manifest of {self.name!r} lists {len(hits)} files ending in {suffix!r}, expected 1")
        return hits[0]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_package(folder: Path) -> bool:
    return Path(folder).is_dir() and (Path(folder) / MANIFEST).is_file()


def write_manifest(
    folder: Path,
    *,
    name: str,
    architecture: str,
    format: str,
    quantization: str,
    target: str,
    context_length: int,
    source: dict | None = None,
    metrics: dict | None = None,
    aliases: tuple[str, ...] = (),
    known: tuple[FileRecord, ...] = (),
    kind: str = "chat",
    serving: dict | None = None,
) -> Manifest:
    """Record every file of folder (except the manifest itself) with its size and sha256.

    ``known``: records this writer made of files it has not changed since (a manifest written before the
    package's report was added); a file with the same path and size is not hashed again.
    """
    folder = Path(folder)
    if format not in FORMATS:
        raise ManifestError(f"format must be one of {FORMATS}, got {format!r}")
    check_serving(dict(serving or {}), "write_manifest")
    hashed = {record.path: record for record in known}
    files = tuple(
        _record(folder, p, hashed.get(p.relative_to(folder).as_posix()))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not _is_cache(p.relative_to(folder))
    )
    manifest = Manifest(
        name=name, architecture=architecture, format=format, quantization=quantization, target=target,
        context_length=int(context_length), files=files, source=dict(source or {}), metrics=metrics,
        aliases=tuple(aliases), kind=kind, serving=dict(serving or {}),
    )
    (folder / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


def _record(folder: Path, path: Path, known: FileRecord | None) -> FileRecord:
    size = path.stat().st_size
    if known is not None and known.size == size:
        return known
    return FileRecord(path.relative_to(folder).as_posix(), size, sha256_file(path))


def _is_cache(relative: Path) -> bool:
    # Backends keep derived files (optimized graphs) in a cache folder inside the package.
    return relative.parts[0] == CACHE_DIR



def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    try:
        raw = json.loads(path.read_text())
        files = tuple(FileRecord(**f) for f in raw.pop("files"))
        manifest = Manifest(files=files, aliases=tuple(raw.pop("aliases", ())), **raw)
    except FileNotFoundError:
        raise ManifestError(f"{folder} is not a model package: it has no {MANIFEST}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path} is malformed ({exc}); re-export the model package") from None
    if manifest.format not in FORMATS:
        raise ManifestError(f"{path}: unknown format {manifest.format!r}, expected one of {FORMATS}")
    if manifest.kind not in KINDS:
        raise ManifestError(f"{path}: unknown kind {manifest.kind!r}, expected one of {KINDS}")
    check_serving(manifest.serving, str(path))
    return manifest


def check_serving(serving: dict, where: str) -> None:
    """Every option known, a whole number above 0 (keep_alive: seconds, 0 or more)."""
    if not isinstance(serving, dict):
        raise ManifestError(f"{where}: serving must be an object such as {{\"parallel\": 2}}, got {serving!r}")
    for name, value in serving.items():
        if name not in SERVING_OPTIONS:
            raise ManifestError(f"{where}: unknown serving option {name!r} (known: {', '.join(SERVING_OPTIONS)})")
        least_ok = value >= 0 if name == "keep_alive" else value > 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not least_ok or \
                (name != "keep_alive" and value != int(value)):
            kind = "seconds, 0 or more" if name == "keep_alive" else "a whole number above 0"
            raise ManifestError(f"{where}: serving option {name} must be {kind}, got {value!r}")


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Raise ManifestError naming the first file that is missing or differs from the manifest."""
    folder = Path(folder)
    for record in manifest.files:
        path = folder / record.path
        if not path.is_file():
            raise ManifestError(f"model package {manifest.name!r} is missing {record.path} (expected in {folder})")
        if path.stat().st_size != record.size:
            raise ManifestError(
                f"{path} has {path.stat().st_size} bytes, the manifest says {record.size}: the file is corrupted or was replaced"
            )
        actual = sha256_file(path)
        if actual != record.sha256:
            raise ManifestError(
                f"{path} does not match its sha256 in {MANIFEST} (expected {record.sha256}, got {actual}): "
                "the file is corrupted or was replaced; re-copy or re-export the package"
            )


def load_verified(folder: Path) -> Manifest:
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    return manifest
