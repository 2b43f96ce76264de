"""`make test` does all set-up on a fresh machine, and CI runs exactly that command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "system-deps.sh"


def test_ci_runs_exactly_make_test():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert commands[-1] == "make test"
    assert not any("apt-get" in c for c in commands), "set-up belongs to make test, not to CI"


def _make_dry_run(*args: str) -> str:
    return subprocess.run(["make", "-n", "test", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


BROWSER = "sh tests/system-deps.sh /usr/bin/chromium=chromium /usr/bin/chromedriver=chromium-driver"
TOOLS = "sh tests/system-deps.sh --optional systemd-analyze=systemd sqlite3=sqlite3 ip=iproute2 unshare=util-linux"


def test_make_test_installs_the_tools_and_the_browser_first_unless_told_not_to():
    steps = _make_dry_run().splitlines()
    pytest_step = next(i for i, s in enumerate(steps) if "-m pytest" in s)
    assert steps.index(TOOLS) < pytest_step and steps.index(BROWSER) < pytest_step
    without = _make_dry_run("BROWSER_TESTS=no").splitlines()
    assert TOOLS in without and BROWSER not in without and any('-m pytest -m "not browser"' in s for s in without)


@pytest.fixture
def fake_system(tmp_path):
    """A PATH of stand-ins for id, sudo and apt-get that record how they were called."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    chromium, driver = bin_dir / "chromium", bin_dir / "chromedriver"
    (bin_dir / "env").symlink_to("/usr/bin/env")  # the script calls sudo env DEBIAN_FRONTEND=... apt-get

    def stub(path: Path, body: str) -> None:
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def run(uid: int, sudo: bool = True, apt_status: int = 0, apt_provides: bool = True, installed: bool = False):
        if installed:
            stub(chromium, "true"), stub(driver, "true")
        stub(bin_dir / "id", f"echo {uid}")
        provide = f'[ "$1" = install ] && : > {chromium} && : > {driver} && {shutil.which("chmod")} +x {chromium} {driver}'
        stub(bin_dir / "apt-get", f'echo "apt-get $*" >> {calls}\n{provide if apt_provides else ""}\nexit {apt_status}')
        if sudo:
            stub(bin_dir / "sudo", f'echo sudo >> {calls}; exec "$@"')
        args = [f"{chromium}=chromium", f"{driver}=chromium-driver"]
        result = subprocess.run(["/bin/sh", str(SCRIPT), *args], env={"PATH": str(bin_dir)}, capture_output=True,
                                text=True)
        return result, calls.read_text().splitlines() if calls.exists() else []

    if not Path("/usr/bin/env").exists():
        pytest.skip("the fake system links /usr/bin/env, which this machine lacks")
    return run


INSTALL = "apt-get install -y -qq --no-install-recommends chromium chromium-driver"


def test_root_installs_chromium_with_apt_get_directly(fake_system):
    result, calls = fake_system(uid=0)
    assert result.returncode == 0, result.stderr
    assert calls == ["apt-get update -qq", INSTALL]


def test_a_user_installs_through_sudo(fake_system):
    result, calls = fake_system(uid=1000)
    assert result.returncode == 0, result.stderr
    assert calls == ["sudo", "apt-get update -qq", "sudo", INSTALL]


def test_without_root_or_sudo_it_says_why_and_how_to_skip(fake_system):
    result, calls = fake_system(uid=1000, sudo=False)
    assert result.returncode == 1 and calls == []
    assert "sudo is not installed" in result.stderr and "make test BROWSER_TESTS=no" in result.stderr


def test_a_failed_apt_get_is_explained(fake_system):
    result, _ = fake_system(uid=0, apt_status=100, apt_provides=False)
    assert result.returncode == 1 and "apt-get failed" in result.stderr and "BROWSER_TESTS=no" in result.stderr


def test_packages_that_do_not_provide_the_binaries_are_reported(fake_system):
    result, _ = fake_system(uid=0, apt_provides=False)
    assert result.returncode == 1 and "still missing" in result.stderr


def test_nothing_is_installed_when_chromium_is_there(fake_system):
    result, calls = fake_system(uid=1000, installed=True)
    assert result.returncode == 0 and calls == []


def test_an_optional_tool_that_cannot_be_installed_is_a_warning(tmp_path):
    """systemd-analyze where apt-get is missing: the installer test skips its check, make test goes on."""
    (tmp_path / "id").write_text("#!/bin/sh\necho 1000\n")
    (tmp_path / "id").chmod(0o755)
    result = subprocess.run(["/bin/sh", str(SCRIPT), "--optional", "no-such-tool-here=systemd"],
                            env={"PATH": str(tmp_path)}, capture_output=True, text=True)
    assert result.returncode == 0 and "systemd" in result.stderr and "skipped" in result.stderr


def test_tools_that_are_there_need_nothing(tmp_path):
    result = subprocess.run(["/bin/sh", str(SCRIPT), "sh=dash", "/bin/sh=dash"], env={"PATH": "/bin:/usr/bin"},
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
