"""Run directory → gated ONNX fp32 + fp16 artifacts → a new version in the model repository."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from export.config import (
    LABELS_FILE,
    METRICS_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    RunConfig,
)
from export.datasets import DatasetError, DatasetSplits, load_dataset
from export.fused_export import fuse_staged_graph
from export.gates import GateSettings
from export.gating import FP32_FILE, EvaluationSet, GateReport, TorchLogits, gate_artifacts
from export.onnx_export import export_onnx_in_subprocess
from export.publish import discard, publish, staging_directory
from models import create_model
from service.repo.graph import DEFAULT_OPSET
from service.repo.manifest import (
    MANIFEST_FILE,
    DistillationRecord,
    Manifest,
    ModelSource,
    TokenizerSpec,
    TrainingSummary,
    contract_inputs,
    contract_outputs,
    sha256_file,
)
from service.repo.tokenization import TextTokenizer

log = logging.getLogger(__name__)

#: Training texts the calibrated int8's activation ranges are measured on.
CALIBRATION_TEXTS = 256



@dataclass
class ExportResult:
    manifest: Manifest
    directory: Path
    parity_worst_case: str
    fp16_attempts: list[dict]
    int8_attempts: list[dict]
    seconds: float

    def to_dict(self) -> dict:
        evaluation = self.manifest.evaluation
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "architecture": self.manifest.architecture,
            "path": str(self.directory),
            "parity": {"max_abs_diff": evaluation.onnx_vs_torch_max_abs_diff if evaluation
                       else None,
                       "worst_case": self.parity_worst_case,
                       "batch_sizes": evaluation.parity_batch_sizes if evaluation else []},
            "evaluation": evaluation.model_dump() if evaluation else None,
            "fp16_attempts": self.fp16_attempts,
            "int8_attempts": self.int8_attempts,
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


def run_splits(config: RunConfig, labels: list[str]) -> DatasetSplits:
    """The run's splits, rebuilt from its config (the test split it held out, the training
    split calibration draws from); refuses data that changed."""
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
    return splits


def calibration_ids(config: RunConfig, train: list[tuple[str, int]],
                    tokenizer: TextTokenizer) -> list[list[int]]:
    """Token ids of ``CALIBRATION_TEXTS`` training texts (seeded): the calibrated int8's
    activation ranges come from the data the model was trained on, never from the test split
    the gates judge it on."""
    rows = np.random.default_rng(config.seed).permutation(len(train))[:CALIBRATION_TEXTS]
    return tokenizer.token_ids([train[int(i)][0] for i in rows])[0]


def load_torch_model(run_dir: Path, config: RunConfig) -> torch.nn.Module:
    model = create_model(config.architecture, config.model)
    state = torch.load(run_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def held_out_evaluation_set(config: RunConfig, test: list[tuple[str, int]],
                            tokenizer: TextTokenizer) -> EvaluationSet:
    texts = [text for text, _ in test]
    ids, _ = tokenizer.token_ids(texts)
    y_true = np.fromiter((label for _, label in test), dtype=np.int64, count=len(test))
    return EvaluationSet(config.data.source, "test", texts, ids, y_true, tokenizer.pad_id,
                         tokenizer.max_length)


def torch_reference(run_dir: Path, config: RunConfig) -> TorchLogits:
    """The trained PyTorch model as a logits function, for the parity gate."""
    model = load_torch_model(run_dir, config)

    @torch.no_grad()
    def logits(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()

    return logits


def export_run(run_dir: Path, repository: Path, name: str, *, version: int | None = None,
               gates: GateSettings | None = None, opset: int = DEFAULT_OPSET,
               allow_fp16_failure: bool = False) -> ExportResult:
    """Export, gate and publish one run. Raises GateFailure (nothing published) when a gate
    fails, except an fp16 failure with ``allow_fp16_failure``: then the fp16 artifact is
    published marked as failed, and only fp32 is served by default."""
    started = time.monotonic()
    config = RunConfig.load(run_dir)
    labels: list[str] = json.loads((run_dir / LABELS_FILE).read_text(encoding="utf-8"))
    tokenizer = TextTokenizer.from_file(run_dir / TOKENIZER_FILE, config.tokenizer.max_length,
                                        config.pad_id)
    staging = staging_directory(repository, name)
    try:
        log.info("exporting %s (%s) to ONNX opset %d", run_dir, config.architecture, opset)
        export_onnx_in_subprocess(config.architecture, config.model, run_dir / WEIGHTS_FILE,
                                  staging / FP32_FILE, opset=opset)
        plain = (fuse_staged_graph(staging, FP32_FILE, config.model, run_dir / WEIGHTS_FILE)
                 if config.architecture == "pretrained" else None)
        splits = run_splits(config, labels)
        report = gate_artifacts(
            staging, held_out_evaluation_set(config, splits.test, tokenizer), labels,
            gates=gates or GateSettings(), opset=opset,
            torch_logits=torch_reference(run_dir, config), allow_fp16_failure=allow_fp16_failure,
            fp16_source=plain, calibration=calibration_ids(config, splits.train, tokenizer))
        if plain is not None:
            plain.unlink()
        (staging / TOKENIZER_FILE).write_bytes((run_dir / TOKENIZER_FILE).read_bytes())
        commit = source_commit()

        def write_manifest(directory: Path, number: int) -> None:
            build_manifest(run_dir, config, name, number, labels, directory, report,
                           commit).write(directory / MANIFEST_FILE)

        number, target = publish(staging, repository, name, version=version,
                                 finalize=write_manifest)
    except BaseException:
        discard(staging)
        raise
    manifest = Manifest.load(target / MANIFEST_FILE)
    log.info("published %s version %d at %s", name, number, target)
    return ExportResult(manifest, target, report.figures.get("parity_worst_case", ""),
                        report.figures["fp16_attempts"], report.figures["int8_attempts"],
                        time.monotonic() - started)


def model_source(config: RunConfig) -> ModelSource:
    if config.distillation is not None:
        return ModelSource(kind="distilled")
    if config.architecture == "pretrained":
        return ModelSource(kind="fine-tuned", base=str(config.model.get("base")))
    return ModelSource(kind="trained")


def build_manifest(run_dir: Path, config: RunConfig, name: str, version: int, labels: list[str],
                   directory: Path, report: GateReport, commit: str | None) -> Manifest:
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
                                max_length=config.tokenizer.max_length,
                                pad_id=config.pad_id),
        inputs=contract_inputs(),
        outputs=contract_outputs(len(labels)),
        artifacts=report.artifacts,
        evaluation=report.evaluation,
        evaluation_slice=report.evaluation_slice,
        compute=report.compute,
        source=model_source(config),
        distillation=(DistillationRecord.model_validate(metrics["distillation"])
                      if "distillation" in metrics else None),
        training=TrainingSummary(
            dataset=metrics["dataset"], epochs=metrics["epochs_run"], seed=config.seed,
            hyperparameters=hyperparameters, duration_seconds=metrics["duration_seconds"],
            test_accuracy=metrics["test"]["accuracy"], test_macro_f1=metrics["test"]["macro_f1"],
        ),
        created_at=datetime.now(UTC),
        source_commit=commit,
    )
