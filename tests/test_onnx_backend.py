"""The ONNX Runtime backend on real graphs exported here: exact greedy parity with transformers, INT4, packages."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from appliance.backends import BackendError, create_backend
from appliance.backends.base import SamplingParams
from appliance.backends.onnx_runtime import OnnxRuntimeBackend, pick_token
from appliance.runner import ModelRunner
from models.catalog import find_model, verify_model
from models.manifest import read_manifest
from tests.onnx_models import build_tiny_llama, export_tiny

PROMPTS = ["The quick brown fox", "Grüße aus Köln, ein Bär", "Numbers: 1 2 3 4"]
NEW_TOKENS = 32


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def tiny_fp32(tiny_hf):
    return export_tiny(tiny_hf, tiny_hf.parent / "onnx-fp32", int4=False)


@pytest.fixture(scope="session")
def tiny_int4(tiny_hf):
    return export_tiny(tiny_hf, tiny_hf.parent / "onnx-int4", int4=True)


def loaded(folder, **kwargs) -> OnnxRuntimeBackend:
    backend = OnnxRuntimeBackend(folder, threads=2, context_length=4096, **kwargs)
    backend.load()
    return backend


def greedy(backend, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    tokens = backend.sample_tokens(prompt, SamplingParams(max_tokens=n, temperature=0))
    return [next(tokens) for _ in range(n)]


def teacher_forced_agreement(backend, prompt: list[int], reference: list[int]) -> float:
    """Share of positions where the backend's greedy choice, given the reference prefix, is the reference token."""
    logits = _all_logits(backend, prompt + reference[:-1])[len(prompt) - 1 :]
    return float(np.mean(logits.argmax(-1) == np.array(reference)))


def _all_logits(backend, tokens: list[int]) -> np.ndarray:
    graph = backend._graph
    feed = {"input_ids": np.array([tokens]), "attention_mask": np.ones((1, len(tokens)), np.int64),
            "position_ids": np.arange(len(tokens))[None]}
    feed |= {n: np.zeros((1, graph.kv_heads, 0, graph.head_dim), graph.kv_dtype) for n in graph.past_names}
    return backend.session.run(["logits"], feed)[0][0]


def test_fp32_greedy_tokens_equal_transformers_generate(tiny_hf, tiny_fp32):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    backend = loaded(tiny_fp32)
    for text in PROMPTS:
        prompt = backend.tokenize(text)
        assert prompt == hf_tokenizer(text)["input_ids"]
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )[0, len(prompt) :].tolist()
        assert greedy(backend, prompt) == expected, text


