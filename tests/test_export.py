"""INT4 export on a tiny random Llama: real GGUF and ONNX packages, loaded and run in both real backends."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("gguf")

import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from appliance.backends import BackendError, create_backend  # noqa: E402
from appliance.backends.base import SamplingParams, token_stream  # noqa: E402
from appliance.cli import cli  # noqa: E402
from distill.export import ExportError, ExportRequest, export  # noqa: E402
from distill.export_cli import export_command  # noqa: E402
from distill.export_gguf import QUANT_TYPES, GgufExportError, write_gguf  # noqa: E402
from distill.targets import TARGETS, UnknownTarget, formats_for, get_target  # noqa: E402
from models.catalog import find_model, list_models, verify_model  # noqa: E402
from models.manifest import ManifestError, read_manifest  # noqa: E402
from models.registry import add_package, registered_packages  # noqa: E402
from tests.distill_helpers import greedy_text, runner_for  # noqa: E402
from tests.onnx_models import build_tiny_llama  # noqa: E402

PROMPTS = ["The quick brown fox", "Grüße aus Köln, ein Bär", "Numbers: 1 2 3 4"]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("export") / "tiny")


@pytest.fixture(scope="module")
def cpu_packages(tiny_hf):
    request = ExportRequest(src=tiny_hf, out=tiny_hf.parent / "packages", target="cpu", measure=False)
    return {p.name.rsplit("-", 1)[1]: p for p in export(request, progress=lambda line: None)}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_every_target_profile_is_complete_and_consistent():
    for profile in TARGETS.values():
        assert set(profile.formats) <= {"onnx", "gguf"} and profile.gguf_quant in QUANT_TYPES
        assert profile.block_size in (16, 32, 64, 128) and profile.compute in ("fp32", "fp16")
        assert profile.provider in ("cpu", "cuda", "tensorrt")
        assert formats_for(profile, "both") == profile.formats
    assert get_target("arm").gguf_quant == "IQ4_NL" and get_target("gpu").gguf_quant == "Q4_K_M"
    with pytest.raises(UnknownTarget, match="use one of jetson, arm, gpu, cpu"):
        get_target("tpu")


@pytest.mark.slow
def test_f32_gguf_tokenizes_and_generates_exactly_like_transformers(tiny_hf, tmp_path):
    """The writer's tensor names, q/k permutation and tokenizer metadata, checked without quantization noise."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_gguf(tiny_hf, tmp_path / "tiny.f32.gguf", "tiny")
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, verbose=False)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_hf).eval(), AutoTokenizer.from_pretrained(tiny_hf)
    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        expected = model.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, len(ids):]
        llm.reset()
        got = [t for t, _ in zip(llm.generate(ids, temp=0, top_k=1, repeat_penalty=1.0), range(24))]
        assert got == expected.tolist(), text
    assert llm.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"


@pytest.mark.slow
def test_both_formats_export_load_and_generate(cpu_packages):
    gguf, onnx = cpu_packages["gguf"], cpu_packages["onnx"]
    assert (read_manifest(gguf).quantization, read_manifest(onnx).quantization) == ("Q4_K_M", "int4-block32-sym-head8-mixed")
    for package in (gguf, onnx):
        runner = runner_for(package)
        assert verify_model(runner.entry)[0]
        assert greedy_text(runner, PROMPTS[0])  # real tokens out of the real engine
        runner.unload()
    runner = runner_for(gguf)
    runner.ensure_loaded()
    assert runner.info()["quantization"] == "Q4_K_M"
    runner.unload()
    assert not list(gguf.parent.glob(".*partial"))


@pytest.mark.slow
def test_both_backends_give_the_logits_their_greedy_tokens_come_from(cpu_packages):
    """Backend.logits, which the export report scores with: a row per position, each seeing only the tokens up to
    its own, the last one's largest being the token the step loop samples greedily."""
    for fmt, package in cpu_packages.items():
        path = next(package.glob("*.gguf")) if fmt == "gguf" else package
        backend = create_backend(fmt, path, threads=1, context_length=256, provider="cpu")
        facts = backend.load()
        prompt = backend.tokenize(PROMPTS[0], add_special=True, parse_special=True)
        logits = backend.logits(prompt)
        assert logits.shape[0] == len(prompt) and logits.dtype == np.float32
        np.testing.assert_allclose(backend.logits(prompt[:-1]), logits[:-1], atol=1e-4, err_msg=fmt)
        greedy = next(token_stream(backend, facts, prompt, SamplingParams(temperature=0)))
        assert int(logits[-1].argmax()) == greedy, fmt
        backend.close()


