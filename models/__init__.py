"""The classifier architectures and a registry to build them by name.

Every architecture maps `input_ids`, `attention_mask` (int64 `[B, T]`, right-padded with the
tokenizer's pad id) to `logits` (float32 `[B, num_labels]`), and padding never changes a row's
logits, so training, export and serving treat them all alike.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from torch import nn

from models.bow import BowClassifier, BowConfig
from models.lstm import LSTMClassifier, LSTMConfig
from models.pretrained import PretrainedClassifier, PretrainedConfig
from models.transformer import TransformerClassifier, TransformerConfig

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "lstm": LSTMClassifier,
    "transformer": TransformerClassifier,
    "bow": BowClassifier,
    "pretrained": PretrainedClassifier,
}

CONFIGS: dict[str, type] = {
    "lstm": LSTMConfig,
    "transformer": TransformerConfig,
    "bow": BowConfig,
    "pretrained": PretrainedConfig,
}

__all__ = [
    "ARCHITECTURES",
    "CONFIGS",
    "BowClassifier",
    "BowConfig",
    "LSTMClassifier",
    "LSTMConfig",
    "PretrainedClassifier",
    "PretrainedConfig",
    "TransformerClassifier",
    "TransformerConfig",
    "create_model",
    "default_config",
]


def _config_class(architecture: str) -> type:
    if architecture not in CONFIGS:
        valid = ", ".join(sorted(CONFIGS))
        raise ValueError(f"unknown architecture {architecture!r}; valid: {valid}")
    return CONFIGS[architecture]


def default_config(architecture: str, *, vocab_size: int, num_labels: int) -> Any:
    """The default hyperparameters of `architecture` for this vocabulary and label count."""
    return _config_class(architecture)(vocab_size=vocab_size, num_labels=num_labels)


def create_model(architecture: str, config: dict[str, Any]) -> nn.Module:
    """Build `architecture` from a config dict (`dataclasses.asdict` of its config class).

    Unknown keys are an error rather than ignored: a typo in a run's config.json would otherwise
    silently train (or export) a model with a default in its place.
    """
    config_class = _config_class(architecture)
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"unknown {architecture} config keys: {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(known))}"
        )
    try:
        cfg = config_class(**config)
    except TypeError as e:  # a missing required field such as vocab_size
        raise ValueError(f"bad {architecture} config: {e}") from None
    return ARCHITECTURES[architecture](cfg)
