"""GPU memory through NVML (nvidia-ml-py, optional): absent everywhere in CI, so a fake pynvml stands in for a GPU;
without it every reading is None, /api/status says so and the pool loads as before."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from appliance import gpu_memory
from tests.helpers import chat_body, CHAT

MIB = 2**20


class FakeNvml:
    """pynvml's calls the module makes, over one 80 GiB GPU with ``used`` MiB taken, two processes on it."""

    class NVMLError(Exception):
        pass

    def __init__(self, used_mib: int = 1144, total_mib: int = 81559):
        self.used, self.total = used_mib, total_mib

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self.used * MIB, total=self.total * MIB, free=(self.total - self.used) * MIB)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=4242, usedGpuMemory=1000 * MIB), SimpleNamespace(pid=7, usedGpuMemory=None)]


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(gpu_memory, "_nvml", None)
    return fake


@pytest.fixture
def no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    monkeypatch.setattr(gpu_memory, "_nvml", None)


def test_without_nvidia_ml_py_every_reading_is_none_and_the_pool_check_passes(no_nvml):
    assert gpu_memory.read() is None
    assert gpu_memory.room_for(10**9, [{"device": "CUDA0"}])


def test_a_gpu_through_nvml(nvml):
    [gpu] = gpu_memory.read()
    assert gpu == {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_used_mib": 1144, "memory_total_mib": 81559,
                   "utilization_percent": 37, "processes": [{"pid": 4242, "used_mib": 1000}, {"pid": 7, "used_mib": None}]}


def test_the_gpu_check_counts_only_when_models_run_on_a_gpu(nvml):
    nvml.used = nvml.total - 500  # 500 MiB free
    assert gpu_memory.room_for(400, [{"device": "CUDA0"}])
    assert not gpu_memory.room_for(600, [{"device": "CUDA0"}])
    assert not gpu_memory.room_for(600, [{"provider": "cuda"}])
    assert gpu_memory.room_for(600, [{"device": "CPU", "provider": "cpu"}, {"backend": "fake"}])  # all on the CPU
    assert gpu_memory.room_for(600, [])


def test_status_reports_the_gpu_or_null(make_box, nvml, monkeypatch):
    box = make_box()
    assert box.client.get("/api/status").get_json()["gpu"][0]["memory_total_mib"] == 81559
    monkeypatch.setattr(gpu_memory, "_nvml", False)  # NVML failed (no package, no driver, no GPU)
    assert box.client.get("/api/status").get_json()["gpu"] is None


def test_a_full_gpu_evicts_the_idle_model_that_runs_on_it(make_box, nvml, monkeypatch):
    box = make_box(extra_models={"second": {}})
    assert box.client.post(CHAT, json=chat_body("hi")).status_code == 200
    pool = box.state.models
    monkeypatch.setattr(gpu_memory, "on_gpu", lambda info: True)  # the fake engine says it runs on a GPU
    nvml.used = nvml.total  # and the GPU is full
    assert box.client.post(CHAT, json=chat_body("hi") | {"model": "second"}).status_code == 200
    assert [m.name for m in pool.loaded()] == ["second"]
    evicted = [e for e in box.db.model_events() if e["event"] == "evict"]
    assert evicted and evicted[0]["model"] == "fake"