@pytest.mark.slow
def test_onnx_int4_quantizes_the_embedding_and_every_matmul(cpu_packages):
    import onnx

    graph = onnx.load(str(cpu_packages["onnx"] / "model.onnx"), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert "GatherBlockQuantized" in ops and ops.count("MatMulNBits") == 2 * 7 + 1 and "MatMul" in ops  # + attention
    weight_shapes = {(400, 64), (64, 64), (64, 32), (64, 128), (128, 64), (64, 400)}
    assert not [i.name for i in graph.initializer if tuple(i.dims) in weight_shapes and i.data_type == onnx.TensorProto.FLOAT]
    # mixed: of 2 layers, llama.cpp's rule favours the last; its v_proj and down_proj get 8 bits, like the head
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    eight = sorted(name for name, b in bits.items() if b == 8)
    assert eight == ["/model/lm_head/MatMul_Q8", "/model/model/layers.1/mlp/down_proj/MatMul_Q8",
                     "/model/model/layers.1/self_attn/v_proj/MatMul_Q8"], eight


def test_an_hqq_package_keeps_whole_zero_points_shares_its_embedding_and_generates(tiny_hf, tmp_path):
    import onnx

    request = ExportRequest(src=tiny_hf, out=tmp_path, target="cpu", format="onnx", algorithm="hqq", measure=False)
    (package,) = export(request, progress=lambda line: None)
    graph = onnx.load(str(package / "model.onnx"), load_external_data=False).graph
    types = {i.name: i.data_type for i in graph.initializer}
    zero_points = [types[n.input[3]] for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]]
    assert len(zero_points) >= 2 * 7 - 2 and set(zero_points) == {onnx.TensorProto.UINT8}
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4} and sum(n.op_type == "MatMulNBits" for n in graph.node) == 2 * 7 + 1
    assert "GatherBlockQuantized" in [n.op_type for n in graph.node]
    assert len(greedy_text(runner_for(package), "The capital of France is")) > 0


@pytest.mark.slow
def test_gpu_profile_gives_an_fp16_onnx_graph_that_still_runs_on_cpu(tiny_hf, tmp_path):
    request = ExportRequest(src=tiny_hf, out=tmp_path, target="gpu", format="onnx", measure=False)
    (package,) = export(request, progress=lambda line: None)
    assert read_manifest(package).quantization == "int4-block128-asym-head8-mixed-fp16"
    runner = runner_for(package)
    assert greedy_text(runner, PROMPTS[1])
    runner.unload()
    backend = create_backend("onnx", package, threads=1, context_length=256, provider="cpu")
    backend.load()  # in this process, to look at the graph the runner served
    assert backend._graph.kv_dtype.__name__ == "float16"
    # fp16 scales and a zero point per block; the head takes 64-wide blocks where 128 do not tile its rows
    assert_lookup_reads_the_heads_weights(package, tiny_hf, fp16=True)


@pytest.mark.slow
def test_a_corrupted_file_is_refused_at_load(cpu_packages, tmp_path):
    for fmt, name in (("gguf", "tiny.Q4_K_M.gguf"), ("onnx", "model.onnx.data")):
        folder = shutil.copytree(cpu_packages[fmt], tmp_path / fmt)
        data = folder / name
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # same size, one byte changed
        data.write_bytes(bytes(raw))
        runner = runner_for(folder)
        with pytest.raises(BackendError, match=f"{name.replace('.', '[.]')} does not match its recorded sha256"):
            runner.ensure_loaded()
        assert not runner.is_loaded


