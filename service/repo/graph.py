"""The ONNX graph contract every architecture is exported to, and the one way to run it.

Inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, sequence]``, right-padded with the
tokenizer's pad id), output ``logits`` (float32 ``[batch, labels]``). The exporter writes it, its
gates check it, the manifest records it, and the server refuses a graph or manifest that says
otherwise. Every caller opens sessions and runs them through here, so the names live in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
INPUT_NAMES = (INPUT_IDS, ATTENTION_MASK)
OUTPUT_NAME = "logits"
OUTPUT_NAMES = (OUTPUT_NAME,)
#: Symbolic dimension names the exporter gives the axes.
BATCH_DIM, SEQUENCE_DIM = "batch", "sequence"
#: The opset the exporter writes (DESIGN.md: dynamo exporter facts were learned at 18).
DEFAULT_OPSET = 18
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# The extended level avoids a segfault seen creating optimised fp16 Transformer sessions on CPU
# at the default (all) level (DESIGN.md, ORT issue #28392).
DEFAULT_OPTIMIZATION = "extended"


class GraphContractError(ValueError):
    """A graph whose inputs or outputs are not the contract's; the message is one line."""


class Runnable(Protocol):
    """What an ONNX Runtime session offers that this module uses (tests pass fakes)."""

    def get_inputs(self) -> list[Any]: ...
    def get_outputs(self) -> list[Any]: ...
    def run(self, output_names: Sequence[str], feed: dict[str, np.ndarray]) -> list[Any]: ...


def session_options(*, intra_op_threads: int = 0, inter_op_threads: int = 0,
                    optimization: str = DEFAULT_OPTIMIZATION, allow_spinning: bool = True,
                    log_severity: int | None = None) -> ort.SessionOptions:
    """Session options; 0 threads means ONNX Runtime's default (one per core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[optimization]
    spinning = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    if log_severity is not None:
        options.log_severity_level = log_severity
    return options


def open_session(path: Path | str, options: ort.SessionOptions | None = None,
                 providers: Sequence[Any] = (CPU_PROVIDER,)) -> ort.InferenceSession:
    """An ONNX Runtime session on ``path``; on CPU unless ``providers`` say otherwise."""
    if options is None:
        options = session_options(log_severity=3)
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def check_signature(session: Runnable) -> None:
    """Raises ``GraphContractError`` unless the graph takes exactly the contract's inputs
    (int64) and gives its output."""
    inputs = {i.name: i.type for i in session.get_inputs()}
    if sorted(inputs) != sorted(INPUT_NAMES):
        raise GraphContractError(f"graph inputs are {sorted(inputs)}, expected "
                                 f"{list(INPUT_NAMES)}")
    wrong = [name for name, kind in inputs.items() if kind != "tensor(int64)"]
    if wrong:
        raise GraphContractError(f"graph inputs {wrong} are not int64 ({inputs[wrong[0]]})")
    outputs = [o.name for o in session.get_outputs()]
    if OUTPUT_NAME not in outputs:
        raise GraphContractError(f"graph outputs are {outputs}, expected {OUTPUT_NAME!r}")


def feed(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    return {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask}


def run_logits(session: Runnable, input_ids: np.ndarray, attention_mask: np.ndarray
               ) -> np.ndarray:
    """Logits as float32 ``[batch, labels]``, whatever precision the graph computes in."""
    (logits,) = session.run(list(OUTPUT_NAMES), feed(input_ids, attention_mask))
    return np.asarray(logits, dtype=np.float32)
