"""Folders written by ONNX Runtime GenAI's model builder (``onnxruntime_genai.models.builder``), as the ONNX backend
serves them.

Such a folder holds ``genai_config.json``, ``model.onnx`` (+ ``.data``: GroupQueryAttention and INT4
MatMulNBits, com.microsoft), the tokenizer files and no ``config.json``. Plain onnxruntime runs the graph;
this module reads what the backend needs to know from ``genai_config.json`` and the graph itself (the facts
``config.json`` gives for the backend's own graphs, and the KV cache layout), and refuses, saying why, a
folder built with an option the backend cannot serve. ``appliance models add FOLDER`` writes its manifest
(``write_builder_manifest``); nothing here imports onnxruntime-genai.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from models.manifest import Manifest, ManifestError, write_manifest
from models.onnx_nodes import Node, graph_nodes

GENAI_CONFIG = "genai_config.json"
GRAPH = "model.onnx"
ATTENTION = "GroupQueryAttention"
# genai_config.json's names for the graph's inputs and outputs, as the ONNX backend binds them.
INPUTS = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
          "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
OUTPUTS = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
KV_TYPES = ("tensor(float)", "tensor(float16)")
# Sections of genai_config.json "model" that describe more than one decoder graph (multimodal, pipelines, drafters).
OTHER_COMPONENTS = ("vision", "speech", "embedding", "encoder", "audio", "drafter", "speculative")


class BuilderFolderError(ManifestError):
    """The folder is not one the ONNX backend can serve; the message says why."""


@dataclass(frozen=True)
class BuilderModel:
    """What genai_config.json and the graph say about a builder folder."""

    architecture: str  # genai_config "model.type", e.g. "llama", "qwen2"
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    layers: int
    kv_heads: int
    head_size: int
    quantization: str  # e.g. "int4-block32-sym"
    target: str  # the execution provider it was built for: "cpu", "cuda", ...

    def hf_config(self) -> dict:
        """The config.json keys the ONNX backend reads, for a folder that has none."""
        return {"model_type": self.architecture, "max_position_embeddings": self.context_length,
                "vocab_size": self.vocab_size, "eos_token_id": list(self.eos_token_ids),
                "bos_token_id": self.bos_token_id}


def is_builder_folder(folder: Path) -> bool:
    return (Path(folder) / GENAI_CONFIG).is_file()


def read_builder_model(folder: Path) -> BuilderModel:
    """The folder's model, or BuilderFolderError saying which builder option the backend cannot serve."""
    folder = Path(folder)
    model = _genai_config(folder).get("model") or {}
    decoder = model.get("decoder") or {}
    _check_single_decoder(folder, model, decoder)
    _check_names(folder, decoder)
    nodes = _graph_nodes(folder)
    _check_attention(folder, nodes)
    eos = model.get("eos_token_id")
    return BuilderModel(
        architecture=str(model.get("type") or "unknown"),
        context_length=int(model.get("context_length") or 0),
        vocab_size=int(model.get("vocab_size") or 0),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
        bos_token_id=model.get("bos_token_id"),
        layers=int(decoder["num_hidden_layers"]),
        kv_heads=int(decoder["num_key_value_heads"]),
        head_size=int(decoder["head_size"]),
        quantization=quantization_label(nodes),
        target=_target(decoder),
    )


def check_graph_inputs(inputs: dict[str, str]) -> None:
    """Refuse a graph (input name -> ONNX type, as onnxruntime lists them) with inputs the backend does not feed
    or a KV cache of a type it does not keep (a quantized KV cache)."""
    known = {"input_ids", "attention_mask", "position_ids"}
    for name, kind in inputs.items():
        if name.startswith("past_key_values."):
            if kind not in KV_TYPES:
                raise BuilderFolderError(f"the KV cache input {name} is {kind}; the ONNX backend keeps "
                                         "float or float16 caches (rebuild without kv_cache_quant_scheme)")
        elif name not in known:
            raise BuilderFolderError(f"the graph takes an input {name!r} the ONNX backend does not feed "
                                     "(a builder option such as paged attention or exclude_embeds); rebuild with "
                                     "the builder's defaults")


