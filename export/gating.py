"""Gating an exported fp32 graph and its lower-precision copies on held-out texts.

What every published version goes through, whether it was trained here or imported: parity
with PyTorch (when there is a PyTorch model to compare with), fp32 accuracy on the evaluation
set, each lower precision against fp32 (agreement and accuracy drop, with one retry that
converts less), and batch invariance for every precision: on the evaluation slice, a text's
probabilities alone and inside mixed-length batches agree within a tolerance. The result is
the manifest's evaluation and artifact entries.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export.classification_metrics import classification_report
from export.compute_cost import weight_flops_per_token
from export.fp16 import convert_to_fp16
from export.fused_export import fused_op_counts
from export.gates import (
    BatchInvariance,
    GateFailure,
    GateSettings,
    PrecisionComparison,
    check_batch_invariance,
    check_parity,
    compare_precisions,
    count_non_finite_rows,
)
from export.int8 import (
    DEFAULT_BLOCK_SIZE,
    convert_to_int8,
    convert_to_int8_calibrated,
    unquantized_op_types,
)
from export.onnx_eval import cpu_session, predict_probabilities
from service.repo.graph import run_logits
from service.repo.manifest import (
    EVALUATION_SLICE_FILE,
    Artifact,
    ComputeCost,
    Evaluation,
    EvaluationSlice,
    PrecisionEvaluation,
    sha256_file,
)
from service.repo.tokenization import pad_batch

log = logging.getLogger(__name__)

FP32_FILE = "model.fp32.onnx"
FP16_FILE = "model.fp16.onnx"
INT8_FILE = "model.int8.onnx"
# The evaluation slice stored with each version: enough texts to see a 1 % disagreement, few
# enough to re-gate in a second at start-up.
SLICE_EXAMPLES = 256
SLICE_SEED = 7
# The int8 speed check's batch of long texts: the server's default batch of 256-token texts
# (max_batch_tokens 2048).
LONG_BATCH_TEXTS = 8

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
    max_length: int = 0  # the tokenizer's: the int8 speed check times texts this long

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class GateReport:
    """What the gates measured, ready for the manifest, and every figure for ``--json``."""

    evaluation: Evaluation | None  # None: published without evaluation (imports, --no-eval)
    artifacts: list[Artifact]
    figures: dict = field(default_factory=dict)
    evaluation_slice: EvaluationSlice | None = None
    compute: ComputeCost | None = None


def gate_artifacts(staging: Path, evaluation_set: EvaluationSet, label_names: list[str], *,
                   gates: GateSettings, opset: int, torch_logits: TorchLogits | None = None,
                   allow_fp16_failure: bool = False,
                   fp16_source: Path | None = None,
                   calibration: list[list[int]] | None = None) -> GateReport:
    """Gate ``staging/model.fp32.onnx``, write its fp16 and int8 copies and the evaluation
    slice beside it. ``fp16_source``: the graph to convert to fp16 when model.fp32.onnx is a
    CPU-fused graph (export/fused_export.py) whose fused ops have no fp16 CPU kernels to gate.
    ``calibration``: token ids of training texts for the calibrated int8 (else block-wise only).

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
    started = time.perf_counter()
    fp32_probabilities = predict_probabilities(session, evaluation_set.ids,
                                               pad_id=evaluation_set.pad_id)
    fp32_timing = (time.perf_counter() - started, long_batch_seconds(session, evaluation_set))
    if bad := count_non_finite_rows(fp32_probabilities):
        raise GateFailure(f"the fp32 model gave inf/NaN probabilities for {bad} of "
                          f"{len(evaluation_set)} evaluation texts", figures)
    slice_ids = [evaluation_set.ids[i] for i in slice_rows(evaluation_set)]
    fp32_invariance = check_batch_invariance(session, slice_ids, pad_id=evaluation_set.pad_id)
    figures["fp32_batch_invariance"] = asdict(fp32_invariance)
    if not fp32_invariance.passes(gates):
        raise GateFailure(
            f"batch-invariance gate failed for fp32: probabilities moved by "
            f"{fp32_invariance.max_abs_diff:.2e} > {gates.batch_invariance_tolerance:.0e} "
            f"between a text alone and batched ({fp32_invariance.worst_case})", figures)

    fp16 = gate_precision("fp16", fp16_source or fp32_path, staging / FP16_FILE,
                          fp32_probabilities, evaluation_set, gates, slice_ids)
    assert fp16 is not None
    figures["fp16_attempts"] = fp16.attempts
    if not fp16.passed and not allow_fp16_failure:
        raise GateFailure(
            f"fp16 gate failed even with {', '.join(gates.mixed_precision_fp32_ops)} in fp32: "
            f"{fp16.describe()}; required agreement ≥ {gates.fp16_min_agreement}, "
            f"drop ≤ {gates.fp16_max_accuracy_drop * 100:.2f} points, batch invariance ≤ "
            f"{gates.batch_invariance_tolerance:.0e}", figures)
    int8 = gate_precision("int8", fp32_path, staging / INT8_FILE, fp32_probabilities,
                          evaluation_set, gates, slice_ids, calibration=calibration,
                          fp32_timing=fp32_timing)
    figures["int8_attempts"] = int8.attempts if int8 is not None else []
    if int8 is None:
        figures["int8_skipped"] = (f"no MatMul by a weight to quantize ("
                                   f"{', '.join(unquantized_op_types(fp32_path))} stay fp32)")
        log.info("int8: not published, %s", figures["int8_skipped"])

    fp32_report = _report(evaluation_set, fp32_probabilities, label_names)
    evaluation = Evaluation(
        dataset=evaluation_set.dataset, split=evaluation_set.split,
        examples=len(evaluation_set), fp32=fp32_report,
        fp16=_report(evaluation_set, fp16.probabilities, label_names),
        fp16_agreement=fp16.comparison.agreement,
        fp16_max_abs_diff=fp16.comparison.max_abs_diff,
        int8=_report(evaluation_set, int8.probabilities, label_names) if int8 else None,
        int8_agreement=int8.comparison.agreement if int8 else None,
        int8_max_abs_diff=int8.comparison.max_abs_diff if int8 else None,
        onnx_vs_torch_max_abs_diff=parity.max_abs_diff if parity else None,
        parity_batch_sizes=parity.batch_sizes if parity else [],
    )
    artifacts = [artifact("fp32", fp32_path, opset, passed=True,
                          batch_max_abs_diff=fp32_invariance.max_abs_diff),
                 artifact("fp16", fp16.path, opset, passed=fp16.passed,
                          fp32_op_types=fp16.comparison.fp32_op_types,
                          batch_max_abs_diff=fp16.invariance.max_abs_diff)]
    if int8 is not None:
        artifacts.append(artifact("int8", int8.path, opset, passed=int8.passed,
                                  fp32_op_types=int8.comparison.fp32_op_types,
                                  batch_max_abs_diff=int8.invariance.max_abs_diff,
                                  quantization=int8.quantization))
    slice_spec = write_evaluation_slice(staging / EVALUATION_SLICE_FILE, evaluation_set,
                                        label_names, fp32_probabilities)
    return GateReport(evaluation, artifacts, figures, slice_spec, graph_compute(fp32_path))


