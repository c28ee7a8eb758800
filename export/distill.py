"""Distillation: what a run trained with ``--teacher`` does differently.

The student keeps its own tokenizer and architecture and trains on the transfer set (see
``export.transfer_set``) instead of the training split alone, minimising
``alpha * CE(gold) + (1 - alpha) * L(teacher)``, where the gold cross-entropy counts only the
texts that have a gold label and L is the mean squared error between logits (Tang et al. 2019)
or the KL divergence between probabilities softened at a temperature T, times T² (Hinton et
al. 2015). Validation and early stopping still use the gold labels of the validation split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.classification_metrics import classification_report
from export.config import DistillationConfig, RunConfig
from export.dataset_io import read_texts
from export.datasets import DatasetSplits
from export.teacher import Teacher, label_order, resolve_teacher
from export.transfer_set import NO_LABEL, TransferSet, build_transfer_set, label_with_teacher
from service.repo.manifest import sha256_file

log = logging.getLogger(__name__)

DISTILLATION_FILE = "distillation.json"


@dataclass
class DistillationData:
    teacher: Teacher
    transfer: TransferSet
    unlabelled_texts: list[str]
    from_cache: bool
    teacher_test_accuracy: float


def pin_unlabelled(config: RunConfig) -> RunConfig:
    """The unlabelled file's absolute path and sha256 in the run's config, as for the data."""
    distillation = config.distillation
    if distillation is None or distillation.unlabelled is None:
        return config
    path = Path(distillation.unlabelled.path).resolve()
    pinned = distillation.unlabelled.model_copy(
        update={"path": str(path), "sha256": sha256_file(path) if path.is_file() else None})
    return config.model_copy(update={"distillation": distillation.model_copy(
        update={"unlabelled": pinned})})


def prepare(config: RunConfig, splits: DatasetSplits, run_dir: Path, *,
            progress: bool) -> DistillationData:
    """The teacher (its labels checked against the data's), the transfer set with the
    teacher's logits, and the teacher's accuracy on the student's test split."""
    settings = config.distillation
    assert settings is not None
    teacher = resolve_teacher(settings.teacher, Path(settings.teacher_repository),
                              precision=settings.teacher_precision)
    columns = label_order(teacher.labels, splits.labels, teacher=settings.teacher,
                          data=splits.name)
    if teacher.dataset is not None and (same_source(teacher.dataset), teacher.seed) != (
            same_source(config.data.source), config.seed):
        log.warning("the teacher was trained on %s (seed %s), the student on %s (seed %s): "
                    "the teacher may have seen the student's test texts, which would "
                    "overstate its accuracy there (the student never sees them)",
                    teacher.dataset, teacher.seed, config.data.source, config.seed)
    unlabelled = read_unlabelled(settings)
    held_out = [text for text, _ in splits.validation] + [text for text, _ in splits.test]
    transfer = build_transfer_set(splits.train, held_out, settings.augmentation,
                                  seed=config.seed, unlabelled=unlabelled)
    log.info("transfer set: %d texts (%s), %d dropped as held-out", len(transfer),
             ", ".join(f"{n} {origin}" for origin, n in transfer.origins.items()),
             transfer.dropped_held_out)
    threads = config.training.threads
    from_cache = label_with_teacher(transfer, teacher, columns, run_dir, progress=progress,
                                    threads=threads)
    test_logits = teacher.logits([text for text, _ in splits.test], work_dir=run_dir,
                                 threads=threads)[:, columns]
    y_true = np.fromiter((label for _, label in splits.test), dtype=np.int64)
    accuracy = classification_report(y_true, test_logits.argmax(axis=1), splits.labels).accuracy
    return DistillationData(teacher, transfer, unlabelled, from_cache, accuracy)


def same_source(source: str) -> str:
    """A data source as comparable text: a built-in's name, a file's name (what a manifest
    records of the data it was trained on)."""
    return Path(source).name


def read_unlabelled(settings: DistillationConfig) -> list[str]:
    from export.dataset_io import DatasetError

    source = settings.unlabelled
    if source is None:
        return []
    path = Path(source.path)
    if source.sha256 is not None and path.is_file() and sha256_file(path) != source.sha256:
        raise DatasetError(f"{path}: not the unlabelled file the run was configured with")
    texts, blank = read_texts(path, fmt=source.format, text_column=source.text_column)
    if blank:
        log.info("%s: %d blank row(s) skipped", path, blank)
    if not texts:
        raise DatasetError(f"{path}: no texts in column {source.text_column!r}")
    return texts


class DistillationLoss(nn.Module):
    """The mixed loss over one batch of transfer-set rows."""

    def __init__(self, settings: DistillationConfig, teacher_logits: np.ndarray) -> None:
        super().__init__()
        self.settings = settings
        self.teacher_logits = torch.from_numpy(teacher_logits)

    def forward(self, logits: torch.Tensor, gold: torch.Tensor, rows: np.ndarray
                ) -> torch.Tensor:
        target = self.teacher_logits[torch.from_numpy(rows)].to(logits.device)
        if self.settings.loss == "mse":
            teacher_loss = nn.functional.mse_loss(logits, target)
        else:
            t = self.settings.temperature
            teacher_loss = nn.functional.kl_div(
                nn.functional.log_softmax(logits / t, dim=-1),
                nn.functional.log_softmax(target / t, dim=-1),
                reduction="batchmean", log_target=True) * t * t
        alpha = self.settings.alpha
        labelled = gold != NO_LABEL
        if alpha == 0 or not bool(labelled.any()):
            return (1 - alpha) * teacher_loss
        gold_loss = nn.functional.cross_entropy(logits[labelled], gold[labelled])
        return alpha * gold_loss + (1 - alpha) * teacher_loss


def record(config: RunConfig, data: DistillationData) -> dict:
    """What the manifest and ``metrics.json`` say about the teacher and the transfer set."""
    settings = config.distillation
    assert settings is not None
    augmentation = settings.augmentation
    return {
        "teacher": {**asdict(data.teacher.identity),
                    "test_accuracy": round(data.teacher_test_accuracy, 4)},
        "loss": settings.loss,
        "temperature": settings.temperature if settings.loss == "kl" else None,
        "alpha": settings.alpha,
        "transfer_set": {
            "texts": len(data.transfer), **data.transfer.origins,
            "dropped_held_out": data.transfer.dropped_held_out,
            "augmentation": (f"{augmentation.copies} copies per training text: mask "
                             f"p={augmentation.mask_probability}, context swap "
                             f"p={augmentation.swap_probability}, n-gram (n<="
                             f"{augmentation.max_ngram}) p={augmentation.ngram_probability}"),
            "unlabelled_file": settings.unlabelled.path if settings.unlabelled else None,
            "labels_from_cache": data.from_cache,
        },
    }


def write_record(run_dir: Path, value: dict) -> None:
    (run_dir / DISTILLATION_FILE).write_text(json.dumps(value, indent=2) + "\n", "utf-8")
