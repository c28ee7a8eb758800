"""fp16 conversion with ONNX Runtime's float16 tooling.

onnxconverter-common 1.16.0 writes models that fail to load (mismatched Cast types, its issue
#320); ``onnxruntime.transformers.float16`` works for every architecture here. Inputs and
outputs keep their types (``keep_io_types``) so clients and the server never see fp16 tensors.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import onnx


@contextlib.contextmanager
def ort_transformers_path() -> Iterator[None]:
    """``onnxruntime.transformers`` appends its own directory to ``sys.path`` on import (its
    modules import each other as top-level names), and that directory holds a ``models`` folder
    which would shadow this project's ``models`` package. Inside this block its tools work;
    afterwards ``sys.path`` is as it was."""
    import onnxruntime

    saved = list(sys.path)
    sys.path.append(str(Path(onnxruntime.__file__).parent / "transformers"))
    try:
        yield
    finally:
        sys.path[:] = saved


def _float16_tooling() -> ModuleType:
    with ort_transformers_path():
        from onnxruntime.transformers import float16
    # It logs every initializer shared by fp32 and fp16 nodes at INFO: noise for these models.
    logging.getLogger(float16.__name__).setLevel(logging.WARNING)
    return float16


def convert_to_fp16(source: Path, target: Path, *, fp32_op_types: list[str] | None = None) -> None:
    """Write an fp16 copy of ``source``; ``fp32_op_types`` are kept in fp32 (mixed precision)."""
    float16 = _float16_tooling()
    model = onnx.load(str(source))
    block_list = list(float16.DEFAULT_OP_BLOCK_LIST) + list(fp32_op_types or [])
    converted = float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=block_list
    )
    drop_duplicate_casts(converted.graph)
    sort_topologically(converted.graph)
    # With blocked ops the tool leaves some intermediate value_info entries typed as before
    # the Casts it inserted; they are only hints, so drop them and let inference redo them.
    del converted.graph.value_info[:]
    onnx.checker.check_model(converted, full_check=True)
    onnx.save(converted, str(target))


def drop_duplicate_casts(graph: onnx.GraphProto) -> None:
    """When one value feeds several blocked nodes, the tool inserts the same Cast once per
    consumer, each writing the same output name, which breaks single assignment. The copies
    are identical, so keep the first."""
    first_producer: dict[str, onnx.NodeProto] = {}
    kept = []
    for node in graph.node:
        duplicate = next((first_producer[o] for o in node.output if o in first_producer), None)
        if duplicate is not None and node.op_type == "Cast" and (
            node.input == duplicate.input and node.attribute == duplicate.attribute
        ):
            continue
        first_producer.update({output: node for output in node.output})
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _names_used(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, including values its subgraphs (If/Loop bodies) read from outside."""
    used = set(node.input)
    for attribute in node.attribute:
        for graph in [attribute.g, *attribute.graphs]:
            for inner in graph.node:
                used |= _names_used(inner)
    return used


def sort_topologically(graph: onnx.GraphProto) -> None:
    """The float16 tool appends the Cast nodes it adds around blocked ops at the end of the
    graph; ONNX Runtime reorders them itself, but the ONNX checker (rightly) wants producers
    first. A stable Kahn sort keeps the original order wherever it was already valid."""
    producer = {output: index for index, node in enumerate(graph.node) for output in node.output}
    nodes = list(graph.node)
    dependencies = [
        {producer[name] for name in _names_used(node) if name in producer} - {index}
        for index, node in enumerate(nodes)
    ]
    emitted: set[int] = set()
    order: list[int] = []
    while len(order) < len(nodes):
        ready = [i for i in range(len(nodes)) if i not in emitted and dependencies[i] <= emitted]
        if not ready:
            raise ValueError("the converted graph has a cycle")
        order.extend(ready)
        emitted.update(ready)
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
