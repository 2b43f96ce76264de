"""Shared fixtures: a real ``appliance serve`` process on loopback, the real bundled model, a real SQLite log."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

# Offline means offline, for the tests too.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ServedModel:
    """One way to serve MODEL: the environment that picks it and what /readyz then reports."""

    backend: str
    quantization: str
    env: dict


@pytest.fixture(scope="session")
def smollm2_onnx(request) -> Path:
    """SmolLM2-135M-Instruct exported to ONNX INT4; kept in pytest's cache between sessions while it verifies."""
    from tests.onnx_models import smollm2_package

    return smollm2_package(Path(request.config.cache.mkdir("onnx-models")))


@pytest.fixture(scope="session", params=["llama.cpp", "onnxruntime"])
def served_model(request) -> ServedModel:
    """Every test of a running service runs once per backend."""
    if request.param == "llama.cpp":
        return ServedModel("llama.cpp", "Q4_1", env={})
    folder = request.getfixturevalue("smollm2_onnx")
    return ServedModel("onnxruntime", "int4-block16-asym-head8", env={"APPLIANCE_MODEL": str(folder)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """A real ``appliance serve`` subprocess with its own data folder."""

    home: Path
    port: int
    proc: subprocess.Popen
    log_path: Path
    backend: str = "llama.cpp"  # what /readyz should report
    quantization: str = "Q4_1"
    ca_file: Path | None = None  # set: the service speaks HTTPS with this (self-signed) certificate

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.home / "logs.db"

    def rows(self) -> list[dict]:
        """Request log rows, oldest first."""
        return self._read(lambda db: db.recent_requests(100000))

    def power_rows(self) -> list[dict]:
        """Power state changes, oldest first."""
        return self._read(lambda db: db.power_events(100000))

    def _read(self, query) -> list[dict]:
        from appliance.db import Database

        db = Database(self.db_path, readonly=True)
        try:
            return list(reversed(query(db)))
        finally:
            db.close()

    def row(self, request_id: int) -> dict:
        return next(r for r in self.rows() if r["id"] == request_id)

    def last_row(self, wait_finished: bool = True, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            row = self.rows()[-1]
            if row["finished"] or not wait_finished or time.monotonic() > deadline:
                return row
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log_path.read_text()


def start_service(
    home: Path, extra_env: dict | None = None, args: tuple = (), model: ServedModel | None = None,
    ca_file: Path | None = None,
) -> Service:
    port = free_port()
    model = model or ServedModel("llama.cpp", "Q4_1", env={})
    env = {**os.environ, "APPLIANCE_HOME": str(home), "PYTHONUNBUFFERED": "1", **model.env, **(extra_env or {})}
    env = {name: value for name, value in env.items() if value is not None}  # None in extra_env unsets it
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--threads", "2", *args],
        env=env,
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
    )
    service = Service(home, port, proc, log_path, backend=model.backend, quantization=model.quantization,
                      ca_file=ca_file)
    verify = str(ca_file) if ca_file else True
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"appliance serve exited with {proc.returncode}:\n{service.output()}")
        try:
            if requests.get(service.url + "/readyz", timeout=1, verify=verify).status_code == 200:
                return service
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    service.stop(signal.SIGKILL)
    raise RuntimeError(f"appliance serve did not get ready in 60 s:\n{service.output()}")


@pytest.fixture(scope="session")
def service(tmp_path_factory, served_model):
    svc = start_service(tmp_path_factory.mktemp("home"), model=served_model)
    yield svc
    svc.stop()


@pytest.fixture
def fresh_service(tmp_path, served_model):
    """A service of this test's own, for tests that stop it or change its settings."""
    services = []

    def start(**env):
        svc = start_service(tmp_path / f"home{len(services)}", extra_env=env, model=served_model)
        services.append(svc)
        return svc

    yield start
    for svc in services:
        if svc.proc.poll() is None:
            svc.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def openai_client(service):
    import openai

    return openai.OpenAI(base_url=service.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


# -- a full disk ------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs of this test's own, so that filling it harms nothing else."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                                 capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command here to make a small tmpfs to fill")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True, timeout=30)


def fill_disk(folder: Path) -> Path:
    """Write a file until not one more byte fits; deleting it frees the space again."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler
