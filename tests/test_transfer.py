"""Moving a model package between boxes: 'appliance models export' and 'appliance models import' with the real
CLI, real tar files and real Ed25519 keys; every damaged or hostile archive is refused and leaves nothing."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from appliance.cli import cli
from models.manifest import write_manifest

NAME = "tiny-export"


def run(*args) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def package(tmp_path) -> Path:
    folder = tmp_path / "packages" / NAME
    folder.mkdir(parents=True)
    (folder / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    (folder / "report.md").write_text("# measured\n")
    write_manifest(folder, name=NAME, architecture="llama", format="gguf", quantization="Q4_1", target="cpu",
                   context_length=256)
    return folder


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = tmp_path / "signing.pem", tmp_path / "signing.pub"
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return private, public


def leftovers(home: Path) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def test_a_signed_export_imports_on_another_box_and_is_served_by_name(tmp_path, package, keys):
    private, public = keys
    out = tmp_path / "tiny.tar"
    result = run("models", "export", package, "--out", out, "--sign", private)
    assert result.exit_code == 0 and "signed" in result.output, result.output
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
    assert names == [f"{NAME}/{n}" for n in ("SHA256SUMS", "SHA256SUMS.sig", "manifest.json", "model.gguf", "report.md")]

    other = tmp_path / "other-box"
    result = run("models", "import", out, "--public-key", public, "--home", other)
    assert result.exit_code == 0 and "signature and checksums checked" in result.output, result.output
    imported = other / "models" / NAME
    assert (imported / "model.gguf").read_bytes() == (package / "model.gguf").read_bytes()
    listed = json.loads(run("models", "list", "--json", "--home", other).output)
    assert [e["name"] for e in listed if e["name"] == NAME] == [NAME]
    assert leftovers(other) == [NAME]
    again = run("models", "import", out, "--home", other)  # the same package twice is refused, nothing changes
    assert again.exit_code != 0 and "already exists" in again.output and leftovers(other) == [NAME]


def test_one_corrupted_byte_is_refused_naming_the_file(tmp_path, package):
    out = tmp_path / "tiny.tar"
    assert run("models", "export", package, "--out", out).exit_code == 0
    data = bytearray(out.read_bytes())
    with tarfile.open(out) as tar:
        member = tar.getmember(f"{NAME}/model.gguf")
    data[member.offset_data + 100] ^= 0xFF  # one byte of the weights, in place
    out.write_bytes(bytes(data))
    result = run("models", "import", out, "--home", tmp_path / "box")
    assert result.exit_code != 0 and "model.gguf does not match its sha256" in result.output, result.output
    assert leftovers(tmp_path / "box") == []


def test_a_wrong_key_or_a_missing_signature_is_refused(tmp_path, package, keys):
    private, public = keys
    stranger = tmp_path / "stranger.pub"
    stranger.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM,
                                                                               PublicFormat.SubjectPublicKeyInfo))
    signed, unsigned = tmp_path / "signed.tar", tmp_path / "unsigned.tar"
    assert run("models", "export", package, "--out", signed, "--sign", private).exit_code == 0
    assert run("models", "export", package, "--out", unsigned).exit_code == 0
    result = run("models", "import", signed, "--public-key", stranger, "--home", tmp_path / "box")
    assert result.exit_code != 0 and "does not match the public key" in result.output
    result = run("models", "import", unsigned, "--public-key", public, "--home", tmp_path / "box")
    assert result.exit_code != 0 and "not signed" in result.output
    assert leftovers(tmp_path / "box") == []


def hostile_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo(f"{NAME}/manifest.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member, said", [
    (tarfile.TarInfo(f"{NAME}/../../evil.py"), "outside the package folder"),
    (tarfile.TarInfo("/etc/evil"), "outside the package folder"),
    (_link(f"{NAME}/model.gguf", "/etc/passwd"), "link or special file"),
    (_link(f"{NAME}/model.gguf", f"{NAME}/manifest.json", tarfile.LNKTYPE), "link or special file"),
    (tarfile.TarInfo("another-top/file"), "one package folder at the top"),
], ids=["dot-dot", "absolute", "symlink", "hardlink", "two-tops"])
def test_a_tar_that_could_escape_or_link_is_refused(tmp_path, member, said):
    archive = hostile_tar(tmp_path / "evil.tar", member)
    result = run("models", "import", archive, "--home", tmp_path / "box")
    assert result.exit_code != 0 and said in result.output, result.output
    assert leftovers(tmp_path / "box") == [] and not (tmp_path / "evil.py").exists()


def test_a_truncated_export_leaves_nothing_behind(tmp_path, package):
    out = tmp_path / "tiny.tar"
    assert run("models", "export", package, "--out", out).exit_code == 0
    with tarfile.open(out) as tar:
        member = tar.getmember(f"{NAME}/model.gguf")
    out.write_bytes(out.read_bytes()[: member.offset_data + member.size // 2])  # the copy stopped half-way through it
    result = run("models", "import", out, "--home", tmp_path / "box")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # an error, not a crash
    assert "Error:" in result.output and leftovers(tmp_path / "box") == []


def test_only_packages_export(tmp_path):
    result = run("models", "export", "smollm2-135m-instruct", "--out", tmp_path / "x.tar", "--home", tmp_path)
    assert result.exit_code == 1 and ("not a model package" in result.output or "not installed" in result.output)
    assert not (tmp_path / "x.tar").exists()


def test_the_admin_api_imports_a_tar_on_the_box_and_refuses_a_damaged_one(make_box, tmp_path, package, keys):
    from models.catalog import list_models
    from tests.helpers import assert_openai_error

    private, public = keys
    out = tmp_path / "tiny.tar"
    assert run("models", "export", package, "--out", out, "--sign", private).exit_code == 0
    box = make_box()
    box.state.models.catalog = lambda: list_models(home=box.settings.home)  # the real catalog: registered packages
    r = box.client.post("/api/models/import", json={"path": str(out), "public_key": str(public)})
    assert r.status_code == 201, r.get_data(as_text=True)
    assert r.get_json()["id"] == NAME and not r.get_json()["loaded"]
    assert NAME in [m["id"] for m in box.client.get("/v1/models").get_json()["data"]]
    error = assert_openai_error(box.client.post("/api/models/import", json={"path": str(out)}), 422, "import_failed",
                                "path")
    assert "already exists" in error["message"]
    assert_openai_error(box.client.post("/api/models/import", json={"path": str(tmp_path / "nope.tar")}), 400,
                        "file_not_found", "path")
    assert leftovers(box.settings.home) == [NAME]
    assert box.last_row()["endpoint"] == "/api/models/import"  # an admin change is a log row, as every POST
