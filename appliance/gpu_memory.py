"""GPU memory through NVML (the optional ``nvidia-ml-py``, imported as ``pynvml``), for /api/status and the pool.

The service runs without it and without a GPU: every reading is then None and the pool's GPU check passes.
NVML is the driver's own count, so a reading includes every process on the GPU: the runners (llama.cpp with
layers offloaded, ONNX Runtime on CUDA) and anything else. Deep idle ends the runners, and with them their CUDA
contexts, so their memory shows as free again (bench/results/gpu_power).
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)
MIB = 2**20
_lock = threading.Lock()
_nvml = None  # the pynvml module once initialised; False once it failed (no package, no driver, no GPU)


def _init():
    global _nvml
    with _lock:
        if _nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml = pynvml
            except Exception as exc:  # ImportError, or pynvml.NVMLError (no driver, no device, no library)
                log.info("GPU memory not reported: %s", exc or type(exc).__name__)
                _nvml = False
        return _nvml or None


def read() -> list[dict] | None:
    """Per GPU: index, name, memory_used_mib, memory_total_mib, utilization_percent and processes (pid and
    used_mib of each, where the driver tells); None without NVML or a GPU."""
    nvml = _init()
    if nvml is None:
        return None
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            gpus.append({
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_used_mib": memory.used // MIB,
                "memory_total_mib": memory.total // MIB,
                "utilization_percent": _utilization(nvml, handle),
                "processes": _processes(nvml, handle),
            })
        return gpus
    except nvml.NVMLError as exc:
        log.warning("NVML failed to read the GPUs: %s", exc)
        return None


def _utilization(nvml, handle) -> int | None:
    try:
        return int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except nvml.NVMLError:
        return None


def _processes(nvml, handle) -> list[dict]:
    try:
        running = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:
        return []
    # usedGpuMemory is None where the driver cannot tell (some containers).
    return [{"pid": p.pid, "used_mib": None if p.usedGpuMemory is None else p.usedGpuMemory // MIB} for p in running]


def on_gpu(info: dict) -> bool:
    """Whether a loaded model's engine facts (ModelFacts.info) put it on a GPU: llama.cpp's device (CUDA0, ...)
    or ONNX Runtime's provider."""
    device = str(info.get("device") or "")
    return (bool(device) and not device.upper().startswith("CPU")) or info.get("provider") in ("cuda", "tensorrt")


def room_for(need_mib: int, loaded_infos: list[dict]) -> bool:
    """The pool's GPU check before a load: False only when a loaded model runs on a GPU (so the new one will
    too, and unloading one frees GPU memory) and the GPU with the most free memory has less than ``need_mib``.
    True without NVML, without a GPU, or with every model on the CPU."""
    if not any(on_gpu(info) for info in loaded_infos):
        return True
    gpus = read()
    if not gpus:
        return True
    return max(g["memory_total_mib"] - g["memory_used_mib"] for g in gpus) >= need_mib
