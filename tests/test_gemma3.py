"""Gemma 3 through the pipeline, on a tiny random Gemma 3 whose 4-token sliding window every prompt outgrows:
teacher from its GGUF, a depth student that keeps a global layer where llama.cpp's every-6th rule would not put one,
a distillation step, and both full-precision packages served by the box as transformers answers."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("gguf")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from distill.export import ExportRequest, export  # noqa: E402
from distill.export_gguf import write_gguf  # noqa: E402
from distill.export_onnx import ExportOptions, export_package  # noqa: E402
from distill.pipeline import run_train  # noqa: E402
from distill.teacher import load_teacher, load_tokenizer  # noqa: E402
from tests.distill_helpers import (PROMPTS, distill_cfg, one_torch_thread, served_greedy,  # noqa: E402,F401
                                   transformers_texts, write_corpus)
from tests.onnx_models import build_tiny_gemma3  # noqa: E402

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "teacher")


@pytest.fixture(scope="module")
def teacher_gguf(teacher):
    return write_gguf(teacher, teacher.parent / "teacher.f32.gguf", "teacher")


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    """Two distillation steps of a depth student (teacher layers 0, 2 and 5: sliding, sliding, global).

    From the folder: transformers reads a Gemma 3 GGUF's vocabulary into a GemmaTokenizer, which adds a <mask>
    token past this BPE vocabulary's end (a real Gemma 3 vocabulary has one)."""
    root = tmp_path_factory.mktemp("gemma3-run")
    cfg = distill_cfg(teacher, write_corpus(root / "corpus"), root / "run")
    run_train(cfg)
    return cfg.out / "student"


def assert_llama_cpp_logits_match(gguf_path, folder) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) > model.config.sliding_window, "the prompt should outgrow the window"
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(np.array(llm.scores[: len(ids)]), expected, atol=5e-3, err_msg=text)


def test_llama_cpp_computes_the_converted_gemma3_as_transformers_does(teacher, teacher_gguf):
    assert_llama_cpp_logits_match(teacher_gguf, teacher)


def test_a_gemma3_teacher_loads_from_its_gguf_as_from_its_folder(teacher, teacher_gguf):
    from_gguf, from_folder = load_teacher(str(teacher_gguf)), load_teacher(str(teacher))
    assert type(from_gguf).__name__ == "Gemma3ForCausalLM"
    assert from_gguf.config.layer_types == from_folder.config.layer_types
    ids = load_tokenizer(str(teacher))(PROMPTS[0])["input_ids"]
    assert load_tokenizer(str(teacher_gguf))(PROMPTS[0])["input_ids"] == ids
    torch.testing.assert_close(from_gguf(torch.tensor([ids])).logits, from_folder(torch.tensor([ids])).logits,
                               atol=1e-4, rtol=1e-4)


def test_the_students_gguf_keeps_its_layers_kinds(student, tmp_path):
    """Layers 0, 2, 5 of the teacher: the third is global, where llama.cpp's every-6th rule puts none in 3 layers."""
    config = AutoModelForCausalLM.from_pretrained(student).config
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert_llama_cpp_logits_match(write_gguf(student, tmp_path / "student.f32.gguf", "student"), student)


def test_full_precision_packages_of_the_student_are_served_exactly_as_transformers_answers(student, tmp_path):
    gguf_package, = export(ExportRequest(src=student, out=tmp_path / "gguf", target="cpu", format="gguf",
                                         gguf_quant="F32", measure=False), progress=lambda line: None)
    onnx_package = export_package(student, tmp_path / "onnx", ExportOptions(name="student-fp32", int4=None))
    expected = transformers_texts(student)
    assert all(text.strip() for text in expected), expected
    assert served_greedy(gguf_package, "llama.cpp", "F32", tmp_path / "home-gguf") == expected
    assert served_greedy(onnx_package, "onnxruntime", "fp32", tmp_path / "home-onnx") == expected
