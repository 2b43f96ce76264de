"""Small helper graphs that keep the ONNX backend's KV cache and logits where the model runs (a GPU, or the CPU).

The decoder graph leaves its present (the KV cache) and logits on its device. What the step loop does to them
between steps runs as ONNX graphs on the same execution provider, so nothing crosses to the host but the chosen
tokens (and the last position's logits, only when a sequence samples other than greedily):

- ``window``: rows of a batch's per-layer cache arrays, a window of positions, left-padded with zeros (re-packing a
  batch when sequences join or leave it, or detaching one slot's cache from its batch);
- ``concat``: several such windows stacked into one batch;
- ``head``: the last position's logits (as float32) and their argmax.

And one change to the decoder graph itself, ``picking_logits``: an input that names the positions whose logits
it computes, so a prompt's step runs the LM head for its last position, not for all of them; and an output, their
argmax, so a greedy step reads one number, not the logits.

The service has no ``onnx`` package (only onnxruntime), so the graphs are written and changed here as protobuf
bytes: the few ONNX message fields they need, by their field numbers in onnx.proto.
"""

from __future__ import annotations

import struct

import numpy as np

from models.onnx_nodes import (GRAPH_INPUT, GRAPH_NODE, GRAPH_OUTPUT, MODEL_GRAPH, MODEL_OPSET_IMPORT, NODE_INPUT,
                               NODE_NAME, NODE_OP_TYPE, NODE_OUTPUT, OPSET_DOMAIN, OPSET_VERSION, message_fields)

OPSET = 17
IR_VERSION = 8
FLOAT, INT64, FLOAT16 = 1, 7, 10
ONNX_TYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.float16): FLOAT16, np.dtype(np.int64): INT64}
_INT_ATTR, _INTS_ATTR = 2, 7


# -- protobuf wire format ---------------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s as ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


# -- ONNX messages --------------------------------------------------------------------------------------------
def _attribute(name: str, value: int | list[int]) -> bytes:
    if isinstance(value, int):
        return _bytes(1, name) + _int(3, value) + _int(20, _INT_ATTR)
    return _bytes(1, name) + b"".join(_int(8, v) for v in value) + _int(20, _INTS_ATTR)


def node(op: str, inputs: list[str], outputs: list[str], **attributes) -> bytes:
    return (b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs) + _bytes(4, op)
            + b"".join(_bytes(5, _attribute(k, v)) for k, v in attributes.items()))


def value_info(name: str, elem_type: int, dims: list[str | int]) -> bytes:
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    tensor_type = _int(1, elem_type) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def int64_tensor(name: str, values: list[int]) -> bytes:
    return (_int(1, len(values)) + _int(2, INT64) + _bytes(8, name)
            + _bytes(9, struct.pack(f"<{len(values)}q", *values)))


def model(nodes: list[bytes], inputs: list[bytes], outputs: list[bytes], initializers: list[bytes] = (),
          name: str = "helper") -> bytes:
    graph = (b"".join(_bytes(1, n) for n in nodes) + _bytes(2, name) + b"".join(_bytes(5, t) for t in initializers)
             + b"".join(_bytes(11, i) for i in inputs) + b"".join(_bytes(12, o) for o in outputs))
    opset = _bytes(1, "") + _int(2, OPSET)
    return _int(1, IR_VERSION) + _bytes(2, "edge-appliance") + _bytes(7, graph) + _bytes(8, opset)


# -- the three graphs -------------------------------------------------------------------------------------------
KV_DIMS = ["rows", "kv_heads", "width", "head_dim"]


def window_graph(n_arrays: int, dtype) -> bytes:
    """x0..x{n-1} [rows, kv_heads, width, head_dim]; rows [k], start [1], end [1], pads [8] (Pad's, int64)
    -> y0..y{n-1}: Pad(Slice(Gather(x, rows, axis 0), start, end, axis 2), pads), zeros on the padding."""
    elem = ONNX_TYPES[np.dtype(dtype)]
    nodes, inputs, outputs = [], [], []
    for i in range(n_arrays):
        nodes += [node("Gather", [f"x{i}", "rows"], [f"g{i}"], axis=0),
                  node("Slice", [f"g{i}", "start", "end", "axes"], [f"s{i}"]),
                  node("Pad", [f"s{i}", "pads"], [f"y{i}"])]
        inputs.append(value_info(f"x{i}", elem, KV_DIMS))
        outputs.append(value_info(f"y{i}", elem, ["k", "kv_heads", "w", "head_dim"]))
    inputs += [value_info("rows", INT64, ["k"]), value_info("start", INT64, [1]), value_info("end", INT64, [1]),
               value_info("pads", INT64, [8])]
    return model(nodes, inputs, outputs, [int64_tensor("axes", [2])], name="window")


def concat_graph(n_arrays: int, n_parts: int, dtype) -> bytes:
    """p{j}_{i} for each part j and array i -> y{i}: the parts' arrays stacked along the rows (axis 0)."""
    elem = ONNX_TYPES[np.dtype(dtype)]
    nodes = [node("Concat", [f"p{j}_{i}" for j in range(n_parts)], [f"y{i}"], axis=0) for i in range(n_arrays)]
    inputs = [value_info(f"p{j}_{i}", elem, [f"r{j}", "kv_heads", "width", "head_dim"])
              for j in range(n_parts) for i in range(n_arrays)]
    outputs = [value_info(f"y{i}", elem, ["rows", "kv_heads", "width", "head_dim"]) for i in range(n_arrays)]
    return model(nodes, inputs, outputs, name="concat")


