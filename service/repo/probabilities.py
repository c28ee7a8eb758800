"""Logits to probabilities: one softmax for serving, the export gates and the benchmark, so
that what the gates compare is exactly what the server returns."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis, shifted by the row maximum so exp never overflows;
    float32 out whatever comes in (fp16 graphs still return fp32 logits, but be safe)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
