"""Quantization-aware fine-tuning: closer to the float model than rounding alone, carried exactly into both formats."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("gguf")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from distill.calibration import text_calibration  # noqa: E402
from distill.gptq import Grid  # noqa: E402
from distill.qat import kl_from_float, train_on_grids  # noqa: E402
from tests.distill_helpers import (  # noqa: E402
    assert_gguf_holds, assert_onnx_holds, export_with_gptq, greedy_text, read_quantization, runner_for,
)
from tests.onnx_models import CORPUS, build_tiny_llama  # noqa: E402


@pytest.mark.slow
def test_qat_follows_the_float_model_closer_than_rounding_alone(tmp_path):
    src = build_tiny_llama(tmp_path / "tiny")
    samples = text_calibration(AutoTokenizer.from_pretrained(src), "\n".join(CORPUS * 8), count=256, length=64)
    grid = Grid(block_size=32, symmetric=True)
    float_model = AutoModelForCausalLM.from_pretrained(src).eval()
    rounded = AutoModelForCausalLM.from_pretrained(src).eval()
    trained = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        for layer in rounded.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(grid.snap(module.weight))
    names = train_on_grids(trained, samples, lambda name, width: grid, steps=60)
    assert len(names) == 14
    for name in names:  # left on the grid
        weight = trained.get_submodule(name).weight.detach()
        assert torch.equal(grid.snap(weight), weight), name
    with torch.no_grad():
        before = kl_from_float(float_model, rounded, samples[:32])
        after = kl_from_float(float_model, trained, samples[:32])
    assert after < 0.6 * before


@pytest.mark.slow
def test_qat_packages_hold_exactly_the_trained_weights_and_generate(tmp_path):
    src, packages, expected = export_with_gptq(tmp_path, "arm", gguf_quant="Q4_0", algorithm="qat")
    folder, rounded = expected["gguf"]
    assert assert_gguf_holds(packages["gguf"], folder, rounded, src) == {"Q4_0"}
    assert read_quantization(packages["gguf"]) == "Q4_0-qat"
    folder, rounded = expected["onnx"]
    assert_onnx_holds(packages["onnx"], folder, rounded)
    assert read_quantization(packages["onnx"]) == "int4-block64-sym-qat-head8-mixed"
    for package in packages.values():
        assert greedy_text(runner_for(package), "The quick brown fox", n=8)
