"""The web UI's third-party JavaScript: taken from the npm registry by exact version, kept in the repository.

``appliance/static/vendor/MANIFEST.json`` lists each package: name, exact version, licence, the tarball's
address and its npm integrity (sha512), and the files taken from it with their sha256. The service serves
these files itself; nothing is fetched at run time, and no build step runs.

    python -m installer.vendor_js            # fetch every package in the manifest again, check, write files
    python -m installer.vendor_js --check    # only check the files on disk against the manifest (offline)

To add or move a package, edit its ``name``, ``version`` and ``files`` (path in the tarball -> path under
vendor/) in the manifest and run the first command: it records the tarball's integrity and the sha256 of
each file. A tarball whose integrity does not match what the registry says (or what the manifest recorded
for that version) is refused.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

VENDOR = Path(__file__).resolve().parent.parent / "appliance" / "static" / "vendor"
MANIFEST = VENDOR / "MANIFEST.json"
REGISTRY = "https://registry.npmjs.org"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(vendor: Path = VENDOR) -> list[str]:
    """Problems with the vendored files: missing, changed, or on disk but not in the manifest."""
    manifest = json.loads((vendor / "MANIFEST.json").read_text())
    problems, listed = [], {"MANIFEST.json"}
    for package in manifest["packages"]:
        for source, entry in package["files"].items():
            path = vendor / entry["path"]
            listed.add(entry["path"])
            if not path.is_file():
                problems.append(f"{package['name']}: {entry['path']} (from {source}) is missing")
            elif sha256(path) != entry["sha256"]:
                problems.append(f"{package['name']}: {entry['path']} does not match its sha256 in the manifest")
    for path in vendor.rglob("*"):
        if path.is_file() and path.relative_to(vendor).as_posix() not in listed:
            problems.append(f"{path.relative_to(vendor)} is not in the manifest")
    return problems


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def refresh(vendor: Path = VENDOR, get=_get) -> None:
    manifest = json.loads((vendor / "MANIFEST.json").read_text())
    for package in manifest["packages"]:
        name, version = package["name"], package["version"]
        meta = json.loads(get(f"{REGISTRY}/{name}/{version}"))  # an exact version, never a range or a tag
        if meta["version"] != version:
            raise SystemExit(f"{name}: the registry answered version {meta['version']} for {version}")
        dist = meta["dist"]
        if package.get("integrity") and package["integrity"] != dist["integrity"]:
            raise SystemExit(f"{name}@{version}: the registry's integrity changed since the manifest recorded it")
        tarball = get(dist["tarball"])
        if _integrity(tarball) != dist["integrity"]:
            raise SystemExit(f"{name}@{version}: the tarball does not match its integrity")
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
            for source, entry in package["files"].items():
                member = tar.getmember(f"package/{source}")
                if not member.isfile():
                    raise SystemExit(f"{name}@{version}: {source} is not a plain file")
                target = (vendor / entry["path"]).resolve()
                if vendor.resolve() not in target.parents:
                    raise SystemExit(f"{name}: {entry['path']} leaves the vendor folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                entry["sha256"] = sha256(target)
        package.update(tarball=dist["tarball"], integrity=dist["integrity"], license=meta.get("license"))
        print(f"{name}@{version}: {len(package['files'])} file(s)")
    (vendor / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check the files against the manifest, offline")
    args = parser.parse_args(argv)
    if not args.check:
        refresh()
    problems = check()
    for problem in problems:
        print(f"FAIL {problem}")
    if not problems:
        print("OK   every vendored file matches MANIFEST.json")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
