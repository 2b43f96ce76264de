"""In-place passes over an exported ONNX decoder: fp16 conversion and INT4 weight quantization.

``distill.export_onnx`` writes the fp32 graph; these passes turn it into what
a target profile asks for (``distill/targets.py``): ONNX Runtime's
``MatMulNBitsQuantizer`` for the MatMul weights and, optionally, the token
embedding (GatherBlockQuantized) and the LM head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.version_converter

ALGORITHMS = ("rtn", "hqq", "gptq")
INT4_OPSET = 21


@dataclass(frozen=True)
class Int4Options:
    block_size: int = 32  # weights per scale
    symmetric: bool = True  # zero point fixed at 8, or one stored per block
    accuracy_level: int = 4  # MatMulNBits compute type: 4 = int8 activations on CPU, 0 = the graph's float type
    algorithm: str = "rtn"  # rtn: the quantizer's blockwise round-to-nearest; hqq: half-quadratic (torch, no data)
    embedding: bool = True  # quantize the token embedding Gather
    lm_head: bool = True  # quantize the output projection

    def label(self, fp16: bool) -> str:
        """The manifest's quantization string, e.g. int4-block32-sym or int4-block128-asym-hqq-fp16."""
        parts = [f"int4-block{self.block_size}", "sym" if self.symmetric else "asym"]
        parts += [self.algorithm] if self.algorithm != "rtn" else []
        parts += ["fp16"] if fp16 else []
        return "-".join(parts)


def save_graph(graph: onnx.ModelProto, path: Path) -> None:
    """Write graph to path with all weights in one external file beside it (replacing the old one)."""
    data = path.parent / (path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def convert_fp16(path: Path) -> None:
    """Weights, activations and KV cache to fp16; tensor-core speed and half the memory on GPUs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    save_graph(convert_float_to_float16(onnx.load(str(path)), keep_io_types=False, disable_shape_infer=True), path)


def quantize_int4(path: Path, options: Int4Options) -> None:
    """Replace weight MatMuls (and the embedding Gather if asked) by 4-bit ops, in place."""
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    graph = onnx.load(str(path))
    exclude = [] if options.lm_head else [_logits_node(graph)]
    graph = _quantize(graph, options, ("MatMul",), exclude, _algo_config(options, ("MatMul",)))
    if options.embedding:
        # GatherBlockQuantized stores int4 tensors, which need opset 21; upgrade every op, not just the number.
        graph = onnx.version_converter.convert_version(graph, INT4_OPSET)
        # Round to nearest for the table: HQQ and GPTQ only know MatMul, and a lookup has no activations to fit.
        graph = _quantize(graph, options, ("Gather",), [], None)
    save_graph(graph, path)


def _quantize(graph: onnx.ModelProto, options: Int4Options, op_types, exclude, algo_config) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        graph, block_size=options.block_size, is_symmetric=options.symmetric, accuracy_level=options.accuracy_level,
        nodes_to_exclude=exclude, op_types_to_quantize=op_types, quant_axes=(("MatMul", 0), ("Gather", 1)),
        algo_config=algo_config,
    )
    quantizer.process()
    return quantizer.model.model


def _algo_config(options: Int4Options, op_types):
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if options.algorithm == "rtn":
        return None  # the quantizer builds its default (blockwise RTN) config from its own arguments
    if options.algorithm == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4, op_types_to_quantize=op_types)
    if options.algorithm == "gptq":
        # onnxruntime runs GPTQ through neural-compressor, which is not installed and needs calibration data.
        raise ValueError("GPTQ is not available offline here (onnxruntime needs neural-compressor for it); use rtn or hqq")
    raise ValueError(f"unknown INT4 algorithm {options.algorithm!r}: use one of {', '.join(ALGORITHMS)}")


def _logits_node(graph: onnx.ModelProto) -> str:
    return next(node.name for node in graph.graph.node if "logits" in node.output)
