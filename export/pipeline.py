"""Run directory → gated ONNX fp32 + fp16 artifacts → a new version in the model repository."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from export.classification_metrics import classification_report
from export.config import (
    LABELS_FILE,
    METRICS_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    RunConfig,
)
from export.datasets import DatasetError, load_dataset
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
from export.onnx_export import export_onnx_in_subprocess
from export.publish import discard, publish, staging_directory
from models import create_model
from service.manifest import (
    Artifact,
    Evaluation,
    Manifest,
    PrecisionEvaluation,
    TensorSpec,
    TokenizerSpec,
    TrainingSummary,
    sha256_file,
)
from service.tokenization import TextTokenizer

log = logging.getLogger(__name__)

FP32_FILE = "model.fp32.onnx"
FP16_FILE = "model.fp16.onnx"
DEFAULT_OPSET = 18


@dataclass
class ExportResult:
    manifest: Manifest
    directory: Path
    parity_worst_case: str
    fp16_attempts: list[dict]
    seconds: float

    def to_dict(self) -> dict:
        evaluation = self.manifest.evaluation
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "architecture": self.manifest.architecture,
            "path": str(self.directory),
            "parity": {"max_abs_diff": evaluation.onnx_vs_torch_max_abs_diff,
                       "worst_case": self.parity_worst_case,
                       "batch_sizes": evaluation.parity_batch_sizes},
            "evaluation": evaluation.model_dump(),
            "fp16_attempts": self.fp16_attempts,
            "artifacts": [a.model_dump() for a in self.manifest.artifacts],
            "export_seconds": round(self.seconds, 2),
        }


def source_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def held_out_test_split(config: RunConfig, labels: list[str]) -> list[tuple[str, int]]:
    """The test split the run held out, rebuilt from its config; refuses data that changed."""
    if config.data_sha256 is not None:
        path = Path(config.data.source)
        actual = sha256_file(path) if path.is_file() else "missing"
        if actual != config.data_sha256:
            raise DatasetError(f"{path}: not the file the run was trained on (sha256 "
                               f"{actual[:12]}…, trained on {config.data_sha256[:12]}…)")
    splits = load_dataset(config.data)
    if splits.labels != labels:
        raise DatasetError(f"the dataset's labels {splits.labels} differ from the run's "
                           f"labels.json {labels}")
    return splits.test


def load_torch_model(run_dir: Path, config: RunConfig) -> torch.nn.Module:
    model = create_model(config.architecture, config.model)
    state = torch.load(run_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def fp16_with_fallback(fp32_path: Path, fp16_path: Path, fp32_probabilities: np.ndarray,
                       ids: list[list[int]], labels: np.ndarray,
                       gates: GateSettings) -> tuple[PrecisionComparison, list[dict], np.ndarray]:
    """Plain fp16 first; if it fails the gate, again with ``mixed_precision_fp32_ops`` in fp32."""
    attempts: list[dict] = []
    comparison, probabilities = None, None
    for kept in ([], gates.mixed_precision_fp32_ops):
        convert_to_fp16(fp32_path, fp16_path, fp32_op_types=kept)
        probabilities = predict_probabilities(cpu_session(fp16_path), ids)
        comparison = compare_precisions(fp32_probabilities, probabilities, labels, kept)
        attempts.append({**asdict(comparison), "passed": comparison.passes(gates)})
        log.info("fp16 (%s in fp32): %s", ", ".join(kept) or "nothing", comparison.describe())
        if comparison.passes(gates):
            break
    assert comparison is not None and probabilities is not None
    return comparison, attempts, probabilities


def export_run(run_dir: Path, repository: Path, name: str, *, version: int | None = None,
               gates: GateSettings | None = None, opset: int = DEFAULT_OPSET,
               allow_fp16_failure: bool = False) -> ExportResult:
    """Export, gate and publish one run. Raises GateFailure (nothing published) when a gate
    fails, except an fp16 failure with ``allow_fp16_failure``: then the fp16 artifact is
    published marked as failed, and only fp32 is served by default."""
    gates = gates or GateSettings()
    started = time.monotonic()
    config = RunConfig.load(run_dir)
    labels: list[str] = json.loads((run_dir / LABELS_FILE).read_text(encoding="utf-8"))
    tokenizer = TextTokenizer.from_file(run_dir / TOKENIZER_FILE, config.tokenizer.max_length)
    staging = staging_directory(repository, name)
    try:
        fp32_path, fp16_path = staging / FP32_FILE, staging / FP16_FILE
        log.info("exporting %s (%s) to ONNX opset %d", run_dir, config.architecture, opset)
        export_onnx_in_subprocess(config.architecture, config.model, run_dir / WEIGHTS_FILE,
                                  fp32_path, opset=opset)

        test = held_out_test_split(config, labels)
        ids, _ = tokenizer.token_ids([text for text, _ in test])
        y_true = np.fromiter((label for _, label in test), dtype=np.int64, count=len(test))

        model = load_torch_model(run_dir, config)

        @torch.no_grad()
        def torch_logits(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            return model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()

        fp32_session = cpu_session(fp32_path)
        parity = check_parity(torch_logits, fp32_session, ids, gates.parity_tolerance)
        figures: dict = {"parity_max_abs_diff": parity.max_abs_diff,
                         "parity_worst_case": parity.worst_case}
        if parity.max_abs_diff > gates.parity_tolerance:
            raise GateFailure(
                f"parity gate failed: ONNX Runtime vs PyTorch max abs difference "
                f"{parity.max_abs_diff:.2e} > {gates.parity_tolerance:.0e} at {parity.worst_case}",
                figures,
            )
        fp32_probabilities = predict_probabilities(fp32_session, ids)
        if bad := count_non_finite_rows(fp32_probabilities):
            raise GateFailure(f"the fp32 model gave inf/NaN probabilities for {bad} of "
                              f"{len(ids)} test texts", figures)
        fp32_report = classification_report(y_true, fp32_probabilities.argmax(1), labels)

        comparison, attempts, fp16_probabilities = fp16_with_fallback(
            fp32_path, fp16_path, fp32_probabilities, ids, y_true, gates)
        fp16_report = classification_report(y_true, fp16_probabilities.argmax(1), labels)
        fp16_passed = comparison.passes(gates)
        figures["fp16_attempts"] = attempts
        if not fp16_passed and not allow_fp16_failure:
            raise GateFailure(
                f"fp16 gate failed even with {', '.join(gates.mixed_precision_fp32_ops)} in fp32:"
                f" {comparison.describe()}; required agreement ≥ {gates.fp16_min_agreement}, "
                f"drop ≤ {gates.fp16_max_accuracy_drop * 100:.2f} points",
                figures,
            )

        (staging / TOKENIZER_FILE).write_bytes((run_dir / TOKENIZER_FILE).read_bytes())
        evaluation = Evaluation(
            dataset=config.data.source, split="test", examples=len(test),
            fp32=PrecisionEvaluation(accuracy=fp32_report.accuracy,
                                     macro_f1=fp32_report.macro_f1),
            fp16=PrecisionEvaluation(accuracy=fp16_report.accuracy,
                                     macro_f1=fp16_report.macro_f1),
            fp16_agreement=comparison.agreement, fp16_max_abs_diff=comparison.max_abs_diff,
            onnx_vs_torch_max_abs_diff=parity.max_abs_diff,
            parity_batch_sizes=parity.batch_sizes,
        )
        artifacts = [
            artifact("fp32", fp32_path, opset, passed=True, fp32_op_types=[]),
            artifact("fp16", fp16_path, opset, passed=fp16_passed,
                     fp32_op_types=comparison.fp32_op_types),
        ]
        commit = source_commit()

        def write_manifest(directory: Path, number: int) -> None:
            build_manifest(run_dir, config, name, number, labels, directory, artifacts,
                           evaluation, commit).write(directory / "manifest.json")

        number, target = publish(staging, repository, name, version=version,
                                 finalize=write_manifest)
    except BaseException:
        discard(staging)
        raise
    manifest = Manifest.load(target / "manifest.json")
    log.info("published %s version %d at %s", name, number, target)
    return ExportResult(manifest, target, parity.worst_case, attempts, time.monotonic() - started)


def artifact(precision: str, path: Path, opset: int, *, passed: bool,
             fp32_op_types: list[str]) -> Artifact:
    return Artifact(precision=precision, file=path.name, sha256=sha256_file(path),
                    bytes=path.stat().st_size, opset=opset, passed_gates=passed,
                    fp32_op_types=fp32_op_types)


def build_manifest(run_dir: Path, config: RunConfig, name: str, version: int, labels: list[str],
                   directory: Path, artifacts: list[Artifact], evaluation: Evaluation,
                   commit: str | None) -> Manifest:
    metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    scalars = (int, float, str, bool, type(None))
    hyperparameters = {
        **{f"model.{k}": v for k, v in config.model.items() if isinstance(v, scalars)},
        **{f"training.{k}": v for k, v in config.training.model_dump().items()},
        **{f"tokenizer.{k}": v for k, v in config.tokenizer.model_dump().items()},
    }
    return Manifest(
        name=name,
        version=version,
        architecture=config.architecture,
        labels=labels,
        tokenizer=TokenizerSpec(sha256=sha256_file(directory / TOKENIZER_FILE),
                                max_length=config.tokenizer.max_length),
        inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"]),
                TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "sequence"])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", len(labels)])],
        artifacts=artifacts,
        evaluation=evaluation,
        training=TrainingSummary(
            dataset=metrics["dataset"], epochs=metrics["epochs_run"], seed=config.seed,
            hyperparameters=hyperparameters, duration_seconds=metrics["duration_seconds"],
            test_accuracy=metrics["test"]["accuracy"], test_macro_f1=metrics["test"]["macro_f1"],
        ),
        created_at=datetime.now(UTC),
        source_commit=commit,
    )
