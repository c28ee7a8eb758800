"""Gating an exported fp32 graph and its lower-precision copies on held-out texts.

What every published version goes through, whether it was trained here or imported: parity
with PyTorch (when there is a PyTorch model to compare with), fp32 accuracy on the evaluation
set, and each lower precision against fp32 (agreement and accuracy drop), with one retry in
mixed precision. The result is the manifest's evaluation and artifact entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from export.classification_metrics import classification_report
from export.fp16 import convert_to_fp16
from export.gates import (
    GateFailure,
    GateSettings,
    PrecisionComparison,
    check_parity,
    compare_precisions,
    count_non_finite_rows,
)
from export.onnx_eval import cpu_session, predict_probabilities
from service.repo.manifest import Artifact, Evaluation, PrecisionEvaluation, sha256_file

log = logging.getLogger(__name__)

FP32_FILE = "model.fp32.onnx"
FP16_FILE = "model.fp16.onnx"

#: (input_ids, attention_mask) -> logits of the PyTorch model the graph was exported from.
TorchLogits = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EvaluationSet:
    """Labelled held-out texts, tokenized the way the server will tokenize them."""

    dataset: str
    split: str
    texts: list[str]
    ids: list[list[int]]
    labels: np.ndarray  # int64 label ids
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class GateReport:
    """What the gates measured, ready for the manifest, and every figure for ``--json``."""

    evaluation: Evaluation
    artifacts: list[Artifact]
    figures: dict = field(default_factory=dict)


def gate_artifacts(staging: Path, evaluation_set: EvaluationSet, label_names: list[str], *,
                   gates: GateSettings, opset: int, torch_logits: TorchLogits | None = None,
                   allow_fp16_failure: bool = False) -> GateReport:
    """Gate ``staging/model.fp32.onnx`` and write its fp16 copy beside it.

    Raises ``GateFailure`` (with every figure so far) when parity or fp32 fails, or when fp16
    fails and ``allow_fp16_failure`` is not set; then the fp16 artifact is kept, marked failed.
    """
    fp32_path = staging / FP32_FILE
    session = cpu_session(fp32_path)
    figures: dict = {}
    parity = None
    if torch_logits is not None:
        parity = check_parity(torch_logits, session, evaluation_set.ids, gates.parity_tolerance,
                              pad_id=evaluation_set.pad_id)
        figures.update(parity_max_abs_diff=parity.max_abs_diff,
                       parity_worst_case=parity.worst_case)
        if not parity.max_abs_diff <= gates.parity_tolerance:
            raise GateFailure(
                f"parity gate failed: ONNX Runtime vs PyTorch max abs difference "
                f"{parity.max_abs_diff:.2e} > {gates.parity_tolerance:.0e} at "
                f"{parity.worst_case}", figures)
    fp32_probabilities = predict_probabilities(session, evaluation_set.ids,
                                               pad_id=evaluation_set.pad_id)
    if bad := count_non_finite_rows(fp32_probabilities):
        raise GateFailure(f"the fp32 model gave inf/NaN probabilities for {bad} of "
                          f"{len(evaluation_set)} evaluation texts", figures)
    fp32_report = classification_report(evaluation_set.labels, fp32_probabilities.argmax(1),
                                        label_names)

    fp16_path = staging / FP16_FILE
    comparison, attempts, fp16_probabilities = fp16_with_fallback(
        fp32_path, fp16_path, fp32_probabilities, evaluation_set, gates)
    figures["fp16_attempts"] = attempts
    fp16_passed = comparison.passes(gates)
    if not fp16_passed and not allow_fp16_failure:
        raise GateFailure(
            f"fp16 gate failed even with {', '.join(gates.mixed_precision_fp32_ops)} in fp32: "
            f"{comparison.describe()}; required agreement ≥ {gates.fp16_min_agreement}, "
            f"drop ≤ {gates.fp16_max_accuracy_drop * 100:.2f} points", figures)
    fp16_report = classification_report(evaluation_set.labels, fp16_probabilities.argmax(1),
                                        label_names)
    evaluation = Evaluation(
        dataset=evaluation_set.dataset, split=evaluation_set.split,
        examples=len(evaluation_set),
        fp32=PrecisionEvaluation(accuracy=fp32_report.accuracy, macro_f1=fp32_report.macro_f1),
        fp16=PrecisionEvaluation(accuracy=fp16_report.accuracy, macro_f1=fp16_report.macro_f1),
        fp16_agreement=comparison.agreement, fp16_max_abs_diff=comparison.max_abs_diff,
        onnx_vs_torch_max_abs_diff=parity.max_abs_diff if parity else None,
        parity_batch_sizes=parity.batch_sizes if parity else [],
    )
    artifacts = [artifact("fp32", fp32_path, opset, passed=True),
                 artifact("fp16", fp16_path, opset, passed=fp16_passed,
                          fp32_op_types=comparison.fp32_op_types)]
    return GateReport(evaluation, artifacts, figures)


def fp16_with_fallback(fp32_path: Path, fp16_path: Path, fp32_probabilities: np.ndarray,
                       evaluation_set: EvaluationSet, gates: GateSettings
                       ) -> tuple[PrecisionComparison, list[dict], np.ndarray]:
    """Plain fp16 first; if it fails the gate, again with ``mixed_precision_fp32_ops`` in fp32."""
    attempts: list[dict] = []
    comparison, probabilities = None, None
    for kept in ([], gates.mixed_precision_fp32_ops):
        convert_to_fp16(fp32_path, fp16_path, fp32_op_types=kept)
        probabilities = predict_probabilities(cpu_session(fp16_path), evaluation_set.ids,
                                              pad_id=evaluation_set.pad_id)
        comparison = compare_precisions(fp32_probabilities, probabilities, evaluation_set.labels,
                                        kept)
        attempts.append({**asdict(comparison), "passed": comparison.passes(gates)})
        log.info("fp16 (%s in fp32): %s", ", ".join(kept) or "nothing", comparison.describe())
        if comparison.passes(gates):
            break
    assert comparison is not None and probabilities is not None
    return comparison, attempts, probabilities


def artifact(precision: str, path: Path, opset: int, *, passed: bool,
             fp32_op_types: list[str] | None = None) -> Artifact:
    return Artifact(precision=precision, file=path.name, sha256=sha256_file(path),
                    bytes=path.stat().st_size, opset=opset, passed_gates=passed,
                    fp32_op_types=fp32_op_types or [])
