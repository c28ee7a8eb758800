"""The export gates: what an exported model must show before it is published.

Parity: ONNX Runtime fp32 gives the same probabilities as PyTorch, including under heavy padding.
Precision: the fp16 and int8 artifacts predict like fp32 on the whole evaluation set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from service.repo.graph import run_logits
from service.repo.probabilities import softmax
from service.repo.tokenization import pad_batch

PARITY_BATCH_SIZES = (1, 7, 32)


class GateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parity_tolerance: float = Field(default=1e-4, gt=0,
                                    description="max abs difference of probabilities")
    fp16_min_agreement: float = Field(default=0.995, ge=0, le=1)
    fp16_max_accuracy_drop: float = Field(default=0.005, ge=0, le=1,
                                          description="fraction, 0.005 = 0.5 points")
    # Gate-failing fp16 conversions are retried with these op types kept in fp32: the LSTM's
    # gates and the normalisations are where half precision loses most.
    mixed_precision_fp32_ops: list[str] = Field(
        default_factory=lambda: ["LSTM", "Softmax", "LayerNormalization", "ReduceMean", "Exp",
                                 "Pow", "Sqrt", "Div"]
    )
    # Dynamic int8 quantization (weights int8, activations quantized per batch) loses more than
    # fp16, so its bar is lower; it is an optional speed-up that is never served by default.
    int8_min_agreement: float = Field(default=0.98, ge=0, le=1)
    int8_max_accuracy_drop: float = Field(default=0.01, ge=0, le=1,
                                          description="fraction, 0.01 = 1 point")
    # A gate-failing int8 conversion is retried quantizing only these (the large matrix
    # products), leaving the LSTM cell and the embedding lookups in fp32.
    int8_retry_op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm"])

    def thresholds(self, precision: str) -> tuple[float, float]:
        """(minimum agreement with fp32, maximum accuracy drop) for a lower precision."""
        if precision == "int8":
            return self.int8_min_agreement, self.int8_max_accuracy_drop
        return self.fp16_min_agreement, self.fp16_max_accuracy_drop


class GateFailure(Exception):
    """A gate refused the export. ``report`` holds every figure measured so far."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ParityResult:
    max_abs_diff: float
    worst_case: str
    batch_sizes: list[int]
    checked_rows: int


def parity_batches(ids: list[list[int]], batch_sizes=PARITY_BATCH_SIZES) -> list[list[list[int]]]:
    """Batches of real texts at each size; the larger ones mix the shortest and longest texts so
    lengths differ by ~10× or more and most positions are padding."""
    by_length = sorted(ids, key=len)
    batches = []
    for size in batch_sizes:
        size = min(size, len(by_length))
        half = size // 2
        batch = by_length[:half] + by_length[len(by_length) - (size - half):]
        batches.append(batch)
    # A batch of only short texts and one of only long ones too: both padding extremes.
    batches.append(by_length[: min(32, len(by_length))])
    batches.append(by_length[-min(32, len(by_length)):])
    return batches


def check_parity(torch_logits_fn, session: ort.InferenceSession, ids: list[list[int]],
                 tolerance: float, *, pad_id: int = 0) -> ParityResult:
    """``torch_logits_fn(input_ids, attention_mask) -> np.ndarray`` runs the PyTorch model."""
    worst, worst_case, rows = 0.0, "", 0
    sizes = []
    for batch_ids in parity_batches(ids):
        batch = pad_batch(batch_ids, pad_id=pad_id)
        expected = softmax(torch_logits_fn(batch.input_ids, batch.attention_mask))
        actual = softmax(run_logits(session, batch.input_ids, batch.attention_mask))
        diff = np.abs(expected - actual).max(axis=1)
        # NaN compares false against everything: count a non-finite output as infinitely off.
        diff = np.where(np.isfinite(diff), diff, np.inf)
        rows += len(batch_ids)
        sizes.append(len(batch_ids))
        row = int(diff.argmax())
        if diff[row] > worst:
            worst = float(diff[row])
            worst_case = (f"batch of {len(batch_ids)}, lengths {batch.lengths.min()}–"
                          f"{batch.lengths.max()}, row {row} (length {batch.lengths[row]})")
    return ParityResult(worst, worst_case, sizes, rows)


@dataclass
class PrecisionComparison:
    agreement: float
    max_abs_diff: float
    fp32_accuracy: float
    lower_accuracy: float  # the fp16 or int8 artifact's
    accuracy_drop: float
    fp32_op_types: list[str] = field(default_factory=list)
    non_finite_rows: int = 0  # rows with inf/NaN: argmax would silently call them label 0
    precision: str = "fp16"

    def passes(self, settings: GateSettings) -> bool:
        min_agreement, max_drop = settings.thresholds(self.precision)
        return (self.non_finite_rows == 0 and self.agreement >= min_agreement
                and self.accuracy_drop <= max_drop)

    def describe(self) -> str:
        overflow = f", {self.non_finite_rows} texts with inf/NaN" if self.non_finite_rows else ""
        return (f"agreement {self.agreement:.4f}, accuracy {self.fp32_accuracy:.4f} → "
                f"{self.lower_accuracy:.4f} (drop {self.accuracy_drop * 100:.2f} points)"
                f"{overflow}")


def compare_precisions(fp32_probabilities: np.ndarray, lower_probabilities: np.ndarray,
                       labels: np.ndarray, fp32_op_types: list[str], *,
                       precision: str = "fp16") -> PrecisionComparison:
    """How a lower-precision artifact's predictions compare with fp32's on the same texts
    (the ``fp16_*`` fields hold the lower precision's figures, whichever it is)."""
    fp32_predictions = fp32_probabilities.argmax(axis=1)
    lower_predictions = lower_probabilities.argmax(axis=1)
    fp32_accuracy = float((fp32_predictions == labels).mean())
    lower_accuracy = float((lower_predictions == labels).mean())
    return PrecisionComparison(
        agreement=float((fp32_predictions == lower_predictions).mean()),
        max_abs_diff=float(np.abs(fp32_probabilities - lower_probabilities).max()),
        fp32_accuracy=fp32_accuracy,
        lower_accuracy=lower_accuracy,
        accuracy_drop=max(0.0, fp32_accuracy - lower_accuracy),
        fp32_op_types=fp32_op_types,
        non_finite_rows=count_non_finite_rows(lower_probabilities),
        precision=precision,
    )


def count_non_finite_rows(probabilities: np.ndarray) -> int:
    return int((~np.isfinite(probabilities)).any(axis=1).sum())
