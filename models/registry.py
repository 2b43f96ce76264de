"""Model packages registered with this box (``appliance models add PATH``).

The list lives in ``HOME/models.json`` as absolute folder paths; the packages
stay where they are. ``models.catalog`` lists them beside the bundled models,
so a registered package is served by its manifest name. Every function takes
the data folder as ``home``: the caller has it from the one config
(``appliance.config.Settings.home``), and nothing here reads the environment.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.builder_folder import is_builder_folder, write_builder_manifest
from models.manifest import Manifest, ManifestError, is_package, load_verified, read_manifest

REGISTRY_FILE = "models.json"


class RegistryError(ValueError):
    """The registry cannot do what was asked (models.json unreadable, no or several packages match a name).

    The message says what to do; the CLI shows it as is.
    """


def registry_path(home: Path) -> Path:
    return Path(home) / REGISTRY_FILE


def registered_packages(*, home: Path) -> list[Path]:
    path = registry_path(home)
    if not path.exists():
        return []
    try:
        return [Path(p) for p in json.loads(path.read_text())["packages"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RegistryError(f"{path} is malformed ({exc}); fix or delete it and add the packages again") from None


def add_package(folder: Path, *, home: Path, name: str | None = None) -> Manifest:
    """Check every file of the package against its manifest, then record it; returns the manifest.

    An onnxruntime-genai builder folder without a manifest gets one first (``models.builder_folder``), named
    ``name`` or after the folder; a folder the ONNX backend cannot serve is refused saying why.
    """
    folder = Path(folder).expanduser().resolve()
    if not is_package(folder) and is_builder_folder(folder):
        write_builder_manifest(folder, name)
    manifest = load_verified(folder)  # raises ManifestError naming a missing or corrupted file
    packages = [p for p in registered_packages(home=home) if p != folder] + [folder]
    _save(packages, home)
    return manifest


def remove_package(name_or_path: str, *, home: Path) -> Path:
    """Forget a registered package, given its folder or its manifest name; its files stay where they are.

    Returns the folder removed. Raises RegistryError when nothing registered matches, or when a
    name matches several packages (the message lists their folders: remove one by path).
    """
    packages = registered_packages(home=home)
    folder = Path(name_or_path).expanduser().resolve()
    matches = [folder] if folder in packages else [p for p in packages if _package_name(p) == name_or_path]
    if not matches:
        raise RegistryError(f"no registered package matches {name_or_path!r}: see appliance models list")
    if len(matches) > 1:
        raise RegistryError(f"{len(matches)} registered packages are called {name_or_path!r}: "
                         f"remove one by its folder ({', '.join(map(str, matches))})")
    _save([p for p in packages if p != matches[0]], home)
    return matches[0]


def _package_name(folder: Path) -> str:
    try:
        return read_manifest(folder).name
    except ManifestError:  # moved or broken packages can still be removed by folder name
        return folder.name


def _save(packages: list[Path], home: Path) -> None:
    path = registry_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"packages": [str(p) for p in packages]}, indent=2) + "\n")
    partial.replace(path)  # whole or not at all, even if the process dies mid-write