def head_graph(dtype) -> bytes:
    """logits [batch, positions, vocab] -> last [batch, vocab] (float32, the last position's) and best [batch]
    (int64, its argmax: the first of equal maxima, as numpy's)."""
    elem = ONNX_TYPES[np.dtype(dtype)]
    nodes = [node("Slice", ["logits", "minus_one", "int_max", "one"], ["sliced"]),
             node("Squeeze", ["sliced", "one"], ["squeezed"]),
             node("Cast", ["squeezed"], ["last"], to=FLOAT),
             node("ArgMax", ["last"], ["best"], axis=-1, keepdims=0)]
    initializers = [int64_tensor("minus_one", [-1]), int64_tensor("int_max", [2**63 - 1]), int64_tensor("one", [1])]
    return model(nodes, [value_info("logits", elem, ["batch", "positions", "vocab"])],
                 [value_info("last", FLOAT, ["batch", "vocab"]), value_info("best", INT64, ["batch"])],
                 initializers, name="head")


# -- the decoder graph, picking the positions whose logits it computes ----------------------------------------
LOGIT_POSITIONS = "logit_positions"
LOGITS_ARGMAX = "logits_argmax"
_PICKS_FROM = ("MatMul", "MatMulNBits")  # an LM head whose first input is the hidden states [batch, seq, hidden]


def picking_logits(model_bytes: bytes) -> bytes | None:
    """The decoder graph with one more input, ``logit_positions`` [batch, k, 1] (int64): the positions of each row
    whose logits it computes (logits [batch, k, vocab]). A GatherND (batch_dims 1) of the LM head's input picks
    them. And one more output, ``logits_argmax`` [batch, k] (int64): the argmax of those logits (the first of
    equal maxima, as numpy's). None where the graph's logits do not come straight from a MatMul or MatMulNBits,
    or its opset is older than GatherND's batch_dims (12).

    A prompt's step needs one position's logits: the LM head of a 49,152-token vocabulary over 8 prompts of 45
    tokens was 17% of the step, and its 70 MB of logits had to be written and read. A greedy step needs only
    their argmax: taken in the run, while the logits are still in the cache, it spares numpy's pass over them
    afterwards. (onnxruntime runs the ArgMax whether its output is bound or not: scoring every position pays a
    pass over the logits, small beside the LM head that made them.)"""
    try:
        return _with_logit_positions(memoryview(model_bytes))
    except (ValueError, IndexError, StopIteration, UnicodeDecodeError):  # a graph this cannot read is served as is
        return None


def _with_logit_positions(model: memoryview) -> bytes | None:
    if _default_opset(model) < 12:
        return None
    (start, end), graph_span = next((value, span) for f, value, span in message_fields(model) if f == MODEL_GRAPH)
    graph = model[start:end]
    heads = [(value, span) for f, value, span in message_fields(graph)
             if f == GRAPH_NODE and "logits" in _strings(graph[value[0]:value[1]], NODE_OUTPUT)]
    if len(heads) != 1:
        return None
    (node_start, node_end), head_span = heads[0]
    head = graph[node_start:node_end]
    if "".join(_strings(head, NODE_OP_TYPE)) not in _PICKS_FROM:
        return None
    hidden = _strings(head, NODE_INPUT)[0]
    picked = f"{hidden}/{LOGIT_POSITIONS}"
    first_input = next(span for f, _, span in message_fields(head) if f == NODE_INPUT)
    new_head = _spliced(head, first_input, _bytes(NODE_INPUT, picked))
    gather = node("GatherND", [hidden, LOGIT_POSITIONS], [picked], batch_dims=1)
    argmax = node("ArgMax", ["logits"], [LOGITS_ARGMAX], axis=-1, keepdims=0)
    nodes = b"".join(_bytes(GRAPH_NODE, n) for n in (gather + _bytes(NODE_NAME, "pick_logit_positions"), new_head,
                                                     argmax + _bytes(NODE_NAME, "logits_argmax")))
    added = (_bytes(GRAPH_INPUT, value_info(LOGIT_POSITIONS, INT64, ["batch_size", "picked", 1]))
             + _bytes(GRAPH_OUTPUT, value_info(LOGITS_ARGMAX, INT64, ["batch_size", "picked"])))
    # One copy of the model, whose weights may be inline: the new graph's pieces, joined once with the rest.
    graph_pieces = [graph[:head_span[0]], nodes, graph[head_span[1]:], added]
    header = _varint(MODEL_GRAPH << 3 | 2) + _varint(sum(len(piece) for piece in graph_pieces))
    return b"".join([model[:graph_span[0]], header, *graph_pieces, model[graph_span[1]:]])


def _default_opset(model: memoryview) -> int:
    """The model's version of the default ("" or "ai.onnx") operator set; 0 where it imports none."""
    for f, value, _ in message_fields(model):
        if f == MODEL_OPSET_IMPORT:
            opset = model[value[0]:value[1]]
            if "".join(_strings(opset, OPSET_DOMAIN)) in ("", "ai.onnx"):
                return next((version for g, version, _ in message_fields(opset) if g == OPSET_VERSION), 0)
    return 0


def _strings(message: memoryview, number: int) -> list[str]:
    """The values of a message's string field ``number``, in order."""
    return [bytes(message[v[0]:v[1]]).decode() for f, v, _ in message_fields(message) if f == number]


def _spliced(message: memoryview, span: tuple[int, int], new: bytes) -> bytes:
    """The message with the field at ``span`` replaced by ``new`` (encoded fields)."""
    return b"".join((message[:span[0]], new, message[span[1]:]))
