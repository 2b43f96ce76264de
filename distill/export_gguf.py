"""HF Llama-family folder -> GGUF (f32/f16) with the ``gguf`` package -> llama.cpp's own quantizer.

The writer covers what the appliance exports: Llama-architecture decoders
(``LlamaForCausalLM``: SmolLM, TinyLlama, distilled students) with a byte-level
BPE tokenizer (``tokenizer.json``). Anything else is refused with a message
naming what is unsupported, never written half-right.

    python -m distill.export_gguf SRC_FOLDER OUT.gguf --quant Q4_K_M
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
from pathlib import Path

import gguf
import numpy as np

from distill.targets import GGUF_QUANT_TYPES as QUANT_TYPES

# HF tensor name suffix -> GGUF name (llama.cpp's LLM_ARCH_LLAMA tensor map).
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


class GgufExportError(ValueError):
    """The source model cannot be written as GGUF; the message says what is unsupported."""


# -- tensors ------------------------------------------------------------------
def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows with the rotary halves split (rotate_half); llama.cpp wants them interleaved."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def gguf_tensors(state: dict, config) -> dict[str, np.ndarray]:
    """GGUF name -> array, q/k permuted, 1-D norms kept f32."""
    out = {}
    for hf_name, tensor in state.items():
        name = gguf_name(hf_name)
        array = tensor.float().numpy()
        if name.endswith("attn_q.weight"):
            array = permute_qk(array, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            array = permute_qk(array, _kv_heads(config))
        out[name] = array
    if getattr(config, "tie_word_embeddings", False):
        out.pop("output.weight", None)  # llama.cpp reuses token_embd when output is absent
    return out


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER_TENSORS:
        return f"blk.{parts[2]}.{_LAYER_TENSORS['.'.join(parts[3:])]}"
    raise GgufExportError(f"tensor {hf_name!r} has no GGUF name in the llama architecture (biases and extra modules are unsupported)")


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


# -- metadata -----------------------------------------------------------------
def check_supported(config) -> None:
    if config.model_type != "llama":
        raise GgufExportError(f"model_type {config.model_type!r} is not supported: the GGUF writer handles llama only")
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in ("default", None):
        raise GgufExportError(f"rope scaling {rope_type!r} is not supported by the GGUF writer")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GgufExportError("attention or MLP biases are not supported by the GGUF writer")


def _rope(config) -> dict:
    # transformers >= 5 groups rope settings in rope_parameters; older versions have rope_theta/rope_scaling.
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def add_model_metadata(writer: gguf.GGUFWriter, config, name: str, file_type: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_kv_heads(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (how text is split before BPE)."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and "\\p{N}{1,3}" in json.dumps(parts[0]):
        return "llama-bpe"
    raise GgufExportError(f"pre-tokenizer {kinds} has no llama.cpp equivalent known to the GGUF writer")


def add_tokenizer_metadata(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    if spec["model"].get("type") != "BPE" or not _is_byte_level(spec):
        raise GgufExportError("only byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM style) are supported by the GGUF writer")
    tokens, types = _vocab(spec, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    _add_special_tokens(writer, folder, spec)


def _is_byte_level(spec: dict) -> bool:
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _vocab(spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id |= {i: t["content"] for i, t in added.items()}
    if max(by_id) >= vocab_size:
        raise GgufExportError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _add_special_tokens(writer: gguf.GGUFWriter, folder: Path, spec: dict) -> None:
    from tokenizers import Tokenizer

    config = _read_json(folder / "tokenizer_config.json")
    ids = {t["content"]: t["id"] for t in spec.get("added_tokens", [])} | spec["model"]["vocab"]
    setters = {"bos_token": writer.add_bos_token_id, "eos_token": writer.add_eos_token_id,
               "unk_token": writer.add_unk_token_id, "pad_token": writer.add_pad_token_id}
    for key, setter in setters.items():
        text = config.get(key)
        text = text.get("content") if isinstance(text, dict) else text
        if text and text in ids:
            setter(ids[text])
    # Whether BOS is prepended is the tokenizer's post-processor's call; ask it rather than guess.
    encoded = Tokenizer.from_file(str(folder / "tokenizer.json")).encode("a").ids
    bos = ids.get(_text(config.get("bos_token")))
    writer.add_add_bos_token(bool(encoded) and bos is not None and encoded[0] == bos)
    writer.add_add_eos_token(False)
    template = chat_template(folder, config)
    if template:
        writer.add_chat_template(template)


def chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"  # transformers >= 4.43 may write it apart
    return tokenizer_config.get("chat_template") or (jinja.read_text(encoding="utf-8") if jinja.exists() else None)


def _text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


# -- writing and quantizing ----------------------------------------------------
def write_gguf(src: Path, out: Path, name: str, outtype: str = "F32", progress: bool = False) -> Path:
    """Write the HF model in src as an unquantized GGUF (F32, or F16 for 2-D weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src, out = Path(src), Path(out)
    config = AutoConfig.from_pretrained(src)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tensors = gguf_tensors(model.state_dict(), config)
    del model
    writer = gguf.GGUFWriter(str(out), "llama")
    add_model_metadata(writer, config, name, QUANT_TYPES[outtype])
    add_tokenizer_metadata(writer, src, config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, array in tensors.items():
        half = outtype == "F16" and array.ndim == 2
        writer.add_tensor(tensor_name, array.astype(np.float16 if half else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
    return out


def quantize_gguf(src: Path, out: Path, quant: str, threads: int | None = None,
                  importance: dict[str, np.ndarray] | None = None) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize), as `llama-quantize` does.

    importance: GGUF tensor name -> importance matrix row (``distill.calibration.importance``), as
    ``llama-quantize --imatrix`` reads it: llama.cpp then weighs each weight's rounding error by it.
    """
    import llama_cpp

    if quant not in QUANT_TYPES:
        raise GgufExportError(f"unknown GGUF quant type {quant!r}: use one of {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = threads or os.cpu_count() or 1
    keep_alive: list = []  # the C array and the buffers it points into, alive until llama.cpp returns
    if importance:
        params.imatrix = _importance_array(importance, keep_alive)
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0 or not Path(out).is_file():
        raise GgufExportError(f"llama.cpp could not quantize {src} to {quant} (status {status})")
    return Path(out)


def _importance_array(importance: dict[str, np.ndarray], keep_alive: list):
    """A null-terminated C array of llama_model_imatrix_data."""
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
    for entry, (name, values) in zip(entries, importance.items()):
        values = np.ascontiguousarray(values, dtype=np.float32)
        keep_alive += [name.encode(), values]
        entry.name, entry.size = keep_alive[-2], values.size
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    keep_alive.append(entries)
    return entries


def llama_cpp_types(src: Path, quant: str, threads: int | None = None, scratch: Path | None = None) -> dict[str, str]:
    """GGUF tensor name -> the type llama.cpp's quant recipe gives it for this model (e.g. Q4_K_M keeps rows that
    are not whole 256-blocks in Q5_0), found by quantizing a copy in a temporary folder under scratch."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        quantized = export_gguf(src, Path(tmp) / f"probe.{quant}.gguf", "probe", quant, threads, progress=False)
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(quantized).tensors}


def export_gguf(src: Path, out: Path, name: str, quant: str, threads: int | None = None, progress: bool = True) -> Path:
    """HF folder -> quantized GGUF file out; the unquantized intermediate is removed."""
    out = Path(out)
    full = out.with_name(out.stem + ".f32.gguf")
    try:
        write_gguf(src, full, name, progress=progress)
        if quant == "F32":
            return full.replace(out)
        return quantize_gguf(full, out, quant, threads)
    finally:
        full.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="HF model folder (config.json, weights, tokenizer.json)")
    parser.add_argument("out", type=Path, help="GGUF file to write")
    parser.add_argument("--quant", default="Q4_K_M", choices=sorted(QUANT_TYPES))
    parser.add_argument("--name", help="model name in the GGUF metadata [default: the source folder's name]")
    args = parser.parse_args(argv)
    print(export_gguf(args.src, args.out, args.name or args.src.name, args.quant))


if __name__ == "__main__":
    main()
