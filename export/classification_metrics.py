"""Accuracy, macro-F1, per-class report and confusion matrix, in numpy (no torch, no sklearn)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ClassReport:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ClassificationReport:
    examples: int
    accuracy: float
    macro_f1: float
    per_class: list[ClassReport]
    confusion_matrix: list[list[int]]  # rows: true label, columns: predicted label

    def to_dict(self) -> dict:
        return asdict(self)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]
) -> ClassificationReport:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError("y_true and y_pred must be non-empty and of equal length")
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    true_positives = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1)
    # A class never predicted (or absent) scores 0 rather than NaN, as scikit-learn's default does.
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives),
                          where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives),
                       where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator),
                   where=denominator > 0)
    per_class = [
        ClassReport(label, float(p), float(r), float(f), int(s))
        for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
    ]
    return ClassificationReport(
        examples=int(y_true.size),
        accuracy=float((y_true == y_pred).mean()),
        macro_f1=float(f1.mean()),
        per_class=per_class,
        confusion_matrix=matrix.tolist(),
    )
