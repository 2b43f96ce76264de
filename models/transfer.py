"""Moving a model package between boxes as one tar file: its files, its manifest and their checksums.

An export is ``NAME/`` with every file of the package, plus ``NAME/SHA256SUMS`` over all of them
and, signed, ``NAME/SHA256SUMS.sig`` (Ed25519, the install bundle's key format: ``models.signing``).
An import checks everything before anything is registered: every member is a plain file or folder
under ``NAME/`` (no links, devices, absolute paths or ``..``), every file is listed in SHA256SUMS
with its digest and nothing else is there, the signature holds where a public key is given, and the
package's own manifest verifies. It unpacks into a scratch folder beside the models folder and
moves it into place in one rename, so a failed or interrupted import leaves nothing behind.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from models.manifest import Manifest, load_verified, sha256_file
from models.registry import add_package
from models.signing import SigningError, load_private_key, load_public_key, verify

SUMS, SIGNATURE = "SHA256SUMS", "SHA256SUMS.sig"


class TransferError(ValueError):
    """An export or import that cannot go on; the message names the file and the fix."""


def export_package(folder: Path, out: Path, private_key: Path | None = None) -> Manifest:
    """Write the package at ``folder`` (verified first) to the tar ``out``, signed with ``private_key`` if given."""
    folder = Path(folder)
    manifest = load_verified(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (SUMS, SIGNATURE))
    sums = "".join(f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files).encode()
    key = _private_key(private_key) if private_key else None
    partial = Path(out).with_name(Path(out).name + ".partial")
    with tarfile.open(partial, "w", dereference=True) as tar:  # a package's symlinked file goes as the file
        for path in files:
            tar.add(path, arcname=f"{manifest.name}/{path.relative_to(folder).as_posix()}", recursive=False)
        _add_bytes(tar, f"{manifest.name}/{SUMS}", sums)
        if key is not None:
            _add_bytes(tar, f"{manifest.name}/{SIGNATURE}", key.sign(sums))
    os.replace(partial, out)  # a reader never sees half a tar under the name asked for
    return manifest


def import_package(archive: Path, models_dir: Path, public_key: Path | None = None) -> Path:
    """Check and unpack an exported package into ``models_dir``; returns its folder there."""
    public = _public_key(public_key) if public_key else None
    models_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".import-", dir=models_dir))
    try:
        try:
            with _open(archive) as tar:
                name = _check_members(tar, archive)
                # Members are checked above; the "data" filter (Python >= 3.10.12 / 3.11.4) checks again where it exists.
                tar.extractall(scratch, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        except (OSError, tarfile.TarError) as exc:
            raise TransferError(f"{archive} could not be unpacked ({exc}): it is cut short or damaged; copy it again") from None
        folder = scratch / name
        _check_sums(folder, archive, public)
        try:
            load_verified(folder)
        except Exception as exc:
            raise TransferError(f"{archive}: the package's manifest does not verify: {exc}") from None
        target = models_dir / name
        if target.exists():
            raise TransferError(f"{target} already exists: remove it ('appliance models remove {name}' and delete the "
                                "folder) to import this one over it")
        folder.rename(target)
        return target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def import_and_register(archive: Path, home: Path, public_key: Path | None = None) -> tuple[Manifest, Path]:
    """import_package into the data folder's models/, then register it; nothing is left there when either fails."""
    folder = import_package(archive, Path(home) / "models", public_key)
    try:
        manifest = add_package(folder, home=home)
    except BaseException:  # not registered: not left behind either
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return manifest, folder


def _open(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r:")
    except (OSError, tarfile.TarError) as exc:
        raise TransferError(f"{archive} is not a readable tar file: {exc}") from None


def _check_members(tar: tarfile.TarFile, archive: Path) -> str:
    """Every member a plain file or folder under one top folder; returns that folder's name."""
    tops = set()
    for member in tar.getmembers():
        path = PurePosixPath(member.name)
        if not (member.isfile() or member.isdir()):
            raise TransferError(f"{archive}: {member.name!r} is a link or special file: refusing the import "
                                "(a package holds plain files only)")
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise TransferError(f"{archive}: {member.name!r} points outside the package folder: refusing the import")
        tops.add(path.parts[0])
    if len(tops) != 1 or next(iter(tops)).startswith("."):
        raise TransferError(f"{archive}: not a model export (one package folder at the top), found {sorted(tops)}")
    return tops.pop()


def _check_sums(folder: Path, archive: Path, public) -> None:
    sums_file = folder / SUMS
    if not sums_file.is_file():
        raise TransferError(f"{archive}: no {SUMS}: not made by 'appliance models export'")
    sums = sums_file.read_bytes()
    signature = folder / SIGNATURE
    if public is not None:
        if not signature.is_file():
            raise TransferError(f"{archive}: a public key was given but the export is not signed (no {SIGNATURE})")
        try:
            verify(public, sums, signature.read_bytes(), f"{archive.name}'s {SUMS}")
        except SigningError as exc:
            raise TransferError(str(exc)) from None
    listed = {}
    for line in sums.decode("utf-8", errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {SUMS, SIGNATURE}
    if present - set(listed):
        raise TransferError(f"{archive}: {sorted(present - set(listed))[0]} is not listed in {SUMS}: refusing the import")
    for name, digest in sorted(listed.items()):
        if name not in present:
            raise TransferError(f"{archive}: {name} is listed in {SUMS} but missing")
        if sha256_file(folder / name) != digest:
            raise TransferError(f"{archive}: {name} does not match its sha256 in {SUMS}: the file was changed or "
                                "damaged on the way; export it again")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _private_key(path: Path):
    try:
        return load_private_key(path)
    except SigningError as exc:
        raise TransferError(str(exc)) from None


def _public_key(path: Path):
    try:
        return load_public_key(path)
    except SigningError as exc:
        raise TransferError(str(exc)) from None
