"""How much memory a model will take once loaded, known before loading it: its files plus its KV cache.

The service's model pool budgets memory with this (``max_model_memory_mb``). The KV cache is what
the model's shape says for the slots and context it will get: for a GGUF, the attention keys of its
metadata (read from the header alone: gguf-py's full parse of the tokenizer arrays takes seconds);
for an ONNX package, its config.json. A model whose shape is unknown counts its files only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from models.formats import GGUF_FILE_TYPES

# GGUF value types (gguf-py's GGUFValueType): fixed-size scalars by struct format
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ModelShape:
    """What a model's files say of its size, without loading it."""

    disk_bytes: int  # the files the engine maps or reads
    layers: int = 0  # 0: the shape is unknown, and only the files are counted
    kv_width: int = 0  # key and value numbers per token per layer
    trained_context: int = 0
    kv_value_bytes: float = 2
    quantization: str | None = None

    def kv_bytes(self, context_length: int, slots: int) -> int:
        """The KV cache of ``slots`` sequences of ``context_length`` tokens (capped at the trained context)."""
        tokens = min(context_length, self.trained_context or context_length) * slots
        return int(self.layers * tokens * self.kv_width * self.kv_value_bytes)

    def memory_mib(self, context_length: int, slots: int) -> int:
        return -(-(self.disk_bytes + self.kv_bytes(context_length, slots)) // 2**20)


def read_shape(path: Path, fmt: str) -> ModelShape:
    """The shape of the model at ``path``: a .gguf file or an ONNX package folder."""
    path = Path(path)
    try:
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    except OSError:  # gone since it was listed: loading it will say so
        return ModelShape(0)
    if fmt == "gguf":
        return _gguf_shape(path, disk)
    if fmt == "onnx":
        return _onnx_shape(path, disk)
    return ModelShape(disk)


def _gguf_shape(path: Path, disk: int) -> ModelShape:
    try:
        meta = gguf_metadata(path)
    except (OSError, ValueError, struct.error, MemoryError, OverflowError):
        return ModelShape(disk)
    arch = meta.get("general.architecture")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    quantization = GGUF_FILE_TYPES.get(meta.get("general.file_type"))
    layers, heads, width = get("block_count"), get("attention.head_count"), get("embedding_length")
    if not (layers and heads and width):
        return ModelShape(disk, quantization=quantization)
    heads_kv = get("attention.head_count_kv", heads)
    heads_kv = max(heads_kv) if isinstance(heads_kv, list) else heads_kv
    key_len = get("attention.key_length", width // heads)
    value_len = get("attention.value_length", width // heads)
    return ModelShape(disk, layers, heads_kv * (key_len + value_len), get("context_length", 0), 2, quantization)


def gguf_metadata(path: Path) -> dict:
    """The scalar and string values of a GGUF file's header (arrays of numbers too, tokenizer arrays skipped)."""
    meta: dict = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, _tensors, count = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        for _ in range(count):
            key = _read_string(f)
            meta[key] = _read_value(f, struct.unpack("<I", f.read(4))[0], keep=not key.startswith("tokenizer."))
    return meta


MAX_STRING = 1 << 20  # longer than any real key or value: a damaged header, not something to allocate


def _read_string(f) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    if length > MAX_STRING:
        raise ValueError(f"a GGUF string of {length} bytes: the header is damaged")
    return f.read(length).decode("utf-8", errors="replace")


def _read_value(f, kind: int, keep: bool = True):
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _read_string(f)
    if kind == _ARRAY:
        item, n = struct.unpack("<IQ", f.read(12))
        if n > MAX_STRING * 64:
            raise ValueError(f"a GGUF array of {n} items: the header is damaged")
        if item in _SCALARS and not keep:  # skip without decoding
            f.seek(n * struct.calcsize(_SCALARS[item]), 1)
            return None
        values = [_read_value(f, item, keep) for _ in range(n)]
        return values if keep else None
    raise ValueError(f"unknown GGUF value type {kind}")


def _onnx_shape(folder: Path, disk: int) -> ModelShape:
    """From an ONNX package's config.json (Hugging Face's) and manifest; the KV cache counted as fp32."""
    quantization = None
    try:
        quantization = json.loads((folder / "manifest.json").read_text()).get("quantization")
        config = json.loads((folder / "config.json").read_text())
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        heads_kv = config.get("num_key_value_heads") or heads
        return ModelShape(disk, config["num_hidden_layers"], 2 * heads_kv * head_dim,
                          config.get("max_position_embeddings", 0), 4, quantization)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return ModelShape(disk, quantization=quantization)
