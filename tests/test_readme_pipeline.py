"""The README's pipeline walk-through runs as written: its commands, in order, on a tiny teacher and few steps.

The command lines are read from README.md's pipeline section, so the docs cannot drift from what runs. Each
runs as its own process in a scratch folder, exactly as written, with only settings appended that make it
small: a tiny random Llama as the teacher instead of SmolLM2 (whose training takes hours on a CPU), a few
texts, steps and calibration sequences. The last command, ``appliance serve``, must answer a completion.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

for needed in ("torch", "transformers", "accelerate", "onnx", "gguf", "onnxruntime", "llama_cpp"):
    pytest.importorskip(needed)

import requests  # noqa: E402

from tests.helpers import free_port  # noqa: E402
from tests.onnx_models import build_tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SECTION = "## From a big model to an INT4 package on the box"
APPLIANCE = Path(sys.executable).with_name("appliance")  # the console script the README's reader runs

# Appended to each README command line: its tiny settings ({teacher} and {port} are filled in). A command the
# README gains must get its line here, so that the test never runs the real thing by accident.
TINY = {
    ("distill", "generate"): "--teacher {teacher} --generate-n 24 --gen-max-new-tokens 32 --gen-batch-size 8",
    ("distill", "train"): "--teacher {teacher} --max-steps 2 --batch-size 2 --block-size 32 --warmup-steps 1 "
                          "--eval-every 0 --eval-batches 1 --checkpoint-every 0 --log-every 1 --val-fraction 0.3",
    ("export",): "--qat-steps 2 --calibration-sequences 2",
    ("models", "add"): "",
    ("serve",): "--port {port} --threads 1 --parallel 1",
}
STEP_TIMEOUT_S = 600


def readme_commands() -> list[list[str]]:
    """The command lines of the README's pipeline section, split as a shell splits them (comments dropped)."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [words for line in block.splitlines() if (words := shlex.split(line, comments=True))]


def with_tiny_settings(words: list[str], **values) -> list[str]:
    assert words[0] == "appliance", f"the walk-through runs appliance commands only, not {shlex.join(words)}"
    known = [key for key in TINY if tuple(words[1 : 1 + len(key)]) == key]
    assert known, f"no tiny settings for {shlex.join(words)}: add them to TINY"
    return [str(APPLIANCE), *words[1:], *TINY[max(known, key=len)].format(**values).split()]


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A fresh folder to run the commands in, as a checkout's root: distill/configs/ is the repository's."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "distill").symlink_to(REPO / "distill")  # the whole package: a bare folder would shadow it for `python -m`
    return work


@pytest.fixture
def environment(tmp_path) -> dict:
    """Offline, a data folder of the test's own, and one thread per process (tiny models on a shared box)."""
    (tmp_path / "home").mkdir()
    return {**os.environ, "APPLIANCE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_the_readme_pipeline_runs_as_written(workspace, environment, tmp_path):
    *steps, serve = readme_commands()
    assert steps and serve[:2] == ["appliance", "serve"], "the walk-through ends by serving a package"
    teacher = build_tiny_llama(tmp_path / "teacher")
    for words in steps:
        done = subprocess.run(with_tiny_settings(words, teacher=teacher), cwd=workspace, env=environment,
                              capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        assert done.returncode == 0, f"{shlex.join(words)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    port = free_port()
    answer_from_served(with_tiny_settings(serve, port=port), port, workspace, environment)


def answer_from_served(command: list[str], port: int, workspace: Path, environment: dict) -> None:
    """Start the serve command, ask it for a completion, stop it."""
    log = workspace / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=workspace, env=environment, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log)
        reply = requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "The quick", "max_tokens": 4},
                              timeout=120)
        assert reply.status_code == 200 and reply.json()["choices"], reply.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()}"
        try:
            if requests.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"serve did not get ready in {timeout} s:\n{log.read_text()}")
