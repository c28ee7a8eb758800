"""Fine-tuning a pretrained encoder: what differs from training from scratch.

The run uses the base's own tokenizer (its vocabulary, special tokens, ``[CLS] … [SEP]``
post-processing and pad id) instead of a WordPiece vocabulary trained on the data, starts from
the base's weights, and records the base's Hugging Face config in the run's model config, so
export rebuilds the network without the base files. The training loop itself is the one every
architecture uses (length-bucketed batches, AdamW with warm-up, early stopping).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from export.config import TOKENIZER_FILE, RunConfig
from export.pretrained_bases import DEFAULT_BASE, check_base_directory, resolve_base
from models.pretrained import PretrainedClassifier, PretrainedConfig
from service.repo.tokenization import TextTokenizer

log = logging.getLogger(__name__)

PRETRAINED = "pretrained"
# RoBERTa-style position ids start after the pad id, so two positions of the table are not
# usable by tokens.
_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2}


def base_of(config: RunConfig) -> Path:
    return resolve_base(str(config.model.get("base", DEFAULT_BASE)))


def usable_max_length(encoder: dict[str, Any], requested: int) -> int:
    """``requested``, or less when the encoder's position table is shorter."""
    positions = encoder.get("max_position_embeddings")
    if positions is None:
        return requested
    return min(requested, int(positions) - _POSITION_OFFSET.get(encoder.get("model_type"), 0))


def base_tokenizer(base: Path, run_dir: Path, max_length: int, pad_id: int) -> TextTokenizer:
    """Copy the base's tokenizer into the run, truncating at ``max_length``."""
    tokenizer = Tokenizer.from_file(str(base / TOKENIZER_FILE))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    tokenizer.save(str(run_dir / TOKENIZER_FILE))
    return TextTokenizer.from_file(run_dir / TOKENIZER_FILE, max_length, pad_id)


def pretrained_model_config(config: RunConfig, base: Path, num_labels: int) -> dict[str, Any]:
    encoder = check_base_directory(base)
    unknown = sorted(set(config.model) - {"base"})
    if unknown:
        raise ValueError(f"unknown pretrained config keys: {', '.join(unknown)}; valid: base "
                         "(the encoder's own hyperparameters come from its config.json)")
    return {"vocab_size": int(encoder["vocab_size"]), "num_labels": num_labels,
            "pad_id": int(encoder.get("pad_token_id") or 0),
            "base": str(config.model.get("base", DEFAULT_BASE)), "encoder": encoder}


def prepare(config: RunConfig, run_dir: Path, num_labels: int
            ) -> tuple[TextTokenizer, dict[str, Any], RunConfig]:
    """The base's tokenizer (saved into the run), the model config, and the run config with
    its max length capped to what the encoder's positions allow."""
    base = base_of(config)
    model_config = pretrained_model_config(config, base, num_labels)
    max_length = usable_max_length(model_config["encoder"], config.tokenizer.max_length)
    if max_length < config.tokenizer.max_length:
        log.warning("max_length %d capped to %d (the encoder's position table)",
                    config.tokenizer.max_length, max_length)
        config = config.model_copy(update={"tokenizer": config.tokenizer.model_copy(
            update={"max_length": max_length})})
    tokenizer = base_tokenizer(base, run_dir, max_length, model_config["pad_id"])
    return tokenizer, model_config, config


def pretrained_model(config: RunConfig, model_config: dict[str, Any]) -> PretrainedClassifier:
    """The base's weights with a freshly initialised classification head."""
    return PretrainedClassifier.from_base(base_of(config), PretrainedConfig(**model_config))
