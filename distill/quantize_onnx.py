"""In-place passes over an exported ONNX decoder: fp16 conversion and INT4 weight quantization.

``distill.export_onnx`` writes the fp32 graph; these passes turn it into what
a target profile asks for (``distill/targets.py``): ONNX Runtime's
``MatMulNBitsQuantizer`` for the MatMul weights and, optionally, the token
embedding (GatherBlockQuantized) and the LM head.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
from onnx import helper, numpy_helper

ALGORITHMS = ("rtn", "hqq", "gptq", "qat")
INT4_OPSET = 21


@dataclass(frozen=True)
class Int4Options:
    block_size: int = 32  # weights per scale
    symmetric: bool = True  # zero point fixed at 8, or one stored per block
    accuracy_level: int = 4  # MatMulNBits compute type: 4 = int8 activations on CPU, 0 = the graph's float type
    # rtn: the quantizer's blockwise round-to-nearest; hqq: half-quadratic (torch, no data);
    # gptq, qat: the source was rounded by distill.gptq or distill.qat onto this grid beforehand (appliance export does it)
    algorithm: str = "rtn"
    embedding: bool = True  # quantize the token embedding (shared with the LM head when the model ties them)
    lm_head_bits: int = 8  # output projection: 8 or 4 bits, 0 keeps it at graph precision
    mixed: bool = False  # v_proj and down_proj at 8 bits in the layers llama.cpp's Q4_K_M gives more bits

    def __post_init__(self):
        if self.lm_head_bits not in (0, 4, 8):
            raise ValueError(f"lm_head_bits must be 0 (keep float), 4 or 8, not {self.lm_head_bits}")

    def label(self, fp16: bool) -> str:
        """The manifest's quantization string, e.g. int4-block32-sym-head8 or int4-block128-asym-hqq-fp16."""
        # HQQ fits a zero point per block whatever `symmetric` says
        parts = [f"int4-block{self.block_size}", "sym" if self.symmetric and self.algorithm != "hqq" else "asym"]
        parts += [self.algorithm] if self.algorithm != "rtn" else []
        parts += {0: ["float-head"], 4: [], 8: ["head8"]}[self.lm_head_bits]
        parts += ["mixed"] if self.mixed else []
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
    """Replace weight MatMuls (and the embedding Gather if asked) by 4-bit ops, in place.

    The LM head gets lm_head_bits, and with ``mixed`` the layers Q4_K_M favours keep v_proj and
    down_proj at 8 bits. When the model ties its embedding to the LM head (SmolLM2, Gemma, most small models), the
    embedding lookup reads the head's quantized weights instead of a second copy on disk: for a
    135M model with a 49k vocabulary that copy is 15% of the package.
    """
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    graph = onnx.load(str(path))
    embedding, head = _embedding_node(graph), _lm_head(graph)
    # The head's blocks must tile its rows exactly for the lookup to share them (SmolLM2: 576 = 9 x 64).
    head_options = replace(options, block_size=_block_dividing(options.block_size, _dims(graph, head.input[1])[0]))
    tied = options.embedding and options.lm_head_bits and _is_transposed_copy(graph, embedding.input[0], head.input[1])
    sensitive = _sensitive_matmuls(graph) if options.mixed else []
    graph = _quantize(graph, options, ("MatMul",), exclude=[head.name, *sensitive],
                      algo_config=_algo_config(options, ("MatMul",)))
    if sensitive:
        graph = _quantize(graph, options, ("MatMul",), only=sensitive, bits=8)
    if options.lm_head_bits:
        algo_config = _algo_config(head_options, ("MatMul",)) if options.lm_head_bits == 4 else None  # 8 bits: RTN
        graph = _quantize(graph, head_options, ("MatMul",), only=[head.name], bits=options.lm_head_bits,
                          algo_config=algo_config)
    shared = tied and _read_embedding_from_head(graph, head.input[0])
    if options.embedding and not shared:
        # GatherBlockQuantized stores int4 tensors, which need opset 21; upgrade every op, not just the number.
        graph = onnx.version_converter.convert_version(graph, INT4_OPSET)
        # Round to nearest for the table: HQQ and GPTQ only know MatMul, and a lookup has no activations to fit.
        graph = _quantize(graph, options, ("Gather",))
    save_graph(graph, path)


