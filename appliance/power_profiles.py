"""What the box itself does when the service goes idle or wakes: small declarative profiles.

Each step is a command or a sysfs write. A step that cannot run (tool
missing, no permission) is reported, never raised: the service must serve
without root. ``dry_run`` records what would run.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]


@dataclass(frozen=True)
class SysfsWrite:
    pattern: str  # glob of files, e.g. every CPU's scaling_governor
    value: str


@dataclass(frozen=True)
class Profile:
    name: str
    on_idle: tuple = ()
    on_active: tuple = ()
    description: str = ""


PROFILES = {
    "none": Profile("none", description="change nothing on the box"),
    "linux-cpufreq": Profile(
        "linux-cpufreq",
        on_idle=(SysfsWrite("/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor", "powersave"),),
        on_active=(SysfsWrite("/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor", "schedutil"),),
        description="cpufreq governor powersave when idle, schedutil when active",
    ),
    "jetson": Profile(
        "jetson",
        # nvpmodel mode numbers differ per module; 0 is MAXN on Orin, the highest-numbered modes are the lowest power.
        on_idle=(Command(("jetson_clocks", "--restore")), Command(("nvpmodel", "-m", "1"))),
        on_active=(Command(("nvpmodel", "-m", "0")), Command(("jetson_clocks",))),
        description="nvpmodel low-power mode and default clocks when idle, MAXN and jetson_clocks when active",
    ),
}


def detect_profile() -> str:
    """The profile 'auto' means on this box."""
    if Path("/etc/nv_tegra_release").exists() or shutil.which("nvpmodel"):
        return "jetson"
    if glob.glob("/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor"):
        return "linux-cpufreq"
    return "none"


def get_profile(name: str) -> Profile:
    name = detect_profile() if name == "auto" else name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown power profile {name!r}: use auto or one of {', '.join(PROFILES)}") from None


def apply(steps: tuple, dry_run: bool = False, root: str = "") -> list[dict]:
    """Run the steps; one result per step: {"step", "ok", "detail"}. ``root`` prefixes sysfs paths (tests)."""
    return [_run_step(step, dry_run, root) for step in steps]


def _run_step(step, dry_run: bool, root: str) -> dict:
    if isinstance(step, Command):
        return _run_command(step, dry_run)
    return _write_sysfs(step, dry_run, root)


def _run_command(step: Command, dry_run: bool) -> dict:
    text = " ".join(step.argv)
    if dry_run:
        return {"step": text, "ok": True, "detail": "dry run"}
    if shutil.which(step.argv[0]) is None:
        return {"step": text, "ok": False, "detail": f"{step.argv[0]} not found"}
    try:
        done = subprocess.run(step.argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"step": text, "ok": False, "detail": str(exc)}
    detail = (done.stderr or done.stdout).strip()[:200] or f"exit {done.returncode}"
    return {"step": text, "ok": done.returncode == 0, "detail": detail}


def _write_sysfs(step: SysfsWrite, dry_run: bool, root: str) -> dict:
    text = f"{step.value} > {step.pattern}"
    paths = sorted(glob.glob(root + step.pattern))
    if not paths:
        return {"step": text, "ok": False, "detail": "no such files on this box"}
    if dry_run:
        return {"step": text, "ok": True, "detail": f"dry run ({len(paths)} files)"}
    failed = []
    for path in paths:
        try:
            Path(path).write_text(step.value)
        except OSError as exc:
            failed.append(f"{path}: {exc.strerror}")
    if failed:
        return {"step": text, "ok": False, "detail": "; ".join(failed[:3])}
    return {"step": text, "ok": True, "detail": f"{len(paths)} files"}
