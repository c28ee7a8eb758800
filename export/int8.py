"""int8 conversion whose answers do not depend on what a text is batched with.

ONNX Runtime's dynamic quantization (``quantize_dynamic``) takes one activation scale over the
whole input tensor of each MatMul, padding rows and positions included, so a text's
probabilities moved with its batch-mates (alone vs batched: up to 0.22 on the fine-tuned
MiniLM). A server must give the same answer whatever the traffic, so both int8 forms here fix
every activation scale independently of the batch:

- **Calibrated** (``convert_to_int8_calibrated``): each MatMul by a weight becomes
  QuantizeLinear -> MatMulInteger -> Cast -> Mul, its input quantized with one scale
  calibrated on training texts (the 99.99th percentile of its absolute values) and its
  weights per output channel; the output stays float (no requantization, which is where
  QLinearMatMul lost accuracy). ORT runs its u8s8 integer GEMM: on MiniLM 2.0-2.1x fp32's
  texts/s, agreement with fp32 0.98-0.99.
- **Block-wise** (``convert_to_int8``): ``MatMulNBits`` with 8-bit weights (one scale per block
  of ``block_size`` along the reduction axis) at ``accuracy_level`` 4, whose CPU kernel
  quantizes each activation *row* block by block on the fly: no calibration data, agreement
  1.000 on MiniLM, but only 1.0-1.4x fp32 at serving batch sizes on this CPU.

The export gates try them in that order and keep the first that passes, batch invariance
included (blocks of 128 moved MiniLM's probabilities by 8e-3: that kernel is not row-local for
every batch shape, and the gate caught it). Only MatMuls by a weight become int8; the LSTM
cell, Gemm heads and embedding lookups stay fp32, which ``unquantized_op_types`` reports.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.fp16 import ort_transformers_path
from service.repo.graph import ATTENTION_MASK, INPUT_IDS
from service.repo.tokenization import pad_batch

#: ``MatMulNBits`` accuracy level 4: int8 activations (quantized per row and block), int32
#: accumulation. Lower levels dequantize the weights and multiply in fp32: no faster than fp32.
INT8_ACCURACY_LEVEL = 4
#: The default block of weights sharing one scale; finer blocks (32) are more accurate and
#: slower (docs/cpu-performance.md has the measurements).
DEFAULT_BLOCK_SIZE = 64
QUANTIZED_OP = "MatMulNBits"
#: Calibration: which percentile of an input's absolute values becomes its int8 range (the
#: maximum let rare outliers waste the range: agreement 0.977 against 0.984), and how many
#: sampled values per tensor and batch are kept to estimate it.
CALIBRATION_PERCENTILE = 99.99
_SAMPLES_PER_BATCH = 20_000
_CALIBRATION_BATCH = 8
# int8 activations as uint8 around 128: ORT's fastest integer GEMM on x86 is u8 x s8.
_ZERO_POINT = 128


def convert_to_int8(source: Path, target: Path, *, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Write a copy of ``source`` whose weight MatMuls are 8-bit ``MatMulNBits``; returns how
    many MatMuls were quantized (0: nothing to quantize, the copy is the fp32 graph)."""
    quantized = _blockwise(onnx.load(str(source)), block_size)
    _save_checked(quantized, target)
    return sum(node.op_type == QUANTIZED_OP for node in quantized.graph.node)


def _blockwise(model: onnx.ModelProto, block_size: int) -> onnx.ModelProto:
    """``model`` with every MatMul by a weight as 8-bit ``MatMulNBits``."""
    # The dynamo exporter's value_info hints disagree with ONNX shape inference on some weight
    # shapes (the LSTM's), and the quantizer re-runs inference: drop the hints, it redoes them.
    del model.graph.value_info[:]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every node at INFO, at the root logger
    try:
        with ort_transformers_path():
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block_size,
                                             is_symmetric=True,
                                             accuracy_level=INT8_ACCURACY_LEVEL)
            quantizer.process()
    finally:
        root.setLevel(level)
    return quantizer.model.model


def convert_to_int8_calibrated(source: Path, target: Path, calibration: list[list[int]], *,
                               pad_id: int = 0, attention_blockwise: bool = False,
                               percentile: float = CALIBRATION_PERCENTILE) -> int:
    """Write a copy of ``source`` whose weight MatMuls are int8 with activation scales
    calibrated on ``calibration`` (token ids of training texts, never the evaluation set);
    returns how many MatMuls were quantized. ``attention_blockwise``: the query, key and value
    projections, whose errors attention's softmax amplifies (agreement on MiniLM 0.976 with
    them calibrated, 0.99 without), are block-wise int8 instead."""
    model = onnx.load(str(source))
    weights = {init.name: init for init in model.graph.initializer}
    targets = [node for node in model.graph.node if _by_weight(node, weights)]
    if attention_blockwise:
        feeds_attention = _attention_feeders(model.graph)
        targets = [node for node in targets if not feeds_attention(node)]
    if not targets or not calibration:
        return 0
    ranges = _activation_ranges(model, sorted({n.input[0] for n in targets}), calibration,
                                pad_id, percentile)
    _rewrite_calibrated(model, targets, weights, ranges)
    blockwise = 0
    if attention_blockwise:
        model = _blockwise(model, DEFAULT_BLOCK_SIZE)
        blockwise = sum(node.op_type == QUANTIZED_OP for node in model.graph.node)
    _save_checked(model, target)
    return len(targets) + blockwise


