"""The training loop: dataset → tokenizer → model → run directory.

Batches are drawn from length buckets (shuffled, then sorted within large chunks) so the LSTM,
which pays for every padded step, sees little padding; early stopping keeps the best epoch by
validation accuracy.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from export import distill, fine_tune
from export.classification_metrics import ClassificationReport, classification_report
from export.config import (
    CURVE_FILE,
    LABELS_FILE,
    METRICS_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    RunConfig,
)
from export.datasets import DatasetSplits, is_builtin_source, load_dataset
from export.tokenizer import save_tokenizer, train_tokenizer
from models import create_model, default_config
from service.repo.manifest import sha256_file
from service.repo.tokenization import TextTokenizer, pad_batch

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 256
#: The loss of one batch: (logits, gold labels, the batch's row indices in the split).
Objective = Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]
# Shuffle, then sort by length within chunks this many batches long: batches of similar lengths
# while every epoch still sees a different order.
SORT_CHUNK_BATCHES = 50


@dataclass
class EncodedSplit:
    ids: list[list[int]]
    labels: np.ndarray
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    validation_loss: float
    validation_accuracy: float
    validation_macro_f1: float
    seconds: float


@dataclass
class TrainResult:
    run_dir: Path
    test: ClassificationReport
    best_epoch: int
    epochs_run: int
    duration_seconds: float
    history: list[EpochRecord] = field(default_factory=list)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode_split(tokenizer: TextTokenizer, examples: list[tuple[str, int]]) -> EncodedSplit:
    ids, _ = tokenizer.token_ids([text for text, _ in examples])
    return EncodedSplit(ids, np.fromiter((label for _, label in examples), dtype=np.int64),
                        tokenizer.pad_id)


def training_batches(
    split: EncodedSplit, batch_size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    order = rng.permutation(len(split))
    lengths = np.fromiter((len(row) for row in split.ids), dtype=np.int64, count=len(split))
    chunk = batch_size * SORT_CHUNK_BATCHES
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    for index in rng.permutation(len(batches)):
        yield batches[index]


def to_tensors(split: EncodedSplit, rows: np.ndarray, device: torch.device):
    batch = pad_batch([split.ids[i] for i in rows], pad_id=split.pad_id)
    return (
        torch.from_numpy(batch.input_ids).to(device),
        torch.from_numpy(batch.attention_mask).to(device),
        torch.from_numpy(split.labels[rows]).to(device),
    )


@torch.no_grad()
def predict(
    model: nn.Module, split: EncodedSplit, device: torch.device
) -> tuple[np.ndarray, float]:
    """Predicted label ids in the split's order, and the mean cross-entropy."""
    model.eval()
    lengths = np.fromiter((len(row) for row in split.ids), dtype=np.int64, count=len(split))
    order = np.argsort(lengths, kind="stable")
    predictions = np.empty(len(split), dtype=np.int64)
    total_loss = 0.0
    for start in range(0, len(order), EVAL_BATCH_SIZE):
        rows = order[start : start + EVAL_BATCH_SIZE]
        input_ids, attention_mask, labels = to_tensors(split, rows, device)
        logits = model(input_ids, attention_mask)
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        predictions[rows] = logits.argmax(dim=-1).cpu().numpy()
    return predictions, total_loss / max(len(split), 1)


