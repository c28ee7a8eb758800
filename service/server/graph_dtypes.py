"""Which nodes of an ONNX file work on floating-point data, read without the ``onnx`` package.

Node placement (``placement.py``) must tell ORT's shape arithmetic (an int64 ``Gather`` on the
output of ``Shape``, kept on CPU on purpose) from the model's own work (the embedding
``Gather`` over a float table). The serving install has no ``onnx`` package, and the fp16
converter drops the graph's ``value_info``, so this module reads the few fields of the protobuf
wire format it needs and propagates element types through the nodes, which ONNX stores in
topological order. A node whose types cannot be told is left out, never guessed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# onnx.TensorProto.DataType values.
FLOAT, UINT8, INT32, INT64, BOOL = 1, 2, 6, 7, 9
FLOAT_TYPES = frozenset({1, 10, 11, 16, 17, 18, 19, 20, 23})  # float, half, double, bf16, fp8s, fp4

# Field numbers of onnx.proto3.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO = 1, 5, 11, 12, 13
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 1, 2, 3, 4, 5
_ATTR_NAME, _ATTR_F, _ATTR_I, _ATTR_T, _ATTR_FLOATS, _ATTR_INTS = 1, 2, 3, 5, 7, 8
_TENSOR_DATA_TYPE, _TENSOR_NAME = 2, 8
_VALUE_NAME, _VALUE_TYPE, _TYPE_TENSOR, _TENSOR_TYPE_ELEM = 1, 2, 1, 1

_BOOLEAN_OPS = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not",
                          "And", "Or", "Xor", "IsNaN", "IsInf"})
_INT64_OPS = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})


class WireFormatError(ValueError):
    """Bytes that are not a protobuf message this reader understands."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise WireFormatError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value): ints for varint fields, memoryviews for length-delimited ones."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise WireFormatError("truncated field")
            yield number, data[pos:pos + length]
            pos += length
        elif wire_type in (1, 5):  # fixed 64 / 32 bits: floats here, never needed
            pos += 8 if wire_type == 1 else 4
        else:
            raise WireFormatError(f"unsupported wire type {wire_type}")


def _text(value: int | memoryview) -> str:
    return bytes(value).decode("utf-8", "replace") if isinstance(value, memoryview) else ""


@dataclass
class GraphNode:
    name: str
    op_type: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    attributes: dict[str, int] = field(default_factory=dict)  # element types only: to, value


def _tensor_type(data: memoryview) -> tuple[str, int]:
    name, elem = "", 0
    for number, value in _fields(data):
        if number == _TENSOR_NAME:
            name = _text(value)
        elif number == _TENSOR_DATA_TYPE and isinstance(value, int):
            elem = value
    return name, elem


def _value_info_type(data: memoryview) -> tuple[str, int]:
    name, elem = "", 0
    for number, value in _fields(data):
        if number == _VALUE_NAME:
            name = _text(value)
        elif number == _VALUE_TYPE and isinstance(value, memoryview):
            for type_number, tensor in _fields(value):
                if type_number == _TYPE_TENSOR and isinstance(tensor, memoryview):
                    for elem_number, elem_value in _fields(tensor):
                        if elem_number == _TENSOR_TYPE_ELEM and isinstance(elem_value, int):
                            elem = elem_value
    return name, elem


def _node(data: memoryview) -> GraphNode:
    node = GraphNode("", "")
    for number, value in _fields(data):
        if number == _NODE_INPUT:
            node.inputs.append(_text(value))
        elif number == _NODE_OUTPUT:
            node.outputs.append(_text(value))
        elif number == _NODE_NAME:
            node.name = _text(value)
        elif number == _NODE_OP_TYPE:
            node.op_type = _text(value)
        elif number == _NODE_ATTRIBUTE and isinstance(value, memoryview):
            _attribute(value, node.attributes)
    return node


def _attribute(data: memoryview, into: dict[str, int]) -> None:
    """Keeps the element type an attribute fixes: Cast's ``to``, Constant's ``value``."""
    name, elem = "", 0
    for number, value in _fields(data):
        if number == _ATTR_NAME:
            name = _text(value)
        elif number == _ATTR_I and isinstance(value, int):
            elem = value
        elif number == _ATTR_T and isinstance(value, memoryview):
            elem = _tensor_type(value)[1]
        elif number in (_ATTR_F, _ATTR_FLOATS):
            elem = FLOAT
        elif number == _ATTR_INTS:
            elem = INT64
    if name in ("to", "value", "value_float", "value_floats", "value_int", "value_ints"):
        into["value" if name.startswith("value") else name] = elem


@dataclass
class GraphTypes:
    nodes: dict[str, GraphNode]
    types: dict[str, int]  # value name -> element type, where known

    def touches_float(self, node_name: str, *, data_input_only: bool = False) -> bool | None:
        """Whether the node reads or writes floating-point data; None when its types are not
        known (or no such node). ``data_input_only``: judge by the first input alone (Gather's
        table, a Reduce's operand), not by indices or axes."""
        node = self.nodes.get(node_name)
        if node is None:
            return None
        names = node.inputs[:1] if data_input_only else [*node.inputs, *node.outputs]
        known = [self.types[n] for n in names if n and n in self.types]
        if not known:
            return None
        return any(t in FLOAT_TYPES for t in known)


def _output_types(node: GraphNode, types: dict[str, int]) -> list[int]:
    def input_type(index: int) -> int:
        return types.get(node.inputs[index], 0) if index < len(node.inputs) else 0

    op = node.op_type
    if op in ("Cast",):
        return [node.attributes.get("to", 0)]
    if op == "CastLike":
        return [input_type(1)]
    if op == "Constant":
        return [node.attributes.get("value", 0)]
    if op == "ConstantOfShape":
        return [node.attributes.get("value", FLOAT)]  # ONNX's default value is float 0
    if op in _INT64_OPS:
        return [INT64]
    if op in _BOOLEAN_OPS:
        return [BOOL]
    if op == "Where":
        return [input_type(1)]
    if op == "DynamicQuantizeLinear":
        return [UINT8, FLOAT, UINT8]
    if op == "QuantizeLinear":
        return [input_type(2) or UINT8]
    if op == "DequantizeLinear":
        return [input_type(1)]
    if op in ("MatMulInteger", "ConvInteger"):
        return [INT32]
    if op == "TopK":
        return [input_type(0), INT64]
    first_known = next((types[i] for i in node.inputs if i in types), 0)
    return [first_known] * len(node.outputs)


def read_graph_types(path: Path | str) -> GraphTypes:
    """Nodes and the element type of every value that can be told, from the model file."""
    model = memoryview(Path(path).read_bytes())
    graph = next((v for n, v in _fields(model) if n == _MODEL_GRAPH
                  and isinstance(v, memoryview)), None)
    if graph is None:
        raise WireFormatError(f"{path}: no graph")
    types: dict[str, int] = {}
    ordered: list[GraphNode] = []
    for number, value in _fields(graph):
        if not isinstance(value, memoryview):
            continue
        if number == _GRAPH_NODE:
            ordered.append(_node(value))
        elif number == _GRAPH_INITIALIZER:
            name, elem = _tensor_type(value)
            types[name] = elem
        elif number in (_GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO):
            name, elem = _value_info_type(value)
            if elem:
                types[name] = elem
    for node in ordered:
        for output, elem in zip(node.outputs, _output_types(node, types), strict=False):
            if output and elem and output not in types:
                types[output] = elem
    return GraphTypes({node.name: node for node in ordered if node.name}, types)
