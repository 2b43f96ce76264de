"""Qwen2 through the pipeline, on a tiny random Qwen2 (q/k/v biases, tied embeddings) and a tokenizer trained here:
teacher from its GGUF, a depth student, a distillation step, both exports, both packages served by the box."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("gguf")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from distill.export import ExportRequest, export  # noqa: E402
from distill.export_gguf import write_gguf  # noqa: E402
from distill.export_onnx import ExportOptions, export_package  # noqa: E402
from distill.pipeline import run_train  # noqa: E402
from distill.student import build_student  # noqa: E402
from distill.teacher import UnsupportedTeacher, load_teacher, load_tokenizer  # noqa: E402
from models.manifest import read_manifest  # noqa: E402
from tests.distill_helpers import (PROMPTS, distill_cfg, one_torch_thread, served_greedy,  # noqa: E402,F401
                                   transformers_texts, write_corpus)
from tests.onnx_models import build_tiny_qwen2  # noqa: E402



@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "teacher")


@pytest.fixture(scope="module")
def teacher_gguf(teacher):
    return write_gguf(teacher, teacher.parent / "teacher.f32.gguf", "teacher")


@pytest.fixture(scope="module")
def distilled(teacher_gguf, tmp_path_factory):
    """A depth student of the GGUF teacher after two distillation steps."""
    root = tmp_path_factory.mktemp("qwen2-run")
    cfg = distill_cfg(teacher_gguf, write_corpus(root / "corpus"), root / "run")
    return cfg, run_train(cfg)


# -- the converter and the teacher ------------------------------------------------------------------
@pytest.mark.slow
def test_llama_cpp_computes_the_converted_qwen2_as_transformers_does(teacher, teacher_gguf):
    """Tensor names, biases, tied head and the qwen2 pre-tokenizer: llama.cpp's logits are transformers' logits."""
    import llama_cpp

    tensors = {t.name for t in gguf.GGUFReader(teacher_gguf).tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= tensors
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd for the head
    llm = llama_cpp.Llama(str(teacher_gguf), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    assert (llm.metadata["general.architecture"], llm.metadata["tokenizer.ggml.pre"]) == ("qwen2", "qwen2")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(teacher).eval(), AutoTokenizer.from_pretrained(teacher)
    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(np.array(llm.scores[: len(ids)]), expected, atol=2e-3, err_msg=text)


@pytest.mark.slow
def test_a_qwen2_teacher_loads_from_its_gguf_as_from_its_folder(teacher, teacher_gguf):
    from_gguf, from_folder = load_teacher(str(teacher_gguf)), load_teacher(str(teacher))
    assert type(from_gguf).__name__ == "Qwen2ForCausalLM" and from_gguf.config.tie_word_embeddings
    ids = load_tokenizer(str(teacher))(PROMPTS[1])["input_ids"]
    assert load_tokenizer(str(teacher_gguf))(PROMPTS[1])["input_ids"] == ids
    torch.testing.assert_close(from_gguf(torch.tensor([ids])).logits, from_folder(torch.tensor([ids])).logits,
                               atol=1e-4, rtol=1e-4)


def test_a_gguf_teacher_transformers_cannot_load_is_refused_with_what_it_can(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "rwkv7")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(UnsupportedTeacher, match=r"cannot load a 'rwkv7' GGUF as a teacher; it loads .*gemma3.*qwen2"):
        load_teacher(str(tmp_path / "odd.gguf"))


# -- students -----------------------------------------------------------------------------------------
def test_depth_student_of_qwen2_carries_the_kept_layers_biases_and_ties_its_head(teacher, tmp_path):
    source = load_teacher(str(teacher))
    student, keep = build_student(source, distill_cfg(teacher, tmp_path, tmp_path / "run"))
    assert keep == [0, 3] and student.config.num_hidden_layers == 2
    for kind in ("q_proj", "k_proj", "v_proj"):
        kept = getattr(student.model.layers[1].self_attn, kind).bias
        assert torch.equal(kept, getattr(source.model.layers[3].self_attn, kind).bias) and kept.abs().sum() > 0
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()


def test_width_student_of_qwen2_keeps_the_per_head_biases_whole(teacher, tmp_path):
    """hidden 64 = 4 heads x 16: the q bias is as long as the hidden size, and still not a hidden-size vector."""
    source = load_teacher(str(teacher))
    cfg = distill_cfg(teacher, tmp_path, tmp_path / "run", student="width", hidden_size=32, intermediate_size=64)
    student, _ = build_student(source, cfg)
    assert student.model.layers[0].mlp.up_proj.weight.shape == (64, 32)
    torch.testing.assert_close(student.model.layers[0].self_attn.q_proj.bias, source.model.layers[0].self_attn.q_proj.bias)
    assert torch.isfinite(student(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
def test_a_distillation_step_from_the_gguf_teacher_gives_a_qwen2_student(distilled, teacher):
    cfg, report = distilled
    log = report["runs"]["student"]["train_log"]
    assert [e["step"] for e in log] == [1, 2] and all(np.isfinite(e["loss"]) and e["kl"] > 0 for e in log)
    student = AutoModelForCausalLM.from_pretrained(cfg.out / "student")
    assert type(student).__name__ == "Qwen2ForCausalLM" and student.config.num_hidden_layers == 2
    original = load_teacher(str(teacher)).model.layers[3].self_attn.q_proj.bias
    assert not torch.equal(student.model.layers[1].self_attn.q_proj.bias, original)  # trained, from the teacher's


# -- both packages, served by the box ------------------------------------------------------------------
@pytest.mark.slow
def test_full_precision_packages_of_the_student_are_served_exactly_as_transformers_answers(distilled, tmp_path):
    """No rounding: whatever differs is the exporters' or the box's fault (a bias dropped, a head untied...)."""
    student = distilled[0].out / "student"
    gguf_package, = export(ExportRequest(src=student, out=tmp_path / "gguf", target="cpu", format="gguf",
                                         gguf_quant="F32", measure=False), progress=lambda line: None)
    onnx_package = export_package(student, tmp_path / "onnx", ExportOptions(name="student-fp32", int4=None))
    expected = transformers_texts(student)
    assert all(text.strip() for text in expected), expected  # something to compare
    assert served_greedy(gguf_package, "llama.cpp", "F32", tmp_path / "home-gguf") == expected
    assert served_greedy(onnx_package, "onnxruntime", "fp32", tmp_path / "home-onnx") == expected


@pytest.mark.slow
def test_int4_packages_of_the_student_are_measured_and_served(distilled, tmp_path):
    """The cpu target's INT4 packages, each with its report against transformers, answering through the box."""
    student = distilled[0].out / "student"
    packages = {p.name.rsplit("-", 1)[1]: p for p in export(
        ExportRequest(src=student, out=tmp_path, target="cpu", threads=1), progress=lambda line: None)}
    for fmt, backend in (("gguf", "llama.cpp"), ("onnx", "onnxruntime")):
        manifest = read_manifest(packages[fmt])
        assert manifest.architecture == "qwen2"
        # a random 2-layer net has near-ties everywhere; 4-bit noise flips some, never most (measured: 65%)
        assert manifest.metrics["greedy_agreement"] >= 0.5 and manifest.metrics["perplexity_ratio"] < 1.15, manifest.metrics
        texts = served_greedy(packages[fmt], backend, manifest.quantization, tmp_path / f"home-{fmt}", prompts=PROMPTS[:1])
        assert texts[0].strip()