def quantization_label(nodes: list[Node]) -> str:
    """The MatMulNBits settings, e.g. "int4-block32-sym" (asym: zero points); "fp" when nothing is quantized."""
    settings = sorted({(n.ints.get("bits", 4), n.ints.get("block_size", 0), len(n.inputs) > 3 and bool(n.inputs[3]))
                       for n in nodes if n.op_type == "MatMulNBits"})
    if not settings:
        return "fp"
    return "+".join(f"int{bits}-block{block}-{'asym' if zero_points else 'sym'}"
                    for bits, block, zero_points in settings)


def write_builder_manifest(folder: Path, name: str | None = None) -> Manifest:
    """Check the folder as the backend will, then write its manifest.json (every file with size and sha256)."""
    folder = Path(folder)
    model = read_builder_model(folder)
    if model.context_length <= 0:
        raise BuilderFolderError(f"{folder / GENAI_CONFIG} gives no model.context_length")
    return write_manifest(
        folder, name=name or folder.name, architecture=model.architecture, format="onnx",
        quantization=model.quantization, target=model.target, context_length=model.context_length,
        source={"model": f"onnxruntime-genai model builder folder {folder}"}, kind="chat",
    )


def _genai_config(folder: Path) -> dict:
    path = folder / GENAI_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuilderFolderError(f"{folder} has no {GENAI_CONFIG}: not an onnxruntime-genai builder folder") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BuilderFolderError(f"{path} is unreadable ({exc})") from None


def _check_single_decoder(folder: Path, model: dict, decoder: dict) -> None:
    others = [key for key in OTHER_COMPONENTS if key in model]
    if others or "pipeline" in decoder:
        parts = others or ["a decoder pipeline"]
        raise BuilderFolderError(f"{folder}: the model has {', '.join(parts)} besides its decoder; the ONNX backend "
                                 "serves text-only models of one decoder graph")
    if decoder.get("filename") != GRAPH:
        raise BuilderFolderError(f"{folder}: the decoder is {decoder.get('filename')!r}; the ONNX backend serves "
                                 f"{GRAPH}")
    missing = [k for k in ("num_hidden_layers", "num_key_value_heads", "head_size") if k not in decoder]
    if missing:
        raise BuilderFolderError(f"{folder / GENAI_CONFIG}: model.decoder lacks {', '.join(missing)}")
    if "sliding_window" in decoder:
        raise BuilderFolderError(f"{folder}: built with a windowed KV cache (decoder.sliding_window); the ONNX backend "
                                 "keeps whole caches: rebuild with windowed_kv_cache=false")


def _check_names(folder: Path, decoder: dict) -> None:
    for section, expected in (("inputs", INPUTS), ("outputs", OUTPUTS)):
        for key, value in (decoder.get(section) or {}).items():
            if expected.get(key) != value:
                raise BuilderFolderError(f"{folder}: decoder {section[:-1]} {key}={value!r} is not one the ONNX "
                                         f"backend binds ({', '.join(f'{k}={v}' for k, v in expected.items())})")


def _graph_nodes(folder: Path) -> list[Node]:
    try:
        return graph_nodes(folder / GRAPH)
    except FileNotFoundError:
        raise BuilderFolderError(f"{folder} lacks {GRAPH}") from None
    except (OSError, ValueError) as exc:
        raise BuilderFolderError(str(exc)) from None


def _check_attention(folder: Path, nodes: list[Node]) -> None:
    ops = {n.op_type for n in nodes}
    if ATTENTION not in ops:
        found = sorted(op for op in ops if "Attention" in op) or ["no attention operator"]
        raise BuilderFolderError(f"{folder}: the graph uses {', '.join(found)}; the ONNX backend serves builder "
                                 f"graphs with {ATTENTION} (its KV cache layout), as the builder writes for CPU and CUDA")
    windowed = [n for n in nodes if n.op_type == ATTENTION and n.ints.get("local_window_size", -1) > 0]
    if windowed:
        raise BuilderFolderError(f"{folder}: sliding-window attention (local_window_size "
                                 f"{windowed[0].ints['local_window_size']}) is not served by the ONNX backend yet")


def _target(decoder: dict) -> str:
    providers = [name for option in (decoder.get("session_options") or {}).get("provider_options") or []
                 for name in option]
    return providers[0] if providers else "cpu"