def graph_compute(path: Path) -> ComputeCost:
    """The manifest's compute figure for the graph at ``path``."""
    return ComputeCost(weight_flops_per_token=weight_flops_per_token(onnx.load(str(path))))


@dataclass
class PrecisionOutcome:
    path: Path
    comparison: PrecisionComparison
    invariance: BatchInvariance
    probabilities: np.ndarray
    attempts: list[dict]
    passed: bool
    quantization: str | None = None  # int8: how it was quantized
    speedup: float | None = None  # int8: fp32's time / this one's (the slower of two shapes)

    def describe(self) -> str:
        speed = f", {self.speedup:.2f}x fp32's speed" if self.speedup is not None else ""
        return (f"{self.comparison.describe()}, batch invariance "
                f"{self.invariance.max_abs_diff:.1e}{speed}")


@dataclass(frozen=True)
class _Plan:
    convert: Callable[[], object]
    kept_in_fp32: list[str] | None  # fp16: the op types blocked; int8: read from the graph
    quantization: str | None = None


def _plans(precision: str, fp32_path: Path, path: Path, gates: GateSettings,
           calibration: list[list[int]] | None, pad_id: int) -> list[_Plan]:
    if precision == "fp16":
        return [_Plan(lambda kept=kept: convert_to_fp16(fp32_path, path, fp32_op_types=kept),
                      kept) for kept in ([], gates.mixed_precision_fp32_ops)]
    plans = []
    if calibration:
        calibrated = (f"MatMulInteger u8s8, activation scales calibrated on "
                      f"{len(calibration)} training texts, per-channel weights")
        plans += [
            _Plan(lambda: convert_to_int8_calibrated(fp32_path, path, calibration,
                                                     pad_id=pad_id), None, calibrated),
            _Plan(lambda: convert_to_int8_calibrated(fp32_path, path, calibration,
                                                     pad_id=pad_id, attention_blockwise=True),
                  None, f"{calibrated}; attention projections MatMulNBits 8-bit, block "
                  f"{DEFAULT_BLOCK_SIZE}")]
    return plans + [_Plan(lambda size=size: convert_to_int8(fp32_path, path, block_size=size),
                          None, f"MatMulNBits 8-bit, block {size}, int8 activations per row")
                    for size in gates.int8_block_sizes]


