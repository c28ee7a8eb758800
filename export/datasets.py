"""Datasets for training: a spec names the source, `load_dataset` returns seeded, stratified splits.

A source is a built-in dataset (see `export.builtin_datasets`) or a CSV, TSV or JSONL file
(see `export.dataset_io`). Splits are stratified by label with numpy's seeded Generator, so a
run's config (which stores the spec) reproduces exactly the same train/validation/test texts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from export.builtin_datasets import (
    BUILTINS,
    BuiltinData,
    BuiltinInfo,
    fetch_builtin,
    list_builtin,
    load_builtin,
)
from export.dataset_io import DatasetError, Examples, read_examples
from service import defaults

__all__ = [
    "BuiltinInfo",
    "DatasetError",
    "DatasetSpec",
    "DatasetSplits",
    "fetch_builtin",
    "list_builtin",
    "load_dataset",
    "stratified_split",
]

Example = tuple[str, int]  # (text, label id)


class DatasetSpec(BaseModel):
    """Which data to train on and how to split it; stored in a run's config.json."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="built-in name (see `seqserve data list`) or a file path")
    text_column: str = Field("text", description="column (or JSON key) of the text; files only")
    label_column: str = Field("label", description="column (or JSON key) of the label; files only")
    format: Literal["auto", "csv", "tsv", "jsonl"] = Field(
        "auto", description="file format; auto picks it from the extension"
    )
    seed: int = defaults.SEED
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="ignored by built-ins that ship their own test split"
    )

    @model_validator(mode="after")
    def _leave_room_for_training(self) -> DatasetSpec:
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError("validation_fraction + test_fraction must be below 1")
        return self


@dataclass
class DatasetSplits:
    """Splits of (text, label id) pairs; `labels[i]` is the name of label id i (sorted)."""

    name: str
    labels: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    skipped_empty: int  # rows whose text was empty or whitespace
    skipped_unlabeled: int = 0  # rows with a text but an empty label

    def sizes(self) -> dict[str, int]:
        splits = {"train": self.train, "validation": self.validation, "test": self.test}
        return {split: len(examples) for split, examples in splits.items()}


def is_builtin_source(source: str) -> bool:
    """Whether `source` should be read as a built-in name rather than a path.

    Built-in names have no extension and no path separator; anything else is a path. A bare name
    that is neither a built-in nor an existing file gets the "unknown built-in" error, which lists
    the names, rather than "file not found".
    """
    if source in BUILTINS:
        return True
    path = Path(source)
    return not path.exists() and not path.suffix and len(path.parts) == 1


def load_dataset(spec: DatasetSpec, *, cache_dir: Path | str | None = None) -> DatasetSplits:
    """Read the spec's source and split it by label, reproducibly from `spec.seed`.

    Files are split into train/validation/test by the spec's fractions of all usable rows. A
    built-in with its own test split (20newsgroups) keeps it; validation is then carved out of
    its train file by `validation_fraction`, and `test_fraction` is ignored. `text_column`,
    `label_column` and `format` apply to files only.
    """
    if is_builtin_source(spec.source):
        name = spec.source
        data = load_builtin(name, cache_dir=cache_dir)
    else:
        path = Path(spec.source).expanduser()
        name = path.name
        examples = read_examples(
            path, fmt=spec.format, text_column=spec.text_column, label_column=spec.label_column
        )
        data = BuiltinData(examples=examples, test=None)
    pool, own_test = data.examples, data.test

    labels = sorted(set(pool.labels) | set(own_test.labels if own_test else []))
    _require_two_labels(spec.source, labels, pool)
    label_ids = {label: i for i, label in enumerate(labels)}
    pool_ids = [label_ids[label] for label in pool.labels]

    train_idx, validation_idx, test_idx = stratified_split(
        pool_ids,
        num_labels=len(labels),
        validation_fraction=spec.validation_fraction,
        test_fraction=0.0 if own_test is not None else spec.test_fraction,
        seed=spec.seed,
        label_names=labels,
    )

    def take(indices: np.ndarray) -> list[Example]:
        return [(pool.texts[i], pool_ids[i]) for i in indices.tolist()]

    if own_test is None:
        test = take(test_idx)
        skipped = [pool]
    else:
        pairs = zip(own_test.texts, own_test.labels, strict=True)
        test = [(text, label_ids[label]) for text, label in pairs]
        skipped = [pool, own_test]
    return DatasetSplits(
        name=name,
        labels=labels,
        train=take(train_idx),
        validation=take(validation_idx),
        test=test,
        skipped_empty=sum(e.skipped_empty for e in skipped),
        skipped_unlabeled=sum(e.skipped_unlabeled for e in skipped),
    )


