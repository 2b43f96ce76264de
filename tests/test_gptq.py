"""GPTQ rounding: better than round-to-nearest where it is measured, and carried bit for bit into both formats."""

from __future__ import annotations

import gguf
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.export import ExportRequest, export
from distill.export_gguf import permute_qk
from distill.gptq import Grid, gptq_weight, sampled_calibration, text_calibration, write_rounded_copy
from distill.quantize_onnx import more_bits_layers
from tests.onnx_models import CORPUS, build_tiny_llama
from tests.test_export import greedy_text, runner_for


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
    # On the grid: the exporters' own round-to-nearest must give back exactly these weights.
    assert torch.equal(grid.round_to_nearest(gptq), gptq)
    assert not torch.equal(gptq, rtn)


def test_sampled_calibration_is_the_models_own_chat_text(tmp_path):
    folder = build_tiny_llama(tmp_path / "tiny")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    samples = sampled_calibration(model, tokenizer, count=3, length=40, batch=4)
    assert samples.shape == (3, 40)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in samples[0].tolist()  # prompts in the chat format
    assert torch.equal(samples, sampled_calibration(model, tokenizer, count=3, length=40, batch=4)), "seeded"


@pytest.fixture(scope="module")
def gptq_arm(tmp_path_factory):
    """The tiny Llama exported for arm with GPTQ, and the rounded weights the packages must carry."""
    work = tmp_path_factory.mktemp("gptq")
    src = build_tiny_llama(work / "tiny")
    text = work / "calibration.txt"
    text.write_text("\n".join(CORPUS * 4))
    packages = export(ExportRequest(src=src, out=work / "packages", target="arm", algorithm="gptq", calibration=text,
                                    measure=False), progress=lambda line: None)
    samples = text_calibration(AutoTokenizer.from_pretrained(src), text.read_text())
    expected = {}
    for fmt, skip in (("gguf", lambda name: False), ("onnx", lambda name: int(name.split(".")[2]) in more_bits_layers(2)
                                                        and name.endswith(("v_proj", "down_proj")))):
        rounded = write_rounded_copy(src, work / f"rounded-{fmt}", Grid(32, True), skip, samples)
        expected[fmt] = (work / f"rounded-{fmt}", rounded)
    return src, {p.name.rsplit("-", 1)[1]: p for p in packages}, expected


def hf_weights(folder) -> dict[str, np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {name: t.detach().numpy() for name, t in model.state_dict().items()}


@pytest.mark.slow
def test_the_gguf_q4_0_package_holds_exactly_the_gptq_weights(gptq_arm):
    src, packages, expected = gptq_arm
    folder, rounded = expected["gguf"]
    assert len(rounded) == 14, "every decoder Linear of both layers"
    weights, config = hf_weights(folder), AutoModelForCausalLM.from_pretrained(folder).config
    original = hf_weights(src)
    reader = gguf.GGUFReader(next(packages["gguf"].glob("*.gguf")))
    tensors = {t.name: t for t in reader.tensors}
    for name in rounded:
        layer, kind = name.split(".")[2], name.split(".")[-1]
        gguf_name = f"blk.{layer}." + {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                                       "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind] + ".weight"
        tensor = tensors[gguf_name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1, tensor.shape[0])
        want = weights[name + ".weight"]
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(kind)
        want = permute_qk(want, heads) if heads else want
        np.testing.assert_array_equal(stored, want, err_msg=gguf_name)
        assert not np.array_equal(want, original[name + ".weight"])
    assert read_quantization(packages["gguf"]) == "Q4_0-gptq"


def onnx_4bit_weights(package) -> dict[str, np.ndarray]:
    """HF Linear name -> the [N, K] weight its 4-bit MatMulNBits computes with (symmetric: zero point 8)."""
    graph = onnx.load(str(package / "model.onnx"))
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    out = {}
    for node in graph.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs["bits"] != 4 or "lm_head" in node.name:
            continue
        packed, scales = tensors[node.input[1]], tensors[node.input[2]].reshape(attrs["N"], -1)
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(attrs["N"], scales.shape[1], -1).astype(np.float32)
        linear = node.name.removeprefix("/model/").removesuffix("/MatMul_Q4").replace("/", ".")  # /model/model/layers.0/...
        out[linear] = (scales[..., None] * (codes - 8)).reshape(attrs["N"], -1)[:, : attrs["K"]]
    return out


@pytest.mark.slow
def test_the_onnx_package_holds_exactly_the_gptq_weights_and_keeps_8_bits_where_mixed(gptq_arm):
    src, packages, expected = gptq_arm
    folder, rounded = expected["onnx"]
    assert len(rounded) == 12, "layer 1's v_proj and down_proj are 8-bit in the mixed profile, so GPTQ leaves them"
    weights = hf_weights(folder)
    stored = onnx_4bit_weights(packages["onnx"])
    assert len(stored) == 12
    assert sorted(stored) == sorted(rounded)
    for name in rounded:
        np.testing.assert_array_equal(stored[name], weights[name + ".weight"], err_msg=name)
    assert read_quantization(packages["onnx"]) == "int4-block32-sym-gptq-head8-mixed"


@pytest.mark.slow
def test_gptq_packages_load_and_generate_in_both_backends(gptq_arm):
    _, packages, _ = gptq_arm
    for package in packages.values():
        assert greedy_text(runner_for(package), "The quick brown fox", n=8)


def read_quantization(package) -> str:
    from models.manifest import read_manifest

    return read_manifest(package).quantization