# Ops a projection's output passes through on its way into attention (bias, head split).
_PASS_THROUGH = {"Add", "Mul", "Div", "Reshape", "Transpose", "Split", "Slice", "Squeeze",
                 "Unsqueeze", "Cast"}
_ATTENTION_OPS = {"MultiHeadAttention", "Attention", "Softmax"}


def _attention_feeders(graph: onnx.GraphProto,
                       depth: int = 4) -> Callable[[onnx.NodeProto], bool]:
    """A test of whether a node's output reaches attention within ``depth`` steps through
    pass-through ops: a fused attention op, or a MatMul of two activations (scores, or
    probabilities x values). The graph's consumers are indexed once for every node asked."""
    constants = {init.name for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for candidate in graph.node:
        for name in candidate.input:
            consumers.setdefault(name, []).append(candidate)

    def feeds_attention(node: onnx.NodeProto) -> bool:
        frontier = list(node.output)
        for _ in range(depth):
            following = []
            for name in frontier:
                for consumer in consumers.get(name, []):
                    if consumer.op_type in _ATTENTION_OPS or (
                            consumer.op_type == "MatMul"
                            and not constants & set(consumer.input)):
                        return True
                    if consumer.op_type in _PASS_THROUGH:
                        following += list(consumer.output)
            frontier = following
        return False

    return feeds_attention


def _by_weight(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> bool:
    weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
    return weight is not None and len(weight.dims) == 2 and weight.data_type == TensorProto.FLOAT


def _activation_ranges(model: onnx.ModelProto, inputs: list[str],
                       calibration: list[list[int]], pad_id: int,
                       percentile: float) -> dict[str, float]:
    """The ``percentile`` of each tensor's absolute values over the real (not padding)
    positions of the calibration texts, run in fp32."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in inputs:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    samples: dict[str, list[np.ndarray]] = {name: [] for name in inputs}
    for start in range(0, len(calibration), _CALIBRATION_BATCH):
        batch = pad_batch(calibration[start:start + _CALIBRATION_BATCH], pad_id=pad_id)
        real = batch.attention_mask.astype(bool)
        outputs = session.run(inputs, {INPUT_IDS: batch.input_ids,
                                       ATTENTION_MASK: batch.attention_mask})
        for name, value in zip(inputs, outputs, strict=True):
            values = np.abs(value[real] if value.shape[:2] == real.shape else value).ravel()
            if values.size > _SAMPLES_PER_BATCH:
                values = rng.choice(values, _SAMPLES_PER_BATCH, replace=False)
            samples[name].append(values)
    return {name: float(np.percentile(np.concatenate(parts), percentile))
            for name, parts in samples.items()}


def _rewrite_calibrated(model: onnx.ModelProto, targets: list[onnx.NodeProto],
                        weights: dict[str, onnx.TensorProto], ranges: dict[str, float]) -> None:
    graph = model.graph
    zero_point = "int8_zero_point"
    graph.initializer.append(numpy_helper.from_array(np.array(_ZERO_POINT, np.uint8),
                                                     zero_point))
    quantized_inputs: dict[str, str] = {}  # one QuantizeLinear per input, shared by its MatMuls
    nodes: list[onnx.NodeProto] = []
    chosen = {id(node) for node in targets}
    for index, node in enumerate(graph.node):
        if id(node) not in chosen:
            nodes.append(node)
            continue
        source, prefix = node.input[0], f"int8_{index}"
        input_scale = max(ranges[source], 1e-8) / 127.0
        if source not in quantized_inputs:
            quantized_inputs[source] = f"{prefix}_input"
            graph.initializer.append(numpy_helper.from_array(
                np.array(input_scale, np.float32), f"{prefix}_input_scale"))
            nodes.append(helper.make_node("QuantizeLinear",
                                          [source, f"{prefix}_input_scale", zero_point],
                                          [quantized_inputs[source]]))
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        weight_scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127.0
        graph.initializer.extend([
            numpy_helper.from_array(np.clip(np.round(weight / weight_scale), -127, 127)
                                    .astype(np.int8), f"{prefix}_weight"),
            numpy_helper.from_array((weight_scale * input_scale).astype(np.float32),
                                    f"{prefix}_output_scale")])
        nodes += [
            helper.make_node("MatMulInteger", [quantized_inputs[source], f"{prefix}_weight",
                                               zero_point], [f"{prefix}_int32"]),
            helper.make_node("Cast", [f"{prefix}_int32"], [f"{prefix}_float"],
                             to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{prefix}_float", f"{prefix}_output_scale"],
                             [node.output[0]])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]


def _save_checked(model: onnx.ModelProto, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staged = Path(scratch) / target.name
        onnx.save(model, str(staged))
        onnx.checker.check_model(str(staged), full_check=True)
        staged.replace(target)


def unquantized_op_types(quantized: Path) -> list[str]:
    """Op types of the weight-bearing compute ops (a MatMul by a weight, an embedding lookup,
    an LSTM cell, a Gemm head) that stayed in float in ``quantized``; products of two
    activations (attention scores) have no weight and are not counted."""
    model = onnx.load(str(quantized))
    weights = {initializer.name for initializer in model.graph.initializer
               if initializer.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    compute = {"MatMul", "Gemm", "LSTM", "Gather", "Attention", "Conv"}
    return sorted({node.op_type for node in model.graph.node
                   if node.op_type in compute and weights & set(node.input)})
