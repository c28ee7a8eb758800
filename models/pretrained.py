"""A pretrained Transformer encoder with a classification head (Hugging Face ``transformers``).

    h        = Encoder(ids, mask, token_type = 0)      BERT, DistilBERT, RoBERTa, MiniLM, ELECTRA
    logits   = Head(h_[CLS])                           the family's own sequence-classification head

A thin wrapper over ``AutoModelForSequenceClassification``: what makes it one of this project's
architectures is the contract it keeps, ``(input_ids, attention_mask) -> logits``. Families that
take ``token_type_ids`` get a zero tensor built inside the graph, so the exported model has the
same two inputs as every other architecture. The checkpoint's own tokenizer supplies the ids
and its pad id (0 for WordPiece, 1 for RoBERTa-style BPE); RoBERTa derives its position ids from
that pad id, which is why padding must use it.

The Hugging Face config of the encoder is kept in this module's config (``encoder``), so a run
directory rebuilds the model from ``config.json`` + ``model.pt`` alone, without the base files.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class PretrainedConfig:
    vocab_size: int
    num_labels: int
    pad_id: int = 0
    base: str = ""  # the pretrained base the weights started from (a name or a directory)
    encoder: dict[str, Any] = field(default_factory=dict)  # the Hugging Face config.json


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - the train extra always has it
        raise ImportError("the pretrained architecture needs transformers: "
                          "pip install 'seqserve[train]'") from error
    # "Some weights are newly initialized" is expected for a new head; the weight-loading bar is
    # noise next to the training progress bar.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def encoder_config(directory: Path) -> dict[str, Any]:
    """The Hugging Face config.json of a checkpoint directory, as a dict."""
    return json.loads((directory / "config.json").read_text(encoding="utf-8"))


class PretrainedClassifier(nn.Module):
    def __init__(self, config: PretrainedConfig, model: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        if model is None:
            transformers = _transformers()
            hf_config = transformers.AutoConfig.for_model(**self._hf_config_values())
            # Eager attention: one plain MatMul/Softmax graph that exports and converts to
            # fp16/int8 the same way for every family (SDPA kernels vary by version).
            model = transformers.AutoModelForSequenceClassification.from_config(
                hf_config, attn_implementation="eager")
        self.model = model
        self._token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def _hf_config_values(self) -> dict[str, Any]:
        values = dict(self.config.encoder)
        values.update(num_labels=self.config.num_labels, pad_token_id=self.config.pad_id)
        values.pop("architectures", None)
        return values

    @classmethod
    def from_base(cls, directory: Path, config: PretrainedConfig) -> PretrainedClassifier:
        """The base's pretrained weights with a new head of ``config.num_labels`` outputs."""
        transformers = _transformers()
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(directory), num_labels=config.num_labels, attn_implementation="eager",
            ignore_mismatched_sizes=True)
        return cls(config, model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._token_types:
            # One segment: the exported graph builds the zeros itself.
            inputs["token_type_ids"] = torch.zeros_like(input_ids)
        return self.model(**inputs).logits