def test_a_failed_step_is_named_and_leaves_no_package(tiny_hf, tmp_path):
    broken = shutil.copytree(tiny_hf, tmp_path / "broken")
    (broken / "tokenizer.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="export step 'write the GGUF from the HF weights"):
        export(ExportRequest(src=broken, out=out, target="arm", format="gguf", measure=False), progress=lambda line: None)
    assert list(out.iterdir()) == []


def test_an_architecture_llama_cpp_cannot_convert_is_refused_in_its_words(tiny_hf, tmp_path):
    odd = shutil.copytree(tiny_hf, tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(config | {"architectures": ["GPTJForCausalLM"]}))
    with pytest.raises(GgufExportError, match="cannot convert .*Model GPTJForCausalLM is not supported"):
        write_gguf(odd, tmp_path / "odd.gguf", "odd")
    assert not (tmp_path / "odd.gguf").exists()


def test_a_tokenizer_llama_cpp_cannot_split_alike_is_refused(tiny_hf, tmp_path):
    """Named by structure only where llama.cpp implements exactly that pre-tokenization; never guessed."""
    odd = shutil.copytree(tiny_hf, tmp_path / "odd")
    spec = json.loads((odd / "tokenizer.json").read_text())
    (odd / "tokenizer.json").write_text(json.dumps(spec | {"pre_tokenizer": {"type": "Whitespace"}}))
    with pytest.raises(GgufExportError, match="BPE pre-tokenizer was not recognized"):
        write_gguf(odd, tmp_path / "odd.gguf", "odd")


def test_a_missing_converter_names_the_make_target(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_CONVERTER", str(tmp_path / "nowhere"))
    with pytest.raises(GgufExportError, match="convert_hf_to_gguf.py is not in .*nowhere: `make test`"):
        write_gguf(tiny_hf, tmp_path / "tiny.gguf", "tiny")


def assert_lookup_reads_the_heads_weights(package, source, fp16: bool = False) -> None:
    """One quantized vocabulary table serves both ends of the model, and the lookup returns the source's rows."""
    import onnx
    import onnx.utils
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    graph = onnx.load(str(package / "model.onnx"))
    head = next(n for n in graph.graph.node if "logits" in n.output)
    lookup = next(n for n in graph.graph.node if "input_ids" in n.input)
    assert (head.op_type, lookup.op_type) == ("MatMulNBits", "GatherBlockQuantized")
    table_source = next(n for n in graph.graph.node if n.output[0] == lookup.input[0])
    assert table_source.op_type == "Reshape" and table_source.input[0] == head.input[1]
    table = AutoModelForCausalLM.from_pretrained(source).get_input_embeddings().weight.detach().numpy()
    float_tables = [t.name for t in graph.graph.initializer if list(t.dims) == list(table.shape)]
    assert float_tables == [], "the exporter's float copy of the table should be gone"
    bits = next(a.i for a in head.attribute if a.name == "bits")
    assert bits == 8, "the profiles keep the head (and so the table) at 8 bits"

    elem = onnx.TensorProto.FLOAT16 if fp16 else onnx.TensorProto.FLOAT
    graph.graph.value_info.append(onnx.helper.make_tensor_value_info(lookup.output[0], elem, None))
    lookup_only = onnx.utils.Extractor(graph).extract_model(["input_ids"], [lookup.output[0]])
    ids = np.array([[0, 1, 5, table.shape[0] - 1]])
    session = ort.InferenceSession(lookup_only.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"input_ids": ids})[0][0].astype(np.float32)
    step = np.abs(table[ids[0]]).max(axis=1, keepdims=True) / (2 ** (bits - 1) - 1)
    assert np.all(np.abs(rows - table[ids[0]]) <= step), "rows should be the source's, within one quantization step"


@pytest.mark.slow
def test_a_tied_embedding_reads_the_lm_heads_quantized_weights(cpu_packages, tiny_hf):
    assert_lookup_reads_the_heads_weights(cpu_packages["onnx"], tiny_hf)


@pytest.mark.slow
def test_models_add_registers_a_package_with_the_catalog(cpu_packages, home):
    manifest = add_package(cpu_packages["gguf"], home=home)
    assert registered_packages(home=home) == [cpu_packages["gguf"].resolve()]
    assert manifest.name in [e.name for e in list_models(home=home)]
    entry = find_model(manifest.name, home=home)
    assert entry.package == cpu_packages["gguf"].resolve() and verify_model(entry) == (True, "sha256 ok (every file of the package)")
    add_package(cpu_packages["gguf"], home=home)  # adding twice keeps one entry
    assert len(registered_packages(home=home)) == 1
    missing = CliRunner().invoke(cli, ["models", "remove", "no-such-package"])
    assert missing.exit_code == 1 and "no registered package matches" in missing.output
    removed = CliRunner().invoke(cli, ["models", "remove", manifest.name])
    assert removed.exit_code == 0, removed.output
    assert registered_packages(home=home) == [] and manifest.name not in [e.name for e in list_models(home=home)]
    assert (cpu_packages["gguf"] / "manifest.json").exists()  # the files stay


@pytest.mark.slow
def test_models_add_refuses_a_corrupted_package(cpu_packages, home, tmp_path):
    folder = shutil.copytree(cpu_packages["onnx"], tmp_path / "pkg")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ManifestError, match="tokenizer.json"):
        add_package(folder, home=home)
    result = CliRunner().invoke(cli, ["models", "add", str(folder)])
    assert result.exit_code == 1 and "tokenizer.json" in result.output
    assert registered_packages(home=home) == []


