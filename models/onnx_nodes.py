"""The nodes of an ONNX graph (op type, domain, inputs, integer attributes), read straight from its protobuf.

The service checks what a downloaded graph is made of (its attention operator, its MatMulNBits settings)
before serving it, and it does not ship the ``onnx`` package: the few fields needed are read from the
protobuf wire format here. Weights are skipped by length, never decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Field numbers in onnx.proto
MODEL_GRAPH, MODEL_OPSET_IMPORT = 7, 8
GRAPH_NODE, GRAPH_INPUT, GRAPH_OUTPUT = 1, 11, 12
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 1, 2, 3, 4, 5, 7
OPSET_DOMAIN, OPSET_VERSION = 1, 2
ATTRIBUTE_NAME, ATTRIBUTE_INT = 1, 3
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Node:
    op_type: str
    domain: str = ""
    inputs: tuple[str, ...] = ()
    ints: dict[str, int] = field(default_factory=dict)  # the node's integer attributes by name


def graph_nodes(path: Path) -> list[Node]:
    """The top-level nodes of the graph in an ``.onnx`` file (subgraphs of If/Loop are not visited)."""
    data = memoryview(Path(path).read_bytes())
    try:
        span = next((v for f, v, _ in message_fields(data) if f == MODEL_GRAPH), None)
        if span is None:
            raise ValueError("no graph")
        graph = data[span[0]:span[1]]
        return [_node(graph[start:end]) for f, (start, end), _ in message_fields(graph) if f == GRAPH_NODE]
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable ONNX model ({exc})") from None


def _node(data: memoryview) -> Node:
    op_type, domain, inputs, ints = "", "", [], {}
    for f, value, _ in message_fields(data):
        if f == NODE_OP_TYPE:
            op_type = _text(data, value)
        elif f == NODE_DOMAIN:
            domain = _text(data, value)
        elif f == NODE_INPUT:
            inputs.append(_text(data, value))
        elif f == NODE_ATTRIBUTE:
            name, number = _int_attribute(data[value[0]:value[1]])
            if number is not None:
                ints[name] = number
    return Node(op_type, domain, tuple(inputs), ints)


def _int_attribute(data: memoryview) -> tuple[str, int | None]:
    name, number = "", None
    for f, value, _ in message_fields(data):
        if f == ATTRIBUTE_NAME:
            name = _text(data, value)
        elif f == ATTRIBUTE_INT:
            number = value - (1 << 64) if value >= 1 << 63 else value  # int64 as two's complement
    return name, number


def message_fields(data: memoryview):
    """(field number, value, span) of each field of one message: the value an int for varints, (start, end) for
    byte strings, None for fixed-size numbers; the span (start, end) of the whole field, key included, for a
    writer that copies fields it does not change."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _varint(data, pos)
        elif wire == LENGTH_DELIMITED:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated")
            value, pos = (pos, pos + size), pos + size
        elif wire in (FIXED64, FIXED32):
            value, pos = None, pos + (8 if wire == FIXED64 else 4)
        else:
            raise ValueError(f"unknown wire type {wire}")
        yield number, value, (start, pos)


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _text(data: memoryview, span: tuple[int, int]) -> str:
    return bytes(data[span[0]:span[1]]).decode("utf-8")