def _require_two_labels(source: str, labels: list[str], examples: Examples) -> None:
    if not examples:
        raise DatasetError(
            f"{source} has no usable examples ({examples.skipped_empty} rows with an empty text, "
            f"{examples.skipped_unlabeled} without a label)"
        )
    if len(labels) < 2:
        raise DatasetError(
            f"{source} has a single label ({labels[0]!r}) across {len(examples)} examples; "
            "a classifier needs at least two"
        )


def stratified_split(
    label_ids: Sequence[int],
    *,
    num_labels: int,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    label_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the train, validation and test examples, stratified by label.

    Each split's size is the fraction of all examples, rounded; within it, each label gets its
    share of that size by the largest-remainder method, so label proportions match the whole
    set to within one example. Every label gets at least one example in every split with a
    non-zero fraction (and in train), or a `DatasetError` says which split is too small.
    Indices within each split are shuffled; the same seed always gives the same splits.
    """
    names = list(label_names) if label_names is not None else [str(i) for i in range(num_labels)]
    labels = np.asarray(label_ids, dtype=np.int64)
    sizes = np.bincount(labels, minlength=num_labels)
    fractions = {"validation": validation_fraction, "test": test_fraction}
    requested = [split for split, fraction in fractions.items() if fraction > 0]

    needed = 1 + len(requested)
    if (sizes < needed).any():
        label_id = int(np.argmin(sizes))
        raise DatasetError(
            f"label {names[label_id]!r} has {sizes[label_id]} example(s), too few to stratify "
            f"into {' / '.join(['train', *requested])} (needs at least {needed})"
        )

    counts = {split: np.zeros(num_labels, dtype=np.int64) for split in fractions}
    for split in requested:
        total = math.floor(len(labels) * fractions[split] + 0.5)
        if total < num_labels:
            raise DatasetError(
                f"{split} split too small to stratify: {split}_fraction {fractions[split]} of "
                f"{len(labels)} examples gives {total}, fewer than the {num_labels} labels; "
                f"raise {split}_fraction or use more data"
            )
        counts[split] = _apportion(sizes, total)
    train_counts = sizes - counts["validation"] - counts["test"]
    if (train_counts < 1).any():
        label_id = int(np.argmin(train_counts))
        raise DatasetError(
            f"label {names[label_id]!r} has {sizes[label_id]} examples, all taken by "
            "validation and test; lower validation_fraction/test_fraction or add data"
        )

    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for label_id in range(num_labels):
        members = rng.permutation(np.flatnonzero(labels == label_id))
        n_test, n_validation = counts["test"][label_id], counts["validation"][label_id]
        parts["test"].append(members[:n_test])
        parts["validation"].append(members[n_test : n_test + n_validation])
        parts["train"].append(members[n_test + n_validation :])
    # Shuffle across labels too, so no consumer ever sees the splits sorted by label.
    train, validation, test = (
        rng.permutation(np.concatenate(parts[split])) for split in ("train", "validation", "test")
    )
    return train, validation, test


def _apportion(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over labels in proportion to `sizes` (Hamilton's largest-remainder method),
    giving every label at least one. Assumes total >= number of labels."""
    fixed = np.zeros(len(sizes), dtype=bool)  # labels pinned at the minimum of one
    while True:
        budget = total - int(fixed.sum())
        free_sizes = np.where(fixed, 0, sizes)
        quotas = free_sizes * budget / max(int(free_sizes.sum()), 1)
        too_small = ~fixed & (quotas < 1)
        if not too_small.any():
            break
        fixed |= too_small
    counts = np.floor(quotas).astype(np.int64)
    counts[fixed] = 1
    leftover = budget - int(counts[~fixed].sum())
    # Largest remainders first; ties go to the lower label id, so the result is deterministic.
    free_ids = np.flatnonzero(~fixed)
    remainders = quotas[free_ids] - counts[free_ids]
    order = free_ids[np.lexsort((free_ids, -remainders))]
    counts[order[:leftover]] += 1
    return counts
