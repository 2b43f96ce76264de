"""The ONNX Runtime backend on the CUDA execution provider: skipped where onnxruntime-gpu or a GPU is missing (CI).

Run on a GPU machine (onnxruntime-gpu installed) with ``pytest -m gpu tests/test_onnx_cuda.py``; with
``APPLIANCE_TEST_ONNX_PACKAGE`` naming an exported SmolLM2 package, the real-model tests run too.

What it holds the CUDA path to: the KV cache stays on the GPU across steps and re-packing (every cache array an
OrtValue on the device), greedy sequences bring back only their chosen tokens (no logits), continuous batching
admits a request mid-way as on the CPU, and batched greedy tokens equal each sequence's own.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")

from appliance.backends import onnx_runtime  # noqa: E402
from appliance.backends.base import SamplingParams  # noqa: E402
from appliance.runner.prompt import chat_tokens  # noqa: E402
from tests.onnx_models import build_tiny_llama, export_tiny  # noqa: E402
from tests.test_onnx_backend import (GREEDY, PROMPTS, QUESTIONS, Run, greedy, loaded, run_together,  # noqa: E402
                                     tokens)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="onnxruntime without the CUDA execution provider (onnxruntime-gpu not installed)"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = build_tiny_llama(tmp_path_factory.mktemp("tiny-cuda") / "hf")
    return {"fp32": export_tiny(hf, hf.parent / "onnx-fp32", int4=False),
            "int4": export_tiny(hf, hf.parent / "onnx-int4", int4=True)}


def on_cuda(folder, slots: int = 1, **kwargs):
    backend = loaded(folder, slots=slots, provider="cuda", **kwargs)
    if backend.provider != "cuda":
        pytest.skip("no GPU: the CUDA execution provider did not start")
    return backend


def cache_devices(backend) -> set[str]:
    return {value.device_name().lower() if hasattr(value, "device_name") else "numpy"
            for cache in backend._caches.values() for value in cache.values if cache.length}


class LogitsSpy:
    """Counts the steps whose logits crossed to the host (SlotSampler.sample got them)."""

    def __init__(self, monkeypatch):
        self.with_logits = self.without = 0
        original = onnx_runtime.SlotSampler.sample

        def sample(sampler, logits, best=None, mask=None):
            if logits is None:
                self.without += 1
            else:
                self.with_logits += 1
            return original(sampler, logits, best, mask)

        monkeypatch.setattr(onnx_runtime.SlotSampler, "sample", sample)


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_cuda_session_and_greedy_tokens_match_the_cpu(tiny, kind):
    gpu, cpu = on_cuda(tiny[kind]), loaded(tiny[kind], provider="cpu")
    assert gpu.facts.info["provider"] == "cuda" and gpu.facts.info["kv_cache_device"] == "cuda"
    assert gpu._graph.picks_logits and gpu._graph.argmaxes  # ort_graphs.picking_logits, on the GPU too
    if kind == "fp32":  # every position's logits (scoring) as the CPU's
        prompt = tokens(gpu, PROMPTS[0])
        np.testing.assert_allclose(gpu.logits(prompt), cpu.logits(prompt), rtol=0, atol=1e-2)  # TF32 matmuls
    agree = [greedy(gpu, tokens(gpu, p), 24) == greedy(cpu, tokens(cpu, p), 24) for p in PROMPTS]
    # fp32 must agree; INT4's CPU kernel quantizes activations to int8 (accuracy_level 4), CUDA's does not.
    assert all(agree) if kind == "fp32" else any(agree), agree


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_cuda_batched_greedy_equals_each_alone_and_the_cache_stays_on_the_gpu(tiny, kind, monkeypatch):
    backend = on_cuda(tiny[kind], slots=len(PROMPTS))
    alone = [greedy(backend, tokens(backend, p), 24) for p in PROMPTS]
    backend.clear()
    spy = LogitsSpy(monkeypatch)
    run = Run(backend, endless=True)
    for rid, prompt in enumerate(PROMPTS):
        run.submit(rid, SamplingParams(temperature=0, max_tokens=24), prompt=prompt)
    run.until_idle()
    assert [run.engine.sampled[rid] for rid in range(len(PROMPTS))] == alone
    assert cache_devices(backend) == {"cuda"}, cache_devices(backend)
    assert spy.with_logits == 0 and spy.without >= 24 * len(PROMPTS)  # greedy: only the tokens crossed


def test_cuda_join_mid_way_repacks_on_the_gpu_and_sampling_brings_logits(tiny, monkeypatch):
    backend = on_cuda(tiny["fp32"], slots=3)
    first_alone = greedy(backend, tokens(backend, PROMPTS[0]), 30)
    backend.clear()
    run = Run(backend, endless=True)
    run.submit(1, SamplingParams(temperature=0, max_tokens=30), prompt=PROMPTS[0])
    for _ in range(5):
        run.sched.tick()
    spy = LogitsSpy(monkeypatch)
    run.submit(2, SamplingParams(temperature=0.8, seed=7, max_tokens=12), prompt=PROMPTS[1])  # joins mid-way
    run.sched.tick()
    assert len(run.engine.steps[-1]) == 2
    run.until_idle()
    assert run.engine.sampled[0] == first_alone  # the join re-packed its cache (on the GPU) without changing it
    assert spy.with_logits >= 12  # the sampling sequence needs its logits on the host
    assert cache_devices(backend) == {"cuda"}


def test_cuda_prefix_reuse_and_detach_stay_on_the_gpu(tiny):
    backend = on_cuda(tiny["fp32"], slots=2)
    prompt = tokens(backend, PROMPTS[2])
    cold = greedy(backend, prompt, 16)
    run_together(backend, PROMPTS[:2], 8)  # slot 0 and 1 end inside one batch
    backend.start_sequence(0, 3, GREEDY)  # keep 3 tokens of a batched cache: a detach on the device
    assert cache_devices(backend) == {"cuda"}
    backend.clear()
    assert greedy(backend, prompt, 16) == cold


@pytest.fixture(scope="module")
def smollm2_cuda():
    folder = os.environ.get("APPLIANCE_TEST_ONNX_PACKAGE")
    if not folder:
        pytest.skip("APPLIANCE_TEST_ONNX_PACKAGE names no exported SmolLM2 package")
    return on_cuda(Path(folder), slots=8, context_length=1024)


def test_smollm2_on_cuda_answers_and_eight_together_equal_each_alone(smollm2_cuda, record_property):
    backend = smollm2_cuda
    run = Run(backend)
    run.submit(1, SamplingParams(temperature=0, max_tokens=24), "What is the capital of France?")
    run.until_idle()
    assert "Paris" in run.texts()[1]
    n = 48
    prompts = [chat_tokens(backend, [{"role": "user", "content": q}]) for q in QUESTIONS]
    together = run_together(backend, QUESTIONS, n)
    alone = [greedy(backend, p, n) for p in prompts]
    identical = sum(a == t for a, t in zip(alone, together))
    record_property("identical_answers", identical)
    assert identical == len(QUESTIONS), [(a[:8], t[:8]) for a, t in zip(alone, together) if a != t]
