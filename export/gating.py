"""Gating an exported fp32 graph and its lower-precision copies on held-out texts.

What every published version goes through, whether it was trained here or imported: parity
with PyTorch (when there is a PyTorch model to compare with), fp32 accuracy on the evaluation
set, and each lower precision against fp32 (agreement and accuracy drop), with one retry in
mixed precision. The result is the manifest's evaluation and artifact entries.
"""

from __future__ import annotations

import json
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
from export.int8 import convert_to_int8, unquantized_op_types
from export.onnx_eval import cpu_session, predict_probabilities
from service.repo.manifest import (
    EVALUATION_SLICE_FILE,
    Artifact,
    Evaluation,
    EvaluationSlice,
    PrecisionEvaluation,
    sha256_file,
)

log = logging.getLogger(__name__)

FP32_FILE = "model.fp32.onnx"
FP16_FILE = "model.fp16.onnx"
INT8_FILE = "model.int8.onnx"
# The evaluation slice stored with each version: enough texts to see a 1 % disagreement, few
# enough to re-gate in a second at start-up.
SLICE_EXAMPLES = 256
SLICE_SEED = 7

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

    evaluation: Evaluation | None  # None: published without evaluation (imports, --no-eval)
    artifacts: list[Artifact]
    figures: dict = field(default_factory=dict)
    evaluation_slice: EvaluationSlice | None = None


def gate_artifacts(staging: Path, evaluation_set: EvaluationSet, label_names: list[str], *,
                   gates: GateSettings, opset: int, torch_logits: TorchLogits | None = None,
                   allow_fp16_failure: bool = False) -> GateReport:
    """Gate ``staging/model.fp32.onnx``, write its fp16 and int8 copies and the evaluation
    slice beside it.

    Raises ``GateFailure`` (with every figure so far) when parity or fp32 fails, or when fp16
    fails and ``allow_fp16_failure`` is not set (then the fp16 artifact is kept, marked
    failed). An int8 artifact that fails its gate is kept marked failed: it is an optional
    speed-up, served only when asked for.
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

    fp16 = gate_precision("fp16", fp32_path, staging / FP16_FILE, fp32_probabilities,
                          evaluation_set, gates)
    figures["fp16_attempts"] = fp16.attempts
    if not fp16.passed and not allow_fp16_failure:
        raise GateFailure(
            f"fp16 gate failed even with {', '.join(gates.mixed_precision_fp32_ops)} in fp32: "
            f"{fp16.comparison.describe()}; required agreement ≥ {gates.fp16_min_agreement}, "
            f"drop ≤ {gates.fp16_max_accuracy_drop * 100:.2f} points", figures)
    int8 = gate_precision("int8", fp32_path, staging / INT8_FILE, fp32_probabilities,
                          evaluation_set, gates)
    figures["int8_attempts"] = int8.attempts

    fp32_report = _report(evaluation_set, fp32_probabilities, label_names)
    evaluation = Evaluation(
        dataset=evaluation_set.dataset, split=evaluation_set.split,
        examples=len(evaluation_set), fp32=fp32_report,
        fp16=_report(evaluation_set, fp16.probabilities, label_names),
        fp16_agreement=fp16.comparison.agreement,
        fp16_max_abs_diff=fp16.comparison.max_abs_diff,
        int8=_report(evaluation_set, int8.probabilities, label_names),
        int8_agreement=int8.comparison.agreement,
        int8_max_abs_diff=int8.comparison.max_abs_diff,
        onnx_vs_torch_max_abs_diff=parity.max_abs_diff if parity else None,
        parity_batch_sizes=parity.batch_sizes if parity else [],
    )
    artifacts = [artifact("fp32", fp32_path, opset, passed=True),
                 artifact("fp16", fp16.path, opset, passed=fp16.passed,
                          fp32_op_types=fp16.comparison.fp32_op_types),
                 artifact("int8", int8.path, opset, passed=int8.passed,
                          fp32_op_types=int8.comparison.fp32_op_types)]
    slice_spec = write_evaluation_slice(staging / EVALUATION_SLICE_FILE, evaluation_set,
                                        label_names, fp32_probabilities)
    return GateReport(evaluation, artifacts, figures, slice_spec)


@dataclass
class PrecisionOutcome:
    path: Path
    comparison: PrecisionComparison
    probabilities: np.ndarray
    attempts: list[dict]
    passed: bool


def gate_precision(precision: str, fp32_path: Path, path: Path, fp32_probabilities: np.ndarray,
                   evaluation_set: EvaluationSet, gates: GateSettings) -> PrecisionOutcome:
    """Convert to ``precision`` and compare with fp32; if that fails the gate, once more with
    less converted (fp16: ``mixed_precision_fp32_ops`` kept in fp32; int8: only
    ``int8_retry_op_types`` quantized). The last attempt's file stays at ``path``."""
    attempts: list[dict] = []
    comparison, probabilities = None, None
    if precision == "fp16":
        plans: list[tuple[list[str], Callable[[], None]]] = [
            (kept, lambda kept=kept: convert_to_fp16(fp32_path, path, fp32_op_types=kept))
            for kept in ([], gates.mixed_precision_fp32_ops)]
    else:
        plans = [(None, lambda: convert_to_int8(fp32_path, path)),  # type: ignore[list-item]
                 (gates.int8_retry_op_types,
                  lambda: convert_to_int8(fp32_path, path, op_types=gates.int8_retry_op_types))]
    for kept, convert in plans:
        convert()
        left_in_fp32 = (kept or []) if precision == "fp16" else unquantized_op_types(path)
        probabilities = predict_probabilities(cpu_session(path), evaluation_set.ids,
                                              pad_id=evaluation_set.pad_id)
        comparison = compare_precisions(fp32_probabilities, probabilities, evaluation_set.labels,
                                        left_in_fp32, precision=precision)
        attempts.append({**asdict(comparison), "passed": comparison.passes(gates)})
        log.info("%s (%s left in fp32): %s", precision, ", ".join(left_in_fp32) or "nothing",
                 comparison.describe())
        if comparison.passes(gates):
            break
    assert comparison is not None and probabilities is not None
    return PrecisionOutcome(path, comparison, probabilities, attempts, comparison.passes(gates))


