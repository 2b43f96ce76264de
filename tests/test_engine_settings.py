"""llama.cpp's GPU and KV cache settings reach the engine, and what it did is read back from llama.cpp itself.

CI has no GPU: these prove on the CPU build that gpu_layers auto resolves to none there (and says so), that
a quantized KV cache serves, and that /readyz, /v1/models and /metrics report the device llama.cpp used.
"""

from __future__ import annotations

import pytest
import requests

from models import find_model
from tests.helpers import MODEL, needs_bundled_model, start_service

pytestmark = [pytest.mark.slow, needs_bundled_model]


def loaded(**engine):
    from appliance.backends.llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend(find_model(MODEL).path, threads=2, context_length=512, n_slots=2, **engine)
    info = backend.load().info
    backend.close()
    return info


def test_gpu_layers_auto_resolves_to_what_the_build_can_do_and_is_reported():
    import llama_cpp

    info = loaded()
    if llama_cpp.llama_supports_gpu_offload():
        assert info["gpu_layers"] == -1 and info["gpu_layers_offloaded"] == info["layers"]
    else:
        assert info["gpu_layers"] == 0 and info["gpu_offload_supported"] is False
        assert (info["device"], info["kv_device"], info["provider"], info["gpu_layers_offloaded"]) == ("CPU", "CPU", "cpu", 0)
    assert info["layers"] >= 30  # SmolLM2-135M: 30 blocks and the output layer


def test_the_settings_reach_llama_cpp_and_are_read_back_from_it():
    assert loaded()["kv_cache_type"] == "f16"
    quantized = loaded(kv_cache_type="q8_0", flash_attn="auto")
    assert (quantized["kv_cache_type"], quantized["flash_attn"]) == ("q8_0", "enabled")  # a q8_0 V cache needs it
    assert loaded(kv_cache_type="q4_0")["kv_cache_type"] == "q4_0"
    assert loaded(flash_attn="off")["flash_attn"] == "disabled"
    asked = loaded(gpu_layers=8)
    assert asked["gpu_layers"] == 8 and asked["gpu_layers_offloaded"] == (8 if asked["gpu_offload_supported"] else 0)


def test_a_tensor_split_over_more_devices_than_the_build_has_is_a_clear_error():
    import llama_cpp
    from appliance.backends import BackendError

    with pytest.raises(BackendError, match="tensor_split"):
        loaded(tensor_split=[1.0] * (llama_cpp.llama_max_devices() + 1))


def test_a_q8_0_kv_cache_serves_and_the_device_is_reported_everywhere(tmp_path):
    svc = start_service(tmp_path / "home", extra_env={"APPLIANCE_KV_CACHE_TYPE": "q8_0"})
    try:
        r = requests.post(svc.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
        ready = requests.get(svc.url + "/readyz", timeout=10).json()["model"]
        assert (ready["kv_cache_type"], ready["flash_attn"], ready["device"]) == ("q8_0", "enabled", "CPU")
        listed = requests.get(svc.url + "/v1/models/" + MODEL, timeout=10).json()["appliance"]
        assert listed["gpu_layers_offloaded"] == 0 and listed["kv_cache_type"] == "q8_0"
        metrics = requests.get(svc.url + "/metrics", timeout=10).text
        assert f'appliance_model_device{{device="CPU",model="{MODEL}"}} 1.0' in metrics
        assert f'appliance_model_gpu_layers{{model="{MODEL}"}} 0.0' in metrics
    finally:
        svc.stop()
