"""llama.cpp's importance matrix: measured on the model in torch, handed to llama.cpp's real quantizer."""

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

from distill.calibration import importance, source_importance, text_calibration  # noqa: E402
from distill.export import ExportError, ExportRequest, export  # noqa: E402
from distill.export_gguf import quantize_gguf, write_gguf  # noqa: E402
from models.manifest import read_manifest  # noqa: E402
from tests.distill_helpers import greedy_text, runner_for  # noqa: E402
from tests.onnx_models import CORPUS, build_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("imatrix") / "tiny")


def test_importance_is_the_mean_square_of_each_linears_input_columns(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    samples = text_calibration(AutoTokenizer.from_pretrained(tiny), "\n".join(CORPUS * 4), length=32)
    seen = []
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]) and None)
    model(samples[:1], use_cache=False)
    rows = importance(model, samples[:1])
    assert len(rows) == 2 * 7 + 1, "every Linear of both layers, and the LM head"
    x = seen[0].reshape(-1, seen[0].shape[-1])
    np.testing.assert_allclose(rows["model.layers.1.mlp.down_proj"], (x * x).mean(0).detach().numpy(), rtol=1e-5)


def f32_tensors(path) -> dict[str, np.ndarray]:
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, t.shape[0])
            for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
def test_llama_cpp_rounds_the_important_columns_closer(tiny, tmp_path):
    """With a few columns weighted 1000x, llama.cpp's Q4_0 scales favour them: the weighted error falls."""
    full = write_gguf(tiny, tmp_path / "tiny.f32.gguf", "tiny")
    weights = f32_tensors(full)
    generator = np.random.default_rng(0)
    names = [n for n in weights if n.startswith("blk.") and weights[n].ndim == 2 and weights[n].shape[0] > 1]
    weighting = {n: np.where(generator.random(weights[n].shape[1]) < 0.1, 1000.0, 1.0).astype(np.float32) for n in names}
    plain = f32_tensors(quantize_gguf(full, tmp_path / "plain.gguf", "Q4_0", 1))
    weighted = f32_tensors(quantize_gguf(full, tmp_path / "weighted.gguf", "Q4_0", 1, importance=weighting))

    def error(rounded, name):
        return float((weighting[name] * (weights[name] - rounded[name]) ** 2).sum())

    assert len(names) == 14
    for name in names:
        assert error(weighted, name) < 0.8 * error(plain, name), name


def export_tiny(tiny, out, **fields):
    text = out.parent / "calibration.txt"
    text.write_text("\n".join(CORPUS * 4))
    request = ExportRequest(src=tiny, out=out, calibration=text, measure=False, **fields)
    return export(request, progress=lambda line: None)


@pytest.mark.slow
def test_an_imatrix_gguf_package_is_labelled_and_generates(tiny, tmp_path):
    plain, = export_tiny(tiny, tmp_path / "rtn", target="arm", format="gguf")
    weighted, = export_tiny(tiny, tmp_path / "imatrix", target="arm", format="gguf", algorithm="imatrix")
    quant = read_manifest(plain).quantization
    assert read_manifest(weighted).quantization == f"{quant}-imatrix"
    assert next(plain.glob("*.gguf")).read_bytes() != next(weighted.glob("*.gguf")).read_bytes()
    assert greedy_text(runner_for(weighted), "The quick brown fox", n=8)


@pytest.mark.slow
def test_the_gguf_type_can_be_chosen_per_export(tiny, tmp_path):
    package, = export_tiny(tiny, tmp_path / "q4_0", target="arm", format="gguf", gguf_quant="Q4_0")
    assert read_manifest(package).quantization == "Q4_0"
    assert {t.tensor_type.name for t in gguf.GGUFReader(next(package.glob("*.gguf"))).tensors if len(t.shape) == 2} \
        >= {"Q4_0"}
    with pytest.raises(ExportError, match="unknown GGUF quant type 'Q3_X'"):
        export_tiny(tiny, tmp_path / "bad", target="arm", format="gguf", gguf_quant="Q3_X")


@pytest.mark.parametrize("algorithm, fmt", [("imatrix", "onnx"), ("imatrix", "both"), ("hqq", "gguf")])
def test_an_algorithm_a_format_does_not_take_is_refused_before_any_work(tiny, tmp_path, algorithm, fmt):
    with pytest.raises(ExportError, match=f"--algorithm {algorithm} does not apply to"):
        export_tiny(tiny, tmp_path / "out", target="arm", format=fmt, algorithm=algorithm)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_importance_rows_are_named_as_llama_cpp_names_the_tensors(tiny):
    samples = text_calibration(AutoTokenizer.from_pretrained(tiny), "\n".join(CORPUS * 4), length=32)
    rows = source_importance(ExportRequest(src=tiny, out=tiny.parent), samples, progress=lambda line: None)
    tensors = {t.name: t for t in gguf.GGUFReader(write_gguf(tiny, tiny.parent / "names.gguf", "tiny")).tensors}
    assert len(rows) == 14, "the decoder Linears; llama-imatrix collects no others"
    for gguf_name, row in rows.values():
        assert tensors[gguf_name].shape[0] == row.size, gguf_name  # GGUF shapes list the input width first
        assert torch.isfinite(torch.from_numpy(row)).all()