def warmup_then_linear_decay(total_steps: int, warmup_fraction: float):
    warmup = max(1, math.ceil(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def pin_data_file(config: RunConfig) -> dict:
    """For a user's file: its absolute path and sha256, so the exporter evaluates on exactly
    the texts held out here, from any working directory, or refuses if the file changed."""
    if is_builtin_source(config.data.source):
        return {}
    path = Path(config.data.source).resolve()
    return {"data": config.data.model_copy(update={"source": str(path)}),
            "data_sha256": sha256_file(path)}


def scratch_tokenizer(config: RunConfig, splits: DatasetSplits, run_dir: Path,
                      extra_texts: Iterable[str] = ()) -> TextTokenizer:
    """A WordPiece vocabulary trained on the training split (and a distilled run's unlabelled
    texts), saved into the run."""
    tokenizer = train_tokenizer(
        [*(text for text, _ in splits.train), *extra_texts],
        vocab_size=config.tokenizer.vocab_size,
        min_frequency=config.tokenizer.min_frequency,
    )
    return save_tokenizer(tokenizer, run_dir / TOKENIZER_FILE,
                          max_length=config.tokenizer.max_length)


def train(config: RunConfig, run_dir: Path, *, progress: bool = True) -> TrainResult:
    """Train one model and write its run directory; returns the held-out test metrics."""
    started = time.monotonic()
    pretrained = config.architecture == fine_tune.PRETRAINED
    if not pretrained:
        check_model_parameters(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    seed_everything(config.seed)
    device = resolve_device(config.training.device)

    splits = load_dataset(config.data)
    config = distill.pin_unlabelled(config)
    teaching = (distill.prepare(config, splits, run_dir, progress=progress)
                if config.distillation else None)
    if pretrained:  # the base's tokenizer and encoder config; the max length it allows
        tokenizer, model_config, config = fine_tune.prepare(config, run_dir, len(splits.labels))
    else:
        tokenizer = scratch_tokenizer(config, splits, run_dir,
                                      teaching.unlabelled_texts if teaching else ())
        model_config = resolved_model_config(config, tokenizer.vocab_size, len(splits.labels))
    validation_split, test_split = (encode_split(tokenizer, split)
                                    for split in (splits.validation, splits.test))
    if teaching is None:
        train_split = encode_split(tokenizer, splits.train)
        objective = cross_entropy_objective(config.training.label_smoothing)
    else:
        train_split = EncodedSplit(tokenizer.token_ids(teaching.transfer.texts)[0],
                                   teaching.transfer.gold, tokenizer.pad_id)
        assert teaching.transfer.teacher_logits is not None and config.distillation
        objective = distill.DistillationLoss(config.distillation,
                                             teaching.transfer.teacher_logits)
    config.model_copy(update={"model": model_config, **pin_data_file(config)}).save(run_dir)
    (run_dir / LABELS_FILE).write_text(json.dumps(splits.labels, indent=2) + "\n", "utf-8")

    seed_everything(config.seed)
    model = (fine_tune.pretrained_model(config, model_config) if pretrained
             else create_model(config.architecture, model_config)).to(device)
    history, best_epoch, best_state = fit(model, config, train_split, validation_split,
                                          splits.labels, device, progress=progress,
                                          objective=objective)
    model.load_state_dict(best_state)
    torch.save(best_state, run_dir / WEIGHTS_FILE)
    predictions, _ = predict(model, test_split, device)
    test_report = classification_report(test_split.labels, predictions, splits.labels)
    result = TrainResult(run_dir, test_report, best_epoch, len(history),
                         time.monotonic() - started, history)
    distillation = distill.record(config, teaching) if teaching else None
    if distillation is not None:
        distill.write_record(run_dir, distillation)
    write_metrics(result, splits, device, distillation)
    plot_training_curve(history, run_dir, title=f"{config.architecture} on {splits.name}")
    return result


def check_model_parameters(config: RunConfig) -> None:
    """Reject unknown hyperparameters before any file is written (a throwaway 2-token model)."""
    create_model(config.architecture,
                 {**asdict(default_config(config.architecture, vocab_size=2, num_labels=2)),
                  **config.model, "vocab_size": 2, "num_labels": 2})


def resolved_model_config(config: RunConfig, vocab_size: int, num_labels: int) -> dict:
    """The architecture's defaults, the run's overrides, and the data's sizes on top."""
    model_config = asdict(default_config(config.architecture, vocab_size=vocab_size,
                                         num_labels=num_labels))
    model_config.update(config.model)
    model_config.update(vocab_size=vocab_size, num_labels=num_labels)
    return model_config


def cross_entropy_objective(label_smoothing: float) -> Objective:
    loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return lambda logits, labels, rows: loss(logits, labels)


def fit(model: nn.Module, config: RunConfig, train_split: EncodedSplit,
        validation_split: EncodedSplit, labels: list[str], device: torch.device, *,
        progress: bool, objective: Objective | None = None
        ) -> tuple[list[EpochRecord], int, dict]:
    """Epochs until ``epochs`` or early stopping; the history, best epoch and its weights."""
    hp = config.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate,
                                  weight_decay=hp.weight_decay)
    steps_per_epoch = math.ceil(len(train_split) / hp.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_linear_decay(steps_per_epoch * hp.epochs, hp.warmup_fraction))
    objective = objective or cross_entropy_objective(hp.label_smoothing)
    rng = np.random.default_rng(config.seed)
    history: list[EpochRecord] = []
    best_accuracy, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, hp.epochs + 1):
        epoch_started = time.monotonic()
        bar = tqdm(training_batches(train_split, hp.batch_size, rng), total=steps_per_epoch,
                   desc=f"{config.architecture} epoch {epoch}/{hp.epochs}", disable=not progress,
                   leave=False, unit="batch")
        train_loss = train_epoch(model, bar, train_split, optimizer, scheduler, objective,
                                 hp.grad_clip, device)
        predictions, validation_loss = predict(model, validation_split, device)
        report = classification_report(validation_split.labels, predictions, labels)
        record = EpochRecord(epoch, train_loss, validation_loss, report.accuracy,
                             report.macro_f1, time.monotonic() - epoch_started)
        history.append(record)
        log.info("%s epoch %d: train loss %.4f, validation accuracy %.4f (%.1fs)",
                 config.architecture, epoch, record.train_loss, record.validation_accuracy,
                 record.seconds)
        if record.validation_accuracy > best_accuracy:
            best_accuracy, best_epoch = record.validation_accuracy, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= hp.patience:
            log.info("early stop: no improvement for %d epochs", hp.patience)
            break
    assert best_state is not None
    return history, best_epoch, best_state


def train_epoch(model: nn.Module, batches: Any, split: EncodedSplit,
                optimizer: torch.optim.Optimizer, scheduler: Any, objective: Objective,
                grad_clip: float, device: torch.device) -> float:
    """One pass over ``batches`` (row index arrays); the mean training loss."""
    model.train()
    running_loss, seen = 0.0, 0
    for rows in batches:
        input_ids, attention_mask, labels = to_tensors(split, rows, device)
        optimizer.zero_grad(set_to_none=True)
        loss = objective(model(input_ids, attention_mask), labels, rows)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        running_loss += loss.item() * len(rows)
        seen += len(rows)
        if hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{running_loss / seen:.4f}")
    return running_loss / max(seen, 1)


def write_metrics(result: TrainResult, splits: DatasetSplits, device: torch.device,
                  distillation: dict | None = None) -> None:
    metrics = {
        "dataset": splits.name,
        "examples": {"train": len(splits.train), "validation": len(splits.validation),
                     "test": len(splits.test), "skipped_empty": splits.skipped_empty},
        "device": str(device),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "duration_seconds": round(result.duration_seconds, 2),
        "test": result.test.to_dict(),
        "history": [asdict(record) for record in result.history],
        **({"distillation": distillation} if distillation else {}),
    }
    path = result.run_dir / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def plot_training_curve(history: list[EpochRecord], run_dir: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axis.plot(epochs, [r.train_loss for r in history], marker="o", label="train")
    loss_axis.plot(epochs, [r.validation_loss for r in history], marker="o", label="validation")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_axis.legend()
    accuracy_axis.plot(epochs, [r.validation_accuracy for r in history], marker="o",
                       label="accuracy")
    accuracy_axis.plot(epochs, [r.validation_macro_f1 for r in history], marker="o",
                       label="macro-F1")
    accuracy_axis.set(xlabel="epoch", title="validation")
    accuracy_axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(run_dir / CURVE_FILE, dpi=100)
    plt.close(figure)