def _quantize(graph: onnx.ModelProto, options: Int4Options, op_types, exclude=(), only=None, bits: int = 4,
              algo_config=None) -> onnx.ModelProto:
    """One quantizer pass over the nodes of op_types, less exclude, or just the nodes named in only."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    if only is not None:  # the quantizer's nodes_to_include adds to op_types instead of narrowing them
        exclude = [n.name for n in graph.graph.node if n.op_type in op_types and n.name not in only]

    quant_axes = (("MatMul", 0), ("Gather", 1))
    algo_config = algo_config or DefaultWeightOnlyQuantConfig(
        block_size=options.block_size, is_symmetric=options.symmetric, accuracy_level=options.accuracy_level,
        bits=bits, op_types_to_quantize=op_types, quant_axes=quant_axes,
    )
    quantizer = MatMulNBitsQuantizer(
        graph, nodes_to_exclude=list(exclude), op_types_to_quantize=op_types,
        quant_axes=quant_axes, algo_config=algo_config,
    )
    if isinstance(algo_config, HQQWeightOnlyQuantConfig):
        quantizer.node_quantizer = _integer_zero_hqq(algo_config)
    quantizer.process()
    if isinstance(algo_config, HQQWeightOnlyQuantConfig):
        _finish_hqq(quantizer.model.model, options.accuracy_level)
    return quantizer.model.model


def _integer_zero_hqq(config):
    """ONNX Runtime's HQQ with each block's zero point rounded to a whole number and its scale refitted.

    HQQ fits a fractional zero point, which MatMulNBits accepts only as a float tensor, and ONNX Runtime's CPU
    kernel then takes its unpacked path: it dequantizes every weight to fp32 at every call (a 0.9B model decoded
    at 0.5 tokens/s here against 18 for its GGUF; onnxruntime#28552 has the same for 2 bits). Whole zero points pack
    into the uint8 nibbles the fast kernels read. After rounding the zero point, two rounds of: quantize the
    original weights to nearest, then the least-squares scale for those codes, keep most of HQQ's fit.
    """
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantizer

    class IntegerZeroHQQ(HQQWeightOnlyQuantizer):
        def quantize_internal(self, tensor, bits=4, channel_wise=True, group_size=64, optimize=True, round_zero=True,
                              axis=1):
            w_q, scale, zero = super().quantize_internal(tensor, bits, channel_wise, group_size, optimize, round_zero, axis)
            if axis != 1:
                return w_q, scale, zero
            top = 2**bits - 1
            weight = tensor.float()
            weight = torch.nn.functional.pad(weight, (0, (group_size - weight.shape[1] % group_size) % group_size))
            groups = weight.reshape(-1, group_size)
            s = scale.float().reshape(-1, 1)
            z = zero.float().round().clamp(0, top).reshape(-1, 1)
            for _ in range(2):
                codes = torch.round(groups / s + z).clamp(0, top) - z
                fitted = (groups * codes).sum(1, keepdim=True) / (codes * codes).sum(1, keepdim=True).clamp(min=1e-12)
                s = torch.where(fitted > 0, fitted, s)
            q = torch.round(groups / s + z).clamp(0, top)
            return q.reshape(w_q.shape).int(), s.reshape(scale.shape).to(scale.dtype), z.reshape(zero.shape).to(zero.dtype)

    return IntegerZeroHQQ(config)


def _finish_hqq(graph: onnx.ModelProto, accuracy_level: int) -> None:
    """What ONNX Runtime's HQQ leaves out for the fast CPU kernels: the accuracy level the other roundings set
    (4: int8 activations; without it the kernel computes in fp32, 2.5x slower here), and _integer_zero_hqq's whole
    zero points packed as uint8: two 4-bit blocks a byte, the first in the low nibble, one row of bytes per output
    column."""
    for node in graph.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        if not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
        if len(node.input) < 4 or not node.input[3]:
            continue
        tensor = _initializer(graph, node.input[3])
        if tensor.data_type == onnx.TensorProto.UINT8:  # packed already: a round-to-nearest node
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        blocks = -(-attrs["K"] // attrs["block_size"])
        zero = numpy_helper.to_array(tensor).reshape(attrs["N"], blocks)
        nibbles = np.zeros((attrs["N"], blocks + blocks % 2), dtype=np.uint8)
        nibbles[:, :blocks] = zero.astype(np.uint8)
        packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        tensor.CopyFrom(numpy_helper.from_array(packed.reshape(-1), tensor.name))


def _algo_config(options: Int4Options, op_types):
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if options.algorithm == "rtn":
        return None  # _quantize builds the blockwise RTN config from the options
    if options.algorithm == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4, op_types_to_quantize=op_types)
    if options.algorithm in ("gptq", "qat"):
        return None  # the weights are already on this grid; round-to-nearest keeps them there
    raise ValueError(f"unknown INT4 algorithm {options.algorithm!r}: use one of {', '.join(ALGORITHMS)}")


# -- finding the embedding and the head ----------------------------------------
def _embedding_node(graph: onnx.ModelProto) -> onnx.NodeProto:
    for node in graph.graph.node:
        if node.op_type == "Gather" and node.input[1] == "input_ids":
            return node
    raise ValueError("no embedding Gather reads input_ids in this graph: not a decoder that distill.export_onnx wrote")


def _lm_head(graph: onnx.ModelProto) -> onnx.NodeProto:
    """The MatMul whose weight is [hidden, vocab], found by shape so a soft-capped or scaled head is found too."""
    vocab, hidden = _dims(graph, _embedding_node(graph).input[0])
    for node in graph.graph.node:
        if node.op_type == "MatMul" and _dims(graph, node.input[1]) == [hidden, vocab]:
            return node
    raise ValueError(f"no LM head MatMul with a [{hidden}, {vocab}] weight in this graph")


def _initializer(graph: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in graph.graph.initializer if t.name == name), None)


def _dims(graph: onnx.ModelProto, name: str) -> list[int] | None:
    tensor = _initializer(graph, name)
    return None if tensor is None else list(tensor.dims)


SENSITIVE = re.compile(r"/layers\.(\d+)/(self_attn/v_proj|mlp/down_proj)/MatMul$")


def more_bits_layers(layers: int) -> set[int]:
    """The layers llama.cpp's Q4_K_M gives v_proj and down_proj more bits (use_more_bits in llama-quant.cpp).

    The first and last eighth of the layers, and every third one between. On SmolLM2, 8 bits there took
    held-out perplexity from 1.28x to 1.14x fp32 for 7% more bytes (bench/results/export_smollm2/summary.md).
    """
    return {i for i in range(layers) if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2}


def _sensitive_matmuls(graph: onnx.ModelProto) -> list[str]:
    """The v_proj and down_proj MatMuls of the layers in more_bits_layers."""
    found = [(int(m.group(1)), node.name) for node in graph.graph.node
             if node.op_type == "MatMul" and (m := SENSITIVE.search(node.name))]
    if not found:
        raise ValueError("mixed precision needs the exporter's node names (/layers.N/self_attn/v_proj/MatMul); none found")
    chosen = more_bits_layers(max(layer for layer, _ in found) + 1)
    return [name for layer, name in found if layer in chosen]


def _block_dividing(block_size: int, k: int) -> int:
    """The largest power-of-two block, at most block_size and at least 16, that tiles k (or 16)."""
    while block_size > 16 and k % block_size:
        block_size //= 2
    return block_size


# -- tied embeddings -------------------------------------------------------------
def _is_transposed_copy(graph: onnx.ModelProto, table_name: str, weight_name: str) -> bool:
    """True when the embedding table is the head's weight transposed: the exporter writes two copies."""
    table, weight = _initializer(graph, table_name), _initializer(graph, weight_name)
    if table is None or weight is None:
        return False
    return bool(np.array_equal(numpy_helper.to_array(table), numpy_helper.to_array(weight).T))


def _read_embedding_from_head(graph: onnx.ModelProto, head_input: str) -> bool:
    """Swap the embedding Gather for a GatherBlockQuantized over the head's MatMulNBits weights.

    MatMulNBits keeps B as [N, blocks, bytes per block], scales as [N * blocks] or [N, blocks]
    and packed zero points per row; GatherBlockQuantized wants [N, K * bits / 8], [N, blocks] and
    [N, packed blocks]. Same bytes, same nibble order, same default zero point (8 or 128), so
    Reshapes of the shared initializers are all it takes (checked in tests/test_export.py). The
    saving is on disk: ONNX Runtime folds the Reshapes into copies when it loads the graph.
    Returns False, changing nothing, where the bytes cannot be shared (HQQ's float zero points,
    rows that are not whole blocks).
    """
    head = next(n for n in graph.graph.node if n.op_type == "MatMulNBits" and n.input[0] == head_input)
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    if attrs["K"] % attrs["block_size"]:
        return False
    zero_points = [name for name in head.input[3:4] if name]  # optional input: absent or "" when symmetric
    if zero_points and _initializer(graph, zero_points[0]).data_type != onnx.TensorProto.UINT8:
        return False
    rows, blocks = attrs["N"], attrs["K"] // attrs["block_size"]
    gather = _embedding_node(graph)
    shapes = {"data": [rows, -1], "scales": [rows, blocks], "zero_points": [rows, -1]}
    new_nodes, inputs = [], []
    for role, name in zip(("data", "scales", "zero_points"), (head.input[1], head.input[2], *zero_points)):
        shape = numpy_helper.from_array(np.array(shapes[role], np.int64), f"{name}_as_embedding_shape")
        graph.graph.initializer.append(shape)
        new_nodes.append(helper.make_node("Reshape", [name, shape.name], [f"{name}_as_embedding"], name=f"{name}/as_embedding"))
        inputs.append(new_nodes[-1].output[0])
    inputs.insert(1, gather.input[1])  # data, indices, scales[, zero points]
    new_nodes.append(helper.make_node(
        "GatherBlockQuantized", inputs, list(gather.output), name=gather.name + "_from_lm_head", domain="com.microsoft",
        gather_axis=0, quantize_axis=1, block_size=attrs["block_size"], bits=attrs["bits"],
    ))
    # In the Gather's place, so producers still come before consumers; its float table goes.
    table = gather.input[0]
    position = list(graph.graph.node).index(gather)
    graph.graph.node.remove(gather)
    for offset, node in enumerate(new_nodes):
        graph.graph.node.insert(position + offset, node)
    graph.graph.initializer.remove(_initializer(graph, table))
    return True