def test_int4_graph_uses_matmul_nbits_and_mostly_agrees_with_fp32(tiny_fp32, tiny_int4, record_property):
    import onnx

    ops = {node.op_type for node in onnx.load(str(tiny_int4 / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    fp32, int4 = loaded(tiny_fp32), loaded(tiny_int4)
    assert int4.info()["quantization"] == "int4-block16-asym-head8"
    rates = [teacher_forced_agreement(int4, p, greedy(fp32, p)) for p in map(fp32.tokenize, PROMPTS)]
    record_property("int4_vs_fp32_agreement", rates)
    # Random weights quantize worse than trained ones (SmolLM2: see test_smollm2_int4_agrees_with_fp32).
    assert np.mean(rates) > 0.5, rates


def test_cache_is_reused_across_decode_steps(tiny_fp32):
    """Token-by-token decoding with the KV cache equals one full forward pass over the same tokens."""
    backend = loaded(tiny_fp32)
    prompt = backend.tokenize(PROMPTS[0])
    generated = greedy(backend, prompt, 12)
    assert teacher_forced_agreement(backend, prompt, generated) == 1.0


def test_seeded_sampling_repeats_and_seeds_differ(tiny_fp32):
    backend = loaded(tiny_fp32)
    prompt = backend.tokenize(PROMPTS[1])

    def sample(seed):
        tokens = backend.sample_tokens(prompt, SamplingParams(max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, seed=seed))
        return [next(tokens) for _ in range(16)]

    assert sample(7) == sample(7)
    assert len({tuple(sample(s)) for s in (1, 2, 3)}) > 1


def test_pick_token_follows_llama_cpp_semantics():
    logits = np.array([0.0, 5.0, 4.9, -3.0, 1.0])
    rng = np.random.default_rng(0)
    assert pick_token(logits, SamplingParams(max_tokens=1, temperature=0), rng) == 1
    top1 = SamplingParams(max_tokens=1, temperature=5.0, top_k=1)
    assert {pick_token(logits, top1, rng) for _ in range(50)} == {1}
    # top_p 0.5 keeps only the most likely token (p(1) ~ 0.5); 0.9 keeps the two nearly tied ones.
    narrow = SamplingParams(max_tokens=1, temperature=1.0, top_k=0, top_p=0.5)
    assert {pick_token(logits, narrow, rng) for _ in range(50)} == {1}
    wide = SamplingParams(max_tokens=1, temperature=1.0, top_k=0, top_p=0.9)
    assert {pick_token(logits, wide, rng) for _ in range(200)} == {1, 2}


def test_generate_streams_whole_utf8_text_and_honours_stops(tiny_fp32):
    backend = loaded(tiny_fp32)
    tokens = backend.tokenize("Grüße 日本語 🙂")
    assert b"".join(backend.token_bytes(t) for t in tokens).decode("utf-8") == "Grüße 日本語 🙂"
    chunks = list(backend.generate(backend.tokenize(PROMPTS[0]), SamplingParams(max_tokens=20, temperature=0)))
    assert chunks[-1].finish_reason in ("length", "stop")
    text = "".join(c.text for c in chunks)
    stop = text[3:5]
    if stop.strip():
        cut = list(backend.generate(backend.tokenize(PROMPTS[0]), SamplingParams(max_tokens=20, temperature=0, stop=(stop,))))
        assert "".join(c.text for c in cut) == text[: text.find(stop)]


def test_chat_template_and_special_tokens_come_from_tokenizer_config(tiny_fp32):
    backend = loaded(tiny_fp32)
    prompt = backend.render_chat([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = backend.tokenize(prompt)
    assert ids[0] == backend.tokenizer.token_id("<|im_start|>")
    assert backend.token_bytes(ids[0]) == b""  # control tokens print nothing
    assert backend.is_end_of_generation(backend.tokenizer.token_id("<|im_end|>"))


def test_info_names_the_provider_and_auto_falls_back_to_cpu(tiny_int4, caplog):
    with caplog.at_level(logging.WARNING):
        backend = loaded(tiny_int4)
    info = backend.info()
    assert info["provider"] == "cpu" and info["backend"] == "onnxruntime"
    assert "using CPU" in caplog.text


def test_unavailable_provider_is_a_clear_error(tiny_int4):
    with pytest.raises(BackendError, match="'cuda' is not in this onnxruntime build"):
        loaded(tiny_int4, provider="cuda")
    with pytest.raises(BackendError, match="unknown execution provider"):
        OnnxRuntimeBackend(tiny_int4, threads=1, context_length=64, provider="tpu")


def test_second_start_uses_the_cached_optimized_graph(tiny_int4, tmp_path):
    folder = shutil.copytree(tiny_int4, tmp_path / "pkg", ignore=shutil.ignore_patterns(".cache"))
    first = loaded(folder)
    cached = list((folder / ".cache").glob("*.onnx"))
    assert len(cached) == 1
    second = loaded(folder)
    prompt = first.tokenize(PROMPTS[2])
    assert greedy(first, prompt, 8) == greedy(second, prompt, 8)


def test_package_folder_resolves_through_the_catalog_and_registry(tiny_int4):
    entry = find_model(str(tiny_int4))
    assert (entry.name, entry.format, entry.package) == ("tiny-llama", "onnx", tiny_int4)
    assert verify_model(entry)[0]
    backend = create_backend(entry.format, entry.path, threads=1, context_length=64, provider="cpu")
    assert isinstance(backend, OnnxRuntimeBackend) and backend.requested_provider == "cpu"


def test_manifest_records_every_file(tiny_int4):
    manifest = read_manifest(tiny_int4)
    names = {f.path for f in manifest.files}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json", "config.json"} <= names
    assert (manifest.format, manifest.architecture, manifest.context_length) == ("onnx", "llama", 512)
    raw = json.loads((tiny_int4 / "manifest.json").read_text())
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in raw["files"])


def test_loading_refuses_a_tampered_file_naming_it(tiny_int4, tmp_path):
    folder = shutil.copytree(tiny_int4, tmp_path / "pkg")
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-1] + b"\x00")  # same size, one byte changed
    runner = ModelRunner(find_model(str(folder)), threads=1, context_length=64)
    with pytest.raises(BackendError, match=r"model\.onnx\.data does not match its sha256"):
        runner.ensure_loaded()
    assert not runner.is_loaded and "model.onnx.data" in runner.load_error
    ok, detail = verify_model(find_model(str(folder)))
    assert not ok and "model.onnx.data" in detail
