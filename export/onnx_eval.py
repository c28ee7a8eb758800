"""Running an exported ONNX model over token ids with ONNX Runtime, for the export gates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.probabilities import softmax
from service.tokenization import pad_batch

EVAL_BATCH_SIZE = 64


def cpu_session(path: Path, *, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # The extended level avoids a segfault seen creating optimised fp16 Transformer sessions on
    # CPU at the default (all) level; see DESIGN.md, ORT issue #28392.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_logits(session: ort.InferenceSession, input_ids: np.ndarray,
               attention_mask: np.ndarray) -> np.ndarray:
    (logits,) = session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})
    return np.asarray(logits, dtype=np.float32)


def predict_probabilities(session: ort.InferenceSession, ids: list[list[int]],
                          batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    """Probabilities for each row of ``ids``, in order; batches are formed by length."""
    order = np.argsort([len(row) for row in ids], kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = pad_batch([ids[i] for i in rows])
        probabilities = softmax(run_logits(session, batch.input_ids, batch.attention_mask))
        if out is None:
            out = np.empty((len(ids), probabilities.shape[1]), dtype=np.float32)
        out[rows] = probabilities
    assert out is not None, "no rows to predict"
    return out
