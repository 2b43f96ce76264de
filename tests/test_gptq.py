"""GPTQ rounding: better than round-to-nearest where it is measured, and carried bit for bit into both formats."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("gguf")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from distill.calibration import sampled_calibration  # noqa: E402
from distill.gptq import Grid, gptq_weight  # noqa: E402
from tests.distill_helpers import (  # noqa: E402
    assert_gguf_holds, assert_onnx_holds, dequantize_matmul_nbits, export_with_gptq, greedy_text, read_quantization,
    runner_for,
)
from tests.onnx_models import build_tiny_llama  # noqa: E402


def correlated_layer(seed: int = 0):
    """A weight and the Hessian of inputs whose channels are correlated, as real activations are."""
    generator = torch.Generator().manual_seed(seed)
    width = 128
    mixing = torch.randn(width, width, generator=generator) / width**0.5
    x = torch.randn(4096, width, generator=generator) @ mixing + 0.1 * torch.randn(4096, width, generator=generator)
    return torch.randn(64, width, generator=generator) * 0.05, 2 * x.T @ x / len(x)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_moves_the_layer_output_less_than_round_to_nearest(symmetric):
    weight, hessian = correlated_layer()
    grid = Grid(block_size=32, symmetric=symmetric)

    def output_error(rounded):  # E ||(W - Q) x||^2 over the inputs, up to a constant
        delta = weight - rounded
        return torch.trace(delta @ hessian @ delta.T).item()

    rtn, gptq = grid.round_to_nearest(weight), gptq_weight(weight, hessian, grid)
    assert output_error(gptq) < 0.7 * output_error(rtn)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("width", [256, 576])  # 576 = 4.5 blocks of 128 (SmolLM2): ONNX Runtime pads the last one
@pytest.mark.parametrize("fp16", [False, True])  # the gpu and jetson profiles quantize an fp16 graph
@pytest.mark.parametrize("method", ["gptq", "snap"])  # snap: the pinned round-to-nearest QAT trains through
def test_onnx_runtimes_own_quantizer_gives_back_the_rounded_weights(symmetric, width, fp16, method):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    grid = Grid(block_size=128, symmetric=symmetric, fp16=fp16)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2048, width, generator=generator)
    weight = torch.randn(256, width, generator=generator) * 0.05
    rounded = (gptq_weight(weight, 2 * x.T @ x / len(x), grid) if method == "gptq" else grid.snap(weight)).numpy()
    dtype = np.float16 if fp16 else np.float32
    rows, blocks = rounded.shape[0], -(-width // 128)
    packed = np.zeros((rows, blocks, 64), np.uint8)
    scales = np.zeros((rows, blocks), dtype)
    zero_points = np.zeros((rows, (blocks + 1) // 2), np.uint8)
    weights = np.ascontiguousarray(rounded.T.astype(dtype))
    assert np.array_equal(weights.astype(np.float32).T, rounded), "every rounded weight is exact in the graph's type"
    quantize_matmul_4bits(packed, weights, scales, zero_points, 128, rows, width, symmetric)
    stored = dequantize_matmul_nbits(packed, scales, None if symmetric else zero_points, rows, width)
    np.testing.assert_array_equal(stored, rounded)


@pytest.mark.slow
def test_sampled_calibration_is_the_models_own_chat_text(tmp_path):
    folder = build_tiny_llama(tmp_path / "tiny")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    samples = sampled_calibration(model, tokenizer, count=3, length=40, batch=4)
    assert samples.shape == (3, 40)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in samples[0].tolist()  # prompts in the chat format
    assert torch.equal(samples, sampled_calibration(model, tokenizer, count=3, length=40, batch=4)), "seeded"


@pytest.mark.slow
def test_sampled_calibration_samples_the_prompts_again_until_it_has_enough(tmp_path, monkeypatch):
    monkeypatch.setattr("distill.generate.DEFAULT_PROMPTS", ["Name a colour.", "Count to three.", "Say hello."])
    folder = build_tiny_llama(tmp_path / "tiny")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    samples = sampled_calibration(model, tokenizer, count=8, length=32, batch=4)
    assert samples.shape == (8, 32)  # 3 prompts and answers of up to 32 tokens give fewer than 256 tokens a pass


@pytest.mark.slow
def test_sampled_calibration_pads_a_batch_when_the_tokenizer_has_no_pad_token(tmp_path):
    """A tokenizer transformers reads from a GGUF (SmolLM2's) has none: the end-of-text token pads instead."""
    folder = build_tiny_llama(tmp_path / "tiny")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    assert sampled_calibration(model, tokenizer, count=2, length=24, batch=4).shape == (2, 24)


@pytest.fixture(scope="module")
def gptq_arm(tmp_path_factory):
    """arm with Q4_0 (--gguf-quant), the GGUF type whose whole grid GPTQ reproduces."""
    return export_with_gptq(tmp_path_factory.mktemp("gptq-arm"), "arm", gguf_quant="Q4_0")


@pytest.mark.slow
def test_the_gguf_q4_0_package_holds_exactly_the_gptq_weights(gptq_arm):
    src, packages, expected = gptq_arm
    folder, rounded = expected["gguf"]
    assert len(rounded) == 14, "every decoder Linear of both layers"
    assert assert_gguf_holds(packages["gguf"], folder, rounded, src) == {"Q4_0"}
    assert read_quantization(packages["gguf"]) == "Q4_0-gptq"


@pytest.mark.slow
def test_the_onnx_package_holds_exactly_the_gptq_weights_and_keeps_8_bits_where_mixed(gptq_arm):
    src, packages, expected = gptq_arm
    folder, rounded = expected["onnx"]
    assert len(rounded) == 12, "layer 1's v_proj and down_proj are 8-bit in the mixed profile, so GPTQ leaves them"
    assert_onnx_holds(packages["onnx"], folder, rounded)
    assert read_quantization(packages["onnx"]) == "int4-block64-sym-gptq-head8-mixed"


@pytest.mark.slow
def test_the_gpu_profile_gets_exact_gptq_in_fp16_onnx_and_in_q4_k_ms_q5_0_rows(tmp_path):
    """gpu: an fp16 graph with asymmetric blocks of 128 over 64-wide rows (one short block each), and Q4_K_M,
    which stores rows that are not whole 256-blocks in Q5_0."""
    src, packages, expected = export_with_gptq(tmp_path, "gpu")
    folder, rounded = expected["onnx"]
    assert len(rounded) == 12
    assert_onnx_holds(packages["onnx"], folder, rounded)
    assert read_quantization(packages["onnx"]) == "int4-block128-asym-gptq-head8-mixed-fp16"
    folder, rounded = expected["gguf"]
    assert rounded, "some Linears are Q5_0 in this recipe"
    assert assert_gguf_holds(packages["gguf"], folder, rounded, src) == {"Q5_0"}
    assert read_quantization(packages["gguf"]) == "Q4_K_M-gptq-imatrix", "the rows left to llama.cpp get the imatrix"
    for package in packages.values():
        assert greedy_text(runner_for(package), "The quick brown fox", n=8)


@pytest.mark.slow
def test_the_arm_profiles_iq4_nl_gguf_holds_exactly_the_gptq_weights(tmp_path):
    """IQ4_NL's grid is non-linear (scale * one of 16 values): llama.cpp's own quantizer gives GPTQ's weights back."""
    src, packages, expected = export_with_gptq(tmp_path, "arm", algorithm="gptq")
    folder, rounded = expected["gguf"]
    assert len(rounded) == 14
    assert assert_gguf_holds(packages["gguf"], folder, rounded, src) == {"IQ4_NL"}
    assert read_quantization(packages["gguf"]) == "IQ4_NL-gptq"
    assert greedy_text(runner_for(packages["gguf"]), "The quick brown fox", n=8)


@pytest.mark.slow
def test_gptq_packages_load_and_generate_in_both_backends(gptq_arm):
    _, packages, _ = gptq_arm
    for package in packages.values():
        assert greedy_text(runner_for(package), "The quick brown fox", n=8)
