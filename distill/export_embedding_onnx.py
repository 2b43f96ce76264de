"""A sentence-transformers BERT model -> the ONNX graph of an embedding package (``appliance.backends.onnx_embedding``).

The graph is the transformer plus the model's own pooling (``1_Pooling/config.json``: mean or CLS) and L2
normalisation, so the box runs it without knowing the model's pooling. It is traced by ``torch.onnx.export`` with
eager attention: the SDPA path's mask is not traced into a graph that holds for every batch shape. ``INT8``
quantizes its matrix products' weights per channel with ONNX Runtime's dynamic quantizer (the activations are
quantized per batch as they run). Needs torch and transformers: this runs in the pipeline, never on the box.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from models.embedding_gguf import Source

ONNX_QUANTS = ("F32", "INT8")
POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
OPSET = 17


class EmbeddingExportError(ValueError):
    """The source cannot be exported as an ONNX embedding package; the message says why."""


def pooling(source: Path) -> str:
    config = Source(source).json("1_Pooling/config.json") or {"pooling_mode_mean_tokens": True}
    modes = [mode for key, mode in POOLINGS.items() if config.get(key)]
    others = [key for key, value in config.items() if key.startswith("pooling_mode") and value and key not in POOLINGS]
    if len(modes) != 1 or others:
        raise EmbeddingExportError(f"{source}: pooling {sorted(k for k, v in config.items() if v is True)} is not "
                                   "one the ONNX export writes: mean or CLS alone")
    return modes[0]


def check(source: Path, quant: str) -> str:
    """The source's pooling, once the request is one this export can do; before anything is written."""
    if quant not in ONNX_QUANTS:
        raise EmbeddingExportError(f"ONNX embedding packages are {' or '.join(ONNX_QUANTS)}, not {quant}")
    return pooling(source)


def write_onnx(source: Path, out: Path, quant: str = "F32") -> None:
    """model.onnx, tokenizer.json and config.json of the package, into the folder out."""
    mode = check(source, quant)
    with tempfile.TemporaryDirectory() as scratch:
        folder = _unpacked(source, Path(scratch) / "source")
        fp32 = Path(scratch) / "fp32.onnx"
        _trace(folder, fp32, mode)
        if quant == "INT8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(fp32), str(out / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"])
        else:
            shutil.copy(fp32, out / "model.onnx")
        for name in ("tokenizer.json", "config.json"):
            shutil.copy(folder / name, out / name)


def _unpacked(source: Path, folder: Path) -> Path:
    if source.is_dir():
        return source
    with zipfile.ZipFile(source) as z:
        z.extractall(folder)
    return folder


def _trace(folder: Path, out: Path, mode: str) -> None:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if model.config.type_vocab_size else [])

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state
            if mode == "cls":
                vector = hidden[:, 0]
            else:
                weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
                vector = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(vector, dim=-1)

    example = tuple(torch.ones(2, 8, dtype=torch.int64) if n != "token_type_ids" else torch.zeros(2, 8, dtype=torch.int64)
                    for n in names)
    axes = {n: {0: "batch", 1: "tokens"} for n in names} | {"embeddings": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(Pooled(), example, str(out), input_names=names, output_names=["embeddings"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
