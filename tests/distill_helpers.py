"""Helpers the export tests share (torch, transformers, onnx and gguf: test modules skip without them first).

A real runner process's greedy text from a package; a package served by the box and what transformers answers in
its place; a tiny distillation run's settings; the tiny Llama exported with
GPTQ or QAT beside the rounded copy each package must carry; and the checks that
a GGUF or ONNX package holds exactly those rounded weights.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import gguf
import numpy as np
import onnx
import pytest
import requests
import torch
from onnx import helper, numpy_helper
from transformers import AutoModelForCausalLM, AutoTokenizer

from appliance.backends.base import SamplingParams
from appliance.runner import protocol as msg
from appliance.runner.supervisor import ModelRunner, RunnerCrashed
from distill.calibration import CALIBRATION_SEQUENCES, text_calibration
from distill.config import DistillConfig
from distill.export import ExportRequest, export
from distill.export_gguf import gguf_name
from distill.gptq import quantize_model, write_rounded_copy
from distill.qat import train_on_grids
from distill.rounding import gguf_grids, onnx_grids
from distill.targets import get_target
from models.catalog import find_model
from models.manifest import read_manifest
from tests.helpers import ServedModel, start_service
from tests.onnx_models import CORPUS, build_tiny_llama

PROMPTS = ["The quick brown fox", "Numbers: 1 2 3 4", "Grüße aus Köln, ein Bär"]
NEW_TOKENS = 12


# -- a package, served -------------------------------------------------------------------
def runner_for(path) -> ModelRunner:
    return ModelRunner(find_model(str(path), home=None), threads=1, context_length=256)


def greedy_text(runner: ModelRunner, prompt: str, n: int = 16) -> str:
    """Greedy text of a completion, through a real runner process."""
    runner.ensure_loaded()
    stream = runner.submit(None, prompt, SamplingParams(max_tokens=n, temperature=0))
    text = []
    while True:
        event = stream.get(timeout=120)
        assert not isinstance(event, (msg.Refused, msg.Failed, RunnerCrashed)), event
        if isinstance(event, msg.Output):
            text.append(event.text)
            if event.finish_reason:
                return "".join(text)


def read_quantization(package) -> str:
    return read_manifest(package).quantization


# -- a package served by the box, and transformers in its place ------------------------------
def served_greedy(package, backend: str, quantization: str, home, prompts=PROMPTS) -> list[str]:
    """The box's greedy completion of each prompt, the package being its only model."""
    service = start_service(home, model=ServedModel(backend, quantization, env={"APPLIANCE_MODEL": str(package)}))
    try:
        texts = []
        for prompt in prompts:
            r = requests.post(service.url + "/v1/completions", timeout=120,
                              json={"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == read_manifest(package).name
            texts.append(r.json()["choices"][0]["text"])
        return texts
    finally:
        service.stop()


def transformers_texts(folder, prompts=PROMPTS) -> list[str]:
    """transformers' greedy text for each prompt, up to EOS as the box stops there, without control tokens."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False)[0, len(ids):].tolist()
        if tokenizer.eos_token_id in greedy:
            greedy = greedy[: greedy.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(greedy, skip_special_tokens=True))
    return texts


# -- a tiny distillation run ----------------------------------------------------------------
def write_corpus(folder):
    """20 short documents of CORPUS: the held-out split is by document."""
    folder.mkdir(parents=True)
    for i in range(20):
        (folder / f"{i:02d}.txt").write_text("\n".join(CORPUS[i % 4::4][:6]))
    return folder


def distill_cfg(teacher, corpus, out, **kw) -> DistillConfig:
    """Two steps of a depth student keeping every 2nd layer, on blocks of 32 tokens."""
    base = dict(teacher=str(teacher), data=[str(corpus)], out_dir=str(out), block_size=32, batch_size=4, max_steps=2,
                warmup_steps=1, lr=3e-3, eval_every=0, checkpoint_every=0, log_every=1, val_fraction=0.1,
                eval_batches=1, keep_every=2)
    return DistillConfig(**(base | kw)).validate()


# -- exports with GPTQ or QAT, and what their packages must hold -----------------------------
def export_with_gptq(work, target: str, gguf_quant: str | None = None, algorithm: str = "gptq"):
    """The tiny Llama exported for target with GPTQ (or QAT), and per format the rounded copy the package must carry.

    QAT runs with its own --qat-steps and --calibration-sequences, so the packages match only if both reach it."""
    src = build_tiny_llama(work / "tiny")
    text = work / "calibration.txt"
    text.write_text("\n".join(CORPUS * 4))
    knobs = {"qat_steps": 40, "calibration_sequences": 48} if algorithm == "qat" else {}
    request = ExportRequest(src=src, out=work / "packages", target=target, algorithm=algorithm, calibration=text,
                            gguf_quant=gguf_quant, measure=False, **knobs)
    packages = {p.name.rsplit("-", 1)[1]: p for p in export(request, progress=lambda line: None)}
    count = knobs.get("calibration_sequences", CALIBRATION_SEQUENCES.get(algorithm, 64))
    samples = text_calibration(AutoTokenizer.from_pretrained(src), text.read_text(), count=count)
    method = {"gptq": quantize_model, "qat": partial(train_on_grids, steps=knobs.get("qat_steps"))}[algorithm]
    profile = replace(get_target(target), gguf_quant=gguf_quant or get_target(target).gguf_quant)
    expected = {}
    for fmt, grid_for in (("gguf", gguf_grids(request, profile)), ("onnx", onnx_grids(src, profile))):
        expected[fmt] = (work / f"rounded-{fmt}", write_rounded_copy(src, work / f"rounded-{fmt}", grid_for, samples,
                                                                     method=method))
    return src, packages, expected


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter stores Llama q/k rows with the rotary halves interleaved; HF keeps them split."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def hf_weights(folder) -> dict[str, np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {name: t.detach().numpy() for name, t in model.state_dict().items()}


def assert_gguf_holds(package, folder, rounded, source) -> set[str]:
    """Every rounded Linear is stored in Q4_0/Q5_0/IQ4_NL with exactly the rounded weights; returns the types seen."""
    weights, config, original = hf_weights(folder), AutoModelForCausalLM.from_pretrained(folder).config, hf_weights(source)
    tensors = {t.name: t for t in gguf.GGUFReader(next(package.glob("*.gguf"))).tensors}
    types = set()
    for name in rounded:
        kind = name.split(".")[-1]
        tensor = tensors[gguf_name(name + ".weight")]
        types.add(tensor.tensor_type.name)
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1, tensor.shape[0])
        want = weights[name + ".weight"]
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(kind)
        want = permute_qk(want, heads) if heads else want
        np.testing.assert_array_equal(stored, want, err_msg=tensor.name)
        assert not np.array_equal(want, original[name + ".weight"])
    assert types <= {"Q4_0", "Q5_0", "IQ4_NL"}
    return types


def dequantize_matmul_nbits(packed, scales, zero_points, rows: int, width: int) -> np.ndarray:
    """The [rows, width] weight a 4-bit MatMulNBits holds: two codes per byte, low nibble first; zero point 8 if none."""
    blocks = scales.size // rows
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(rows, blocks, -1).astype(np.float32)
    if zero_points is None:
        zeros = np.full((rows, blocks), 8.0)
    else:
        zeros = np.stack([zero_points & 15, zero_points >> 4], -1).reshape(rows, -1)[:, :blocks].astype(np.float32)
    scales = scales.reshape(rows, blocks).astype(np.float32)
    return (scales[..., None] * (codes - zeros[..., None])).reshape(rows, -1)[:, :width]


def onnx_4bit_weights(package) -> dict[str, np.ndarray]:
    """HF Linear name -> the [N, K] weight its 4-bit MatMulNBits computes with."""
    graph = onnx.load(str(package / "model.onnx"))
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    out = {}
    for node in graph.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs["bits"] != 4 or "lm_head" in node.name:
            continue
        zero_points = tensors[node.input[3]] if len(node.input) > 3 and node.input[3] else None
        linear = node.name.removeprefix("/model/").removesuffix("/MatMul_Q4").replace("/", ".")  # /model/model/layers.0/...
        out[linear] = dequantize_matmul_nbits(tensors[node.input[1]], tensors[node.input[2]], zero_points,
                                              attrs["N"], attrs["K"])
    return out


def assert_onnx_holds(package, folder, rounded) -> None:
    """The 4-bit MatMulNBits are exactly the rounded Linears, and hold exactly the rounded weights."""
    weights, stored = hf_weights(folder), onnx_4bit_weights(package)
    assert sorted(stored) == sorted(rounded)
    for name in rounded:
        np.testing.assert_array_equal(stored[name], weights[name + ".weight"], err_msg=name)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core box: one thread is ~50x faster than two (no OpenMP spin contention).
    A module that imports this fixture runs every test with it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
