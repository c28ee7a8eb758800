"""What one token costs a model, counted from its ONNX graph: multiply-adds by weights.

The server gives a model every core when its per-text compute dwarfs the per-call work of the
event loop, and keeps one core for the loop otherwise (``service/server/threads.py``). The
count is the weights a token passes through (MatMul and Gemm by a weight, the LSTM's input and
recurrent matrices, fused Attention's projections); the activation x activation products of
attention grow with the length and are left out, which undercounts long documents only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import onnx

# Ops whose weight input is [K, N] (MatMul: B; Gemm: B, possibly transposed: same product).
_DENSE = {"MatMul", "Gemm", "MatMulInteger", "Attention"}
# Recurrent ops: W [directions, gates x hidden, input], R [directions, gates x hidden, hidden].
_RECURRENT = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}


def weight_flops_per_token(model: onnx.ModelProto) -> int:
    """2 x the multiply-adds by weights one token costs (a batch's cost is this times its
    real tokens, plus padding for the LSTM and attention)."""
    constant = _constant_tensors(model.graph)
    shapes = _static_shapes(model)
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {a.name: a.i for a in node.attribute}
            total += attributes.get("K", 0) * attributes.get("N", 0)
        elif node.op_type in _DENSE:
            total += _product(node.input[1:2], constant, shapes, last=2)
        elif node.op_type in _RECURRENT:
            total += _product(node.input[1:3], constant, shapes)  # W and R
    return 2 * total


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Initializers, Constant outputs, and what nodes compute from those alone (the exporter
    reshapes and transposes weights inside the graph)."""
    constant = {init.name for init in graph.initializer}
    for node in graph.node:  # nodes are in topological order
        if node.op_type == "Constant" or (node.input and all(
                name in constant for name in node.input if name)):
            constant.update(node.output)
    return constant


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    for value in inferred.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def _product(names: Iterable[str], constant: set[str], shapes: dict[str, list[int]], *,
             last: int | None = None) -> int:
    total = 0
    for name in names:
        if name in constant and name in shapes and len(shapes[name]) >= (last or 1):
            total += math.prod(shapes[name][-last:] if last else shapes[name])
    return total
