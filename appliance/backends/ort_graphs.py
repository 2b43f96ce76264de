"""Small helper graphs that keep the ONNX backend's KV cache and logits where the model runs (a GPU, or the CPU).

The decoder graph leaves its present (the KV cache) and logits on its device. What the step loop does to them
between steps runs as ONNX graphs on the same execution provider, so nothing crosses to the host but the chosen
tokens (and the last position's logits, only when a sequence samples other than greedily):

- ``window``: rows of a batch's per-layer cache arrays, a window of positions, left-padded with zeros (re-packing a
  batch when sequences join or leave it, or detaching one slot's cache from its batch);
- ``concat``: several such windows stacked into one batch;
- ``head``: the last position's logits (as float32) and their argmax.

And one change to the decoder graph itself, ``picking_logits``: an input that names the positions whose logits
it computes, so a prompt's step runs the LM head for its last position, not for all of them.

The service has no ``onnx`` package (only onnxruntime), so the graphs are written and changed here as protobuf
bytes: the few ONNX message fields they need, by their field numbers in onnx.proto.
"""

from __future__ import annotations

import struct

import numpy as np

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


def _read_varint(data, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(data) -> list[tuple[int, object, memoryview]]:
    """A message's fields in order: (number, value, encoding). The value is an int for a varint, a memoryview of
    the payload for a length-delimited field (no copy: a graph may hold its weights inline)."""
    data, out, i = memoryview(data), [], 0
    while i < len(data):
        start = i
        key, i = _read_varint(data, i)
        wire = key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 2:
            size, i = _read_varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire} in an ONNX model")
        out.append((key >> 3, value, data[start:i]))
    return out


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
_PICKS_FROM = (b"MatMul", b"MatMulNBits")  # an LM head whose first input is the hidden states [batch, seq, hidden]


def picking_logits(model_bytes: bytes) -> bytes | None:
    """The decoder graph with one more input, ``logit_positions`` [batch, k, 1] (int64): the positions of each row
    whose logits it computes (logits [batch, k, vocab]). A GatherND (batch_dims 1) of the LM head's input picks
    them. None where the graph's logits do not come straight from a MatMul or MatMulNBits, or its opset is older
    than GatherND's batch_dims (12).

    A prompt's step needs one position's logits: the LM head of a 49,152-token vocabulary over 8 prompts of 45
    tokens was 17% of the step, and its 70 MB of logits had to be written and read."""
    model = _fields(model_bytes)
    opsets = [_fields(v) for f, v, _ in model if f == 8]
    default = [dict((k, val) for k, val, _ in o) for o in opsets if not any(k == 1 and bytes(val) for k, val, _ in o)]
    if not default or default[0].get(2, 0) < 12:
        return None
    graph_at = next(i for i, (f, _, _) in enumerate(model) if f == 7)
    graph = _fields(model[graph_at][1])
    heads = [(i, node_fields) for i, node_fields in ((i, _fields(v)) for i, (f, v, _) in enumerate(graph) if f == 1)
             if any(f == 2 and bytes(v) == b"logits" for f, v, _ in node_fields)]
    if len(heads) != 1:
        return None
    at, head = heads[0]
    if bytes(next((v for f, v, _ in head if f == 4), b"")) not in _PICKS_FROM:
        return None
    first = next(i for i, (f, _, _) in enumerate(head) if f == 1)
    hidden = bytes(head[first][1]).decode()
    picked = f"{hidden}/{LOGIT_POSITIONS}"
    new_head = b"".join(_bytes(1, picked) if i == first else raw for i, (_, _, raw) in enumerate(head))
    gather = node("GatherND", [hidden, LOGIT_POSITIONS], [picked], batch_dims=1) + _bytes(3, "pick_logit_positions")
    parts = []
    for i, (_, _, raw) in enumerate(graph):
        parts += [_bytes(1, gather), _bytes(1, new_head)] if i == at else [raw]
    parts.append(_bytes(11, value_info(LOGIT_POSITIONS, INT64, ["batch_size", "picked", 1])))
    new_graph = b"".join(parts)
    return b"".join(_bytes(7, new_graph) if i == graph_at else raw for i, (_, _, raw) in enumerate(model))
