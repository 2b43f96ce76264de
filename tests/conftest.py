"""Shared fixtures: a real ``appliance serve`` on loopback with the bundled model, the fast tier's box over the
fake engine, headless Chromium. Their helpers are in tests/helpers.py."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import Box, ServedModel, start_chromium, start_service

# Offline means offline, for the tests too.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


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




# -- the fast tier's box ------------------------------------------------------------------------
@pytest.fixture
def make_box(tmp_path):
    """make_box(fake={...}, **settings): an app of this test's own; every row it logged must be finished."""
    boxes: list[Box] = []

    def make(fake: dict | None = None, extra_models: dict | None = None, **settings) -> Box:
        box = Box(tmp_path / f"box{len(boxes)}", fake or {}, settings, extra_models)
        boxes.append(box)
        return box

    yield make
    try:
        for box in boxes:
            open_rows = [r for r in box.rows() if r["finished"] is None or r["status"] is None]
            assert not open_rows, f"rows left unfinished: {open_rows}"
            assert box.state.power.in_flight == 0
            assert box.admission.stats()["busy_slots"] == 0
    finally:
        for box in boxes:
            box.close()


@pytest.fixture
def box(make_box) -> Box:
    return make_box()


# -- headless Chromium -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(tmp_path_factory.mktemp("chromium"))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