def _report(evaluation_set: EvaluationSet, probabilities: np.ndarray,
            label_names: list[str]) -> PrecisionEvaluation:
    report = classification_report(evaluation_set.labels, probabilities.argmax(1), label_names)
    return PrecisionEvaluation(accuracy=report.accuracy, macro_f1=report.macro_f1)


def write_evaluation_slice(path: Path, evaluation_set: EvaluationSet, label_names: list[str],
                           fp32_probabilities: np.ndarray) -> EvaluationSlice:
    """A fixed seeded sample of the evaluation texts with labels and fp32 probabilities (JSON),
    so a server can re-gate lower precisions on its own device."""
    rng = np.random.default_rng(SLICE_SEED)
    count = min(SLICE_EXAMPLES, len(evaluation_set))
    rows = np.sort(rng.permutation(len(evaluation_set))[:count])
    document = {
        "labels": label_names,
        "texts": [evaluation_set.texts[i] for i in rows],
        "label_ids": [int(evaluation_set.labels[i]) for i in rows],
        "fp32_probabilities": [[round(float(p), 7) for p in fp32_probabilities[i]]
                               for i in rows],
    }
    path.write_text(json.dumps(document) + "\n", encoding="utf-8")
    return EvaluationSlice(file=path.name, sha256=sha256_file(path), examples=count)


def artifact(precision: str, path: Path, opset: int, *, passed: bool,
             fp32_op_types: list[str] | None = None) -> Artifact:
    return Artifact(precision=precision, file=path.name, sha256=sha256_file(path),
                    bytes=path.stat().st_size, opset=opset, passed_gates=passed,
                    fp32_op_types=fp32_op_types or [])