@pytest.mark.slow
def test_cli_export_writes_a_measured_package_with_its_report(tiny_hf, tmp_path, home):
    out = tmp_path / "cli"
    code = tmp_path / "site-code.py"  # the kind of text the box will see, not the built-in prose
    code.write_text("".join(f"def area_{i}(width, height):\n    return width * height * {i}\n\n" for i in range(12)))
    result = CliRunner().invoke(export_command, [str(tiny_hf), "--target", "arm", "--format", "gguf", "--out", str(out),
                                                 "--held-out", str(code)])
    assert result.exit_code == 0, result.output
    package = out / "tiny-arm-gguf"
    report = json.loads((package / "report.json").read_text())
    from tokenizers import Tokenizer

    assert report["held_out_tokens"] == len(Tokenizer.from_file(str(tiny_hf / "tokenizer.json")).encode(code.read_text()).ids)
    assert report["held_out_text"] == "site-code.py"
    assert report["quantization"] == "IQ4_NL" and report["model_bytes"] < report["fp32_bytes"] / 3
    assert report["perplexity_fp32"] > 1 and report["perplexity_int4"] > 1
    assert 0 <= report["greedy_agreement"] <= 1 and report["decode_tokens_per_s"] > 0 and report["peak_rss_mb"] > 0
    assert "held-out perplexity" in (package / "report.md").read_text()
    manifest = read_manifest(package)
    assert {"report.json", "report.md", "tiny.IQ4_NL.gguf"} <= {f.path for f in manifest.files}
    assert manifest.metrics["greedy_agreement"] == report["greedy_agreement"]
    added = CliRunner().invoke(cli, ["models", "add", str(package)])
    assert added.exit_code == 0 and "tiny-arm-gguf" in added.output


@pytest.mark.slow
def test_smollm2_written_and_quantized_to_q4_1_gives_the_published_tensors_back(tmp_path):
    """The writer's check on a real model: SmolLM2's published Q4_1 GGUF, dequantized to an HF folder, written by
    our GGUF writer and quantized by llama.cpp to Q4_1 again, is the published file tensor for tensor, byte for
    byte (tensor names, the q/k row order, every block)."""
    from bench.export_smollm2 import bundled_gguf, smollm2_source, tensor_match

    published = bundled_gguf()
    src = smollm2_source(tmp_path, published)
    request = ExportRequest(src=src, out=tmp_path / "packages", target="cpu", format="gguf", gguf_quant="Q4_1",
                            measure=False)
    package, = export(request, progress=lambda line: None)
    match = tensor_match(next(package.glob("*.gguf")), published)
    assert match == {"tensors": 272, "same_names": True, "byte_identical_tensors": 272}


def test_hqq_stores_whole_zero_points_that_the_fast_kernel_reads_and_fits_closer_than_min_max():
    # Fractional zero points would send ONNX Runtime's CPU kernel down its dequantize-everything path (20x slower).
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from distill.quantize_onnx import Int4Options, _algo_config, _quantize
    from tests.distill_helpers import dequantize_matmul_nbits

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 64)).astype(np.float32)  # [K, N]
    weight[rng.random(weight.shape) < 0.02] *= 6  # outliers: where a fitted zero and scale beat min-max
    graph = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/layers.0/mlp/up_proj/MatMul")], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [numpy_helper.from_array(weight, "w")]),
        opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 256)).astype(np.float32)
    errors = {}
    for algorithm, symmetric in (("hqq", True), ("rtn", False)):
        options = Int4Options(algorithm=algorithm, symmetric=symmetric)
        quantized = _quantize(onnx.ModelProto.FromString(graph.SerializeToString()), options, ("MatMul",),
                              algo_config=_algo_config(options, ("MatMul",)))
        (node,) = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
        tensors = {t.name: t for t in quantized.graph.initializer}
        assert tensors[node.input[3]].data_type == TensorProto.UINT8, algorithm
        packed, scales, zeros = (numpy_helper.to_array(tensors[name]) for name in node.input[1:4])
        held = dequantize_matmul_nbits(packed, scales, zeros, 64, 256)  # [N, K]
        errors[algorithm] = float(np.square(held - weight.T).mean())
        session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
        # accuracy_level 4 computes with int8 activations: close, not equal; a misread zero point is off by units
        want = x @ held.T
        np.testing.assert_allclose(session.run(None, {"x": x})[0], want, rtol=0, atol=0.02 * np.abs(want).max())
    assert errors["hqq"] < 0.98 * errors["rtn"], errors  # measured: 0.952 of min-max RTN's squared error


def test_torchs_steps_run_on_the_exports_threads_and_give_them_back(tiny_hf, tmp_path, monkeypatch):
    import torch

    import distill.export_report as export_report

    seen = []

    def measured(src, **kwargs):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stopped after the first torch step")

    monkeypatch.setattr(export_report, "reference_from_hf", measured)
    before = torch.get_num_threads()
    request = ExportRequest(src=tiny_hf, out=tmp_path, target="cpu", format="gguf", threads=before + 1)
    with pytest.raises(ExportError, match="measure the fp32 source"):
        export(request, progress=lambda line: None)
    assert seen == [before + 1] and torch.get_num_threads() == before
