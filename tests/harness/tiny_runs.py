"""Real, quickly trained tiny runs (seconds each) for the export and serving tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from export.config import default_run_config
from export.datasets import DatasetSpec
from harness.synthetic import TINY_MODEL_PARAMS, write_separable_csv


def train_tiny_run(root: Path, architecture: str, *, rows: int = 600, epochs: int = 6,
                   labels: Sequence[str] = ("pos", "neg"), max_length: int = 48,
                   name: str | None = None, base: Path | None = None,
                   learning_rate: float = 0.02) -> Path:
    """Train a tiny model on the separable dataset into ``root/<name or architecture>``;
    ``-a pretrained`` fine-tunes the encoder directory ``base``."""
    from export.train import train

    run_dir = root / (name or architecture)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = write_separable_csv(run_dir.with_suffix(".csv"), count=rows, labels=labels)
    spec = DatasetSpec(source=str(data), text_column="review", label_column="sentiment")
    config = default_run_config(
        architecture, spec,
        model={"base": str(base)} if base is not None else TINY_MODEL_PARAMS[architecture],
        tokenizer={"vocab_size": 300, "max_length": max_length},
        training={"epochs": epochs, "patience": epochs, "learning_rate": learning_rate,
                  "threads": 1},
    )
    train(config, run_dir, progress=False)
    return run_dir
