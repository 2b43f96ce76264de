"""What llama.cpp says it did while loading a model and making its context: devices, offloaded layers,
flash attention and the KV cache's type, read from its own log lines rather than from what was asked.

llama.cpp has no call that returns these, but it logs each of them as it decides (a CPU-only build puts
every layer on the CPU whatever gpu_layers asked; a quantized V cache turns flash attention on). The lines
read here are those of the llama.cpp vendored by llama-cpp-python 0.3.x; a line that is missing leaves its
fact unknown (None), never guessed.
"""

from __future__ import annotations

import ctypes
import re
from collections import Counter
from contextlib import contextmanager

from appliance.backends import cxx_runtime

cxx_runtime.preload_cxx_runtime()  # before llama.cpp's libraries load: see cxx_runtime

import llama_cpp  # noqa: E402

_LAYER = re.compile(r"layer\s+\d+ assigned to device (\S+?),")
_FLASH = re.compile(r"llama_context: flash_attn\s+=\s+(\w+)")
_KV = re.compile(r"llama_kv_cache: size = .*K \((\w+)\): .*V \((\w+)\)")
_KV_SIZE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB")
_KV_DEVICE = re.compile(r"llama_kv_cache: layer\s+\d+: dev = (\S+)")


@contextmanager
def captured_log():
    """llama.cpp's log lines while the block runs (nothing printed); llama-cpp-python's own logger after it."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def load_report(lines: list[str]) -> dict:
    """The facts the log holds: device (where most layers are), layers and how many are on a GPU, kv_device,
    flash_attn ("enabled"/"disabled"), kv_cache_type and kv_cache_mib (every slot's)."""
    text = "".join(lines)
    layers = Counter(_LAYER.findall(text))
    kv_devices = Counter(_KV_DEVICE.findall(text))
    flash = _FLASH.search(text).group(1) if _FLASH.search(text) else None
    if flash == "auto":  # decided when the graphs are built: flash attention nodes in them, or none
        flash = "enabled" if "(FLASH_ATTN_EXT)" in text else "disabled"
    kv = _KV.search(text)
    kv_size = _KV_SIZE.search(text)
    return {
        "device": layers.most_common(1)[0][0] if layers else None,
        "layers": sum(layers.values()) or None,
        "gpu_layers_offloaded": sum(n for device, n in layers.items() if not device.startswith("CPU")) if layers else None,
        "kv_device": kv_devices.most_common(1)[0][0] if kv_devices else None,
        "flash_attn": flash,
        "kv_cache_mib": float(kv_size.group(1)) if kv_size else None,
        "kv_cache_type": kv.group(1) if kv and kv.group(1) == kv.group(2) else (f"{kv.group(1)}/{kv.group(2)}" if kv else None),
    }
