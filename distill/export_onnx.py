"""HF causal LM -> ONNX decoder with KV cache -> optional INT4 (MatMulNBits) -> model package folder.

The graph follows optimum's ``text-generation-with-past`` layout (inputs
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.N.key/value``;
outputs ``logits``, ``present.N.key/value``), which is what
``appliance.backends.onnx_runtime`` serves. Needs torch and transformers
(dev/export time only). optimum-onnx is not used: its 0.1.0 release pins
transformers < 4.58, so the graph is exported with ``torch.onnx.export``.

    python -m distill.export_onnx SRC_FOLDER OUT_FOLDER --name my-model [--gguf-file F] [--no-int4]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from distill.quantize_onnx import Int4Options, quantize_int4, save_graph
from models.manifest import sha256_file, write_manifest

GRAPH = "model.onnx"
OPSET = 17


# What ``python -m distill.export_onnx`` and the test fixtures quantize with. ``appliance export``
# takes its options from the target profiles instead (distill/targets.py).
SERVED_INT4 = Int4Options(
    block_size=16,  # 32 (as in GGUF Q4_1) lost SmolLM2 answers
    symmetric=False,  # a zero point per block (like Q4_1) kept SmolLM2's greedy output closer to fp32
    lm_head_bits=8,  # at 4 SmolLM2 broke off long answers
    embedding=False,
)


@dataclass(frozen=True)
class ExportOptions:
    name: str
    int4: Int4Options | None = SERVED_INT4  # None keeps fp32 weights
    target: str = "any"  # recorded in the manifest: cpu, cuda or any
    aliases: tuple[str, ...] = ()
    gguf_file: str | None = None  # load the source from this GGUF inside the source folder


class _DecoderWithPast(torch.nn.Module):
    """Flat tensors in and out, so the ONNX graph gets one named input per cache tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # Full layers even where the model slides a window (Gemma 3): the served graph's present must be past + new
        # for every layer; the sliding layers still mask what lies outside their window.
        cache = DynamicCache()
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def load_source(src: Path, gguf_file: str | None = None):
    """(model, tokenizer) from an HF folder, or from a GGUF in it (dequantized to fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    return model.eval(), tokenizer


def export_decoder(model, path: Path) -> None:
    """Write the fp32 decoder graph with its weights in one external file beside it."""
    config = model.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present_names = [n.replace("past_key_values.", "present.") for n in past_names]
    # Trace with a non-empty cache and several new tokens so no shape is specialised to 0 or 1.
    past = [torch.zeros(1, kv_heads, 3, head_dim) for _ in past_names]
    args = (torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 7, dtype=torch.int64), torch.arange(3, 7)[None], *past)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes |= {n: {0: "batch", 2: "past_sequence"} for n in past_names}
    axes |= {n: {0: "batch", 2: "total_sequence"} for n in present_names}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        raw = Path(tmp) / GRAPH
        torch.onnx.export(
            _DecoderWithPast(model), args, str(raw), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names], dynamic_axes=axes,
        )
        save_graph(onnx.load(str(raw)), path)


def export_package(src: Path, out: Path, options: ExportOptions) -> Path:
    """Export the model in src to a served package folder out; returns out."""
    src, out = Path(src), Path(out)
    config = build_package(src, out, options)
    write_manifest(
        out, name=options.name, architecture=config.model_type, format="onnx",
        quantization=quantization_label(options), target=options.target,
        context_length=config.max_position_embeddings, source=_source_record(src, options.gguf_file),
        aliases=options.aliases,
    )
    return out


def build_package(src: Path, out: Path, options: ExportOptions):
    """Every file of the package in out (replaced if present) but its manifest, which the caller writes once the
    folder is complete; returns the model's config."""
    model, tokenizer = load_source(Path(src), options.gguf_file)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    export_decoder(model, out / GRAPH)
    if options.int4:
        quantize_int4(out / GRAPH, options.int4)
    tokenizer.save_pretrained(out)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return model.config


def quantization_label(options: ExportOptions) -> str:
    return options.int4.label(fp16=False) if options.int4 else "fp32"


def _source_record(src: Path, gguf_file: str | None) -> dict:
    if gguf_file:
        return {"model": str(src / gguf_file), "sha256": sha256_file(src / gguf_file)}
    weights = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin"))
    return {"model": str(src), "sha256": {w.name: sha256_file(w) for w in weights}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="HF model folder (or the folder of --gguf-file)")
    parser.add_argument("out", type=Path, help="package folder to write (replaced if present)")
    parser.add_argument("--name", required=True, help="model name recorded in the manifest")
    parser.add_argument("--gguf-file", help="load the source from this GGUF file inside src")
    parser.add_argument("--no-int4", action="store_true", help="keep fp32 weights")
    parser.add_argument("--alias", action="append", default=[], help="another name the model answers to")
    args = parser.parse_args(argv)
    options = ExportOptions(name=args.name, int4=None if args.no_int4 else SERVED_INT4, gguf_file=args.gguf_file,
                            aliases=tuple(args.alias))
    print(export_package(args.src, args.out, options))


if __name__ == "__main__":
    main()
