"""Running an exported ONNX model over token ids with ONNX Runtime, for the export gates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.repo.graph import open_session, run_logits, session_options
from service.repo.probabilities import softmax
from service.repo.tokenization import pad_batch

EVAL_BATCH_SIZE = 64


def cpu_session(path: Path, *, threads: int | None = None) -> ort.InferenceSession:
    return open_session(path, session_options(intra_op_threads=threads or 0, log_severity=3))


def predict_probabilities(session: ort.InferenceSession, ids: list[list[int]],
                          batch_size: int = EVAL_BATCH_SIZE, pad_id: int = 0) -> np.ndarray:
    """Probabilities for each row of ``ids``, in order; batches are formed by length."""
    order = np.argsort([len(row) for row in ids], kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = pad_batch([ids[i] for i in rows], pad_id=pad_id)
        probabilities = softmax(run_logits(session, batch.input_ids, batch.attention_mask))
        if out is None:
            out = np.empty((len(ids), probabilities.shape[1]), dtype=np.float32)
        out[rows] = probabilities
    assert out is not None, "no rows to predict"
    return out
