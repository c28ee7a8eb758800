"""fp16 re-gated on the serving device, over the evaluation slice stored with the model version.

The export gates compared fp16 with fp32 on CPU, where ONNX Runtime casts fp16 graphs back to
fp32 around most ops: an agreement of 1.0000 there says little about a GPU, where the LSTM
kernel computes in half precision (cuDNN's math type follows the data type) and MatMuls use
fp16 tensor cores. So before ``--precision auto`` serves fp16 on CUDA, the fp16 and fp32
artifacts run on that device over the version's ``evaluation_slice.json`` (labelled texts, with
the fp32 probabilities measured at export) and fp16 must pass the same thresholds as the export
gate (``export/gates.py`` ``GateSettings``: agreement >= 0.995, accuracy drop <= 0.005 by
default; the server cannot import ``export/``, so ``ServeSettings`` repeats them).

The fp16 artifact may itself be the export's mixed-precision retry (``Artifact.fp32_op_types``
names what it kept in fp32); schema 2 holds one fp16 artifact, so when it fails here the model
is served in fp32.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.repo.layout import ModelVersion, verify_file
from service.repo.manifest import Manifest, ManifestError
from service.repo.probabilities import softmax
from service.repo.tokenization import TextTokenizer, pad_batch

#: (input_ids, attention_mask) -> logits: a ModelSession's ``run``.
Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]
GATE_BATCH_TEXTS = 32


@dataclass(frozen=True)
class EvaluationSliceData:
    labels: list[str]
    texts: list[str]
    label_ids: np.ndarray  # int64 [examples]
    fp32_probabilities: np.ndarray  # float32 [examples, labels], measured at export (CPU)


def read_evaluation_slice(model: ModelVersion, manifest: Manifest) -> EvaluationSliceData | None:
    """The version's slice, sha256-verified; None when the manifest has none (schema 1,
    imports without evaluation)."""
    spec = manifest.evaluation_slice
    if spec is None:
        return None
    path = verify_file(model.directory, spec.file, spec.sha256)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        data = EvaluationSliceData(
            labels=list(document["labels"]), texts=[str(t) for t in document["texts"]],
            label_ids=np.asarray(document["label_ids"], dtype=np.int64),
            fp32_probabilities=np.asarray(document["fp32_probabilities"], dtype=np.float32))
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: unreadable evaluation slice ({exc})") from exc
    rows = len(data.texts)
    if (data.labels != manifest.labels or data.label_ids.shape != (rows,)
            or data.fp32_probabilities.shape != (rows, len(manifest.labels))):
        raise ManifestError(f"{path}: evaluation slice does not match the manifest's labels")
    return data


def predict(run: Runner, tokenizer: TextTokenizer, texts: list[str],
            batch_texts: int = GATE_BATCH_TEXTS) -> np.ndarray:
    """Probabilities for each text, in order; batches are formed by length, as the export
    gates form them, so padding is what serving sees."""
    ids, _ = tokenizer.token_ids(texts)
    order = np.argsort([len(row) for row in ids], kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_texts):
        rows = order[start:start + batch_texts]
        batch = pad_batch([ids[i] for i in rows], pad_id=tokenizer.pad_id)
        probabilities = softmax(run(batch.input_ids, batch.attention_mask))
        if out is None:
            out = np.empty((len(ids), probabilities.shape[1]), dtype=np.float32)
        out[rows] = probabilities
    if out is None:
        raise ValueError("no texts to predict")
    return out


@dataclass(frozen=True)
class Comparison:
    """A lower precision against fp32, both run on the same device over the same texts."""

    examples: int
    agreement: float
    fp32_accuracy: float
    candidate_accuracy: float
    max_abs_diff: float
    non_finite_rows: int = 0  # fp16 overflow: inf/NaN rows argmax would call label 0

    @property
    def accuracy_drop(self) -> float:
        return max(0.0, self.fp32_accuracy - self.candidate_accuracy)

    def describe(self) -> str:
        overflow = f", {self.non_finite_rows} texts with inf/NaN" if self.non_finite_rows else ""
        return (f"agreement {self.agreement:.4f} over {self.examples} texts, accuracy "
                f"{self.fp32_accuracy:.4f} -> {self.candidate_accuracy:.4f}, max abs diff "
                f"{self.max_abs_diff:.2e}{overflow}")


def compare(fp32: np.ndarray, candidate: np.ndarray, label_ids: np.ndarray) -> Comparison:
    fp32_predictions, candidate_predictions = fp32.argmax(axis=1), candidate.argmax(axis=1)
    finite = np.isfinite(candidate)
    return Comparison(
        examples=len(label_ids),
        agreement=float((fp32_predictions == candidate_predictions).mean()),
        fp32_accuracy=float((fp32_predictions == label_ids).mean()),
        candidate_accuracy=float((candidate_predictions == label_ids).mean()),
        max_abs_diff=float(np.abs(np.where(finite, candidate, 0.0) - fp32).max()),
        non_finite_rows=int((~finite).any(axis=1).sum()),
    )


@dataclass(frozen=True)
class GateThresholds:
    min_agreement: float
    max_accuracy_drop: float

    def passes(self, comparison: Comparison) -> bool:
        return (comparison.non_finite_rows == 0
                and comparison.agreement >= self.min_agreement
                and comparison.accuracy_drop <= self.max_accuracy_drop)


@dataclass(frozen=True)
class DeviceGateResult:
    """What the re-gate measured and what it chose; recorded in GetModel and the metrics."""

    candidate: str  # the precision re-gated ("fp16")
    chosen: str  # the precision served
    passed: bool
    thresholds: GateThresholds
    comparison: Comparison | None = None  # None when nothing could be measured
    fp32_op_types: list[str] = field(default_factory=list)  # kept in fp32 inside the candidate
    fp32_vs_export_max_abs_diff: float | None = None  # device fp32 vs the export's CPU fp32
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        c = self.comparison
        return {
            "candidate": self.candidate, "chosen": self.chosen, "passed": self.passed,
            "min_agreement": self.thresholds.min_agreement,
            "max_accuracy_drop": self.thresholds.max_accuracy_drop,
            "examples": c.examples if c else 0, "agreement": c.agreement if c else None,
            "fp32_accuracy": c.fp32_accuracy if c else None,
            "candidate_accuracy": c.candidate_accuracy if c else None,
            "max_abs_diff": c.max_abs_diff if c else None,
            "non_finite_rows": c.non_finite_rows if c else 0,
            "fp32_op_types": list(self.fp32_op_types),
            "fp32_vs_export_max_abs_diff": self.fp32_vs_export_max_abs_diff,
            "detail": self.detail,
        }


def regate(fp32: Runner, candidate: Runner, tokenizer: TextTokenizer,
           data: EvaluationSliceData, thresholds: GateThresholds, *, candidate_precision: str,
           fp32_op_types: list[str], device: str) -> DeviceGateResult:
    """Run both over the slice on the device; the candidate is chosen only if it passes."""
    fp32_probabilities = predict(fp32, tokenizer, data.texts)
    candidate_probabilities = predict(candidate, tokenizer, data.texts)
    comparison = compare(fp32_probabilities, candidate_probabilities, data.label_ids)
    passed = thresholds.passes(comparison)
    mixed = f" (mixed precision: {', '.join(fp32_op_types)} in fp32)" if fp32_op_types else ""
    verdict = "passed" if passed else (
        f"failed (needs agreement >= {thresholds.min_agreement}, accuracy drop <= "
        f"{thresholds.max_accuracy_drop}, no inf/NaN): serving fp32")
    return DeviceGateResult(
        candidate=candidate_precision, chosen=candidate_precision if passed else "fp32",
        passed=passed, thresholds=thresholds, comparison=comparison,
        fp32_op_types=list(fp32_op_types),
        fp32_vs_export_max_abs_diff=float(
            np.abs(fp32_probabilities - data.fp32_probabilities).max()),
        detail=f"{candidate_precision}{mixed} vs fp32 on {device}: {comparison.describe()}; "
               f"{verdict}",
    )


def not_measured(candidate_precision: str, thresholds: GateThresholds, why: str
                 ) -> DeviceGateResult:
    """No slice to measure with: fp16 stays unproven on this device, so fp32 is served."""
    return DeviceGateResult(candidate=candidate_precision, chosen="fp32", passed=False,
                            thresholds=thresholds, detail=f"{why}: serving fp32 "
                            f"(--precision {candidate_precision} forces it)")