def gate_precision(precision: str, fp32_path: Path, path: Path, fp32_probabilities: np.ndarray,
                   evaluation_set: EvaluationSet, gates: GateSettings,
                   slice_ids: list[list[int]], *, calibration: list[list[int]] | None = None,
                   fp32_timing: tuple[float, float] | None = None) -> PrecisionOutcome | None:
    """Convert to ``precision``, compare with fp32 and check batch invariance on
    ``slice_ids``; while that fails, again converting less (fp16: ``mixed_precision_fp32_ops``
    kept in fp32; int8: the next, finer of ``int8_block_sizes``). The last attempt's file
    stays at ``path``. None for int8 when the graph has nothing to quantize (the LSTM: its
    cell and Gemm head have no batch-invariant int8 kernel), so no int8 artifact is made.
    int8 is also held to ``int8_min_speedup`` over fp32 (``fp32_timing``: the evaluation set,
    and a batch of long texts as a busy server runs them), on both: a lossy artifact that is
    not faster has no reason to be served."""
    attempts: list[dict] = []
    outcome = None
    plans = _plans(precision, fp32_path, path, gates, calibration, evaluation_set.pad_id)
    for number, plan in enumerate(plans):
        if plan.convert() == 0:
            if number + 1 < len(plans):
                continue  # e.g. calibration found nothing: the block-wise form next
            path.unlink(missing_ok=True)
            return None
        left_in_fp32 = (plan.kept_in_fp32 if plan.kept_in_fp32 is not None
                        else unquantized_op_types(path))
        session = cpu_session(path)
        started = time.perf_counter()
        probabilities = predict_probabilities(session, evaluation_set.ids,
                                              pad_id=evaluation_set.pad_id)
        seconds = time.perf_counter() - started
        speedup = (min(fp32_timing[0] / seconds,
                       fp32_timing[1] / long_batch_seconds(session, evaluation_set))
                   if precision == "int8" and fp32_timing else None)
        comparison = compare_precisions(fp32_probabilities, probabilities, evaluation_set.labels,
                                        left_in_fp32, precision=precision)
        invariance = check_batch_invariance(session, slice_ids, pad_id=evaluation_set.pad_id)
        fast_enough = speedup is None or speedup >= gates.int8_min_speedup
        passed = comparison.passes(gates) and invariance.passes(gates) and fast_enough
        outcome = PrecisionOutcome(path, comparison, invariance, probabilities, attempts, passed,
                                   plan.quantization, speedup)
        attempts.append({**asdict(comparison), "batch_invariance": asdict(invariance),
                         "quantization": plan.quantization, "speedup_vs_fp32": speedup,
                         "passed": passed})
        log.info("%s (%s%s left in fp32): %s", precision,
                 f"{plan.quantization}; " if plan.quantization else "",
                 ", ".join(left_in_fp32) or "nothing", outcome.describe())
        if passed:
            break
    assert outcome is not None
    return outcome


def long_batch_seconds(session: Any, evaluation_set: EvaluationSet, runs: int = 3) -> float:
    """Median time of a batch of ``LONG_BATCH_TEXTS`` texts at the evaluation set's
    ``max_length`` (real ids repeated): the shape of a busy server's batches of documents,
    where per-op overheads matter least and kernels differ most."""
    rows = sorted(evaluation_set.ids, key=len)[-LONG_BATCH_TEXTS:]
    length = max(evaluation_set.max_length, max(len(r) for r in rows))
    batch = pad_batch([(row * (length // max(1, len(row)) + 1))[:length] for row in rows],
                      pad_id=evaluation_set.pad_id)
    run_logits(session, batch.input_ids, batch.attention_mask)
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        run_logits(session, batch.input_ids, batch.attention_mask)
        timings.append(time.perf_counter() - started)
    return float(np.median(timings))


def _report(evaluation_set: EvaluationSet, probabilities: np.ndarray,
            label_names: list[str]) -> PrecisionEvaluation:
    report = classification_report(evaluation_set.labels, probabilities.argmax(1), label_names)
    return PrecisionEvaluation(accuracy=report.accuracy, macro_f1=report.macro_f1)


def slice_rows(evaluation_set: EvaluationSet) -> np.ndarray:
    """The evaluation slice: a fixed seeded sample of the evaluation set's rows, in order."""
    rng = np.random.default_rng(SLICE_SEED)
    count = min(SLICE_EXAMPLES, len(evaluation_set))
    return np.sort(rng.permutation(len(evaluation_set))[:count])


def write_evaluation_slice(path: Path, evaluation_set: EvaluationSet, label_names: list[str],
                           fp32_probabilities: np.ndarray) -> EvaluationSlice:
    """The evaluation slice's texts with labels and fp32 probabilities (JSON), so a server can
    re-gate lower precisions on its own device."""
    rows = slice_rows(evaluation_set)
    count = len(rows)
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
             fp32_op_types: list[str] | None = None, batch_max_abs_diff: float | None = None,
             quantization: str | None = None) -> Artifact:
    graph = onnx.load(str(path))
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), opset)
    fused = {op: count for op, count in fused_op_counts(graph).items() if op != "MatMulNBits"}
    return Artifact(precision=precision, file=path.name, sha256=sha256_file(path),
                    bytes=path.stat().st_size, opset=opset, passed_gates=passed, fused_ops=fused,
                    fp32_op_types=fp32_op_types or [],
                    batch_max_abs_diff=_finite_or_none(batch_max_abs_diff),
                    quantization=quantization)


def _finite_or_none(value: float | None) -> float | None:
    # JSON has no inf: a non-finite difference is recorded as "not invariant" by passed_gates.
    return value if value is None or np.isfinite(value) else 1.0
