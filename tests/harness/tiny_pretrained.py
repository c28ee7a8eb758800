"""Tiny, randomly initialised Hugging Face encoders saved as real model directories.

No download: a tokenizer is trained on the synthetic vocabulary with the family's own special
tokens and post-processing ([CLS] … [SEP] with [PAD] = 0 for BERT; <s> … </s> with <pad> = 1
for RoBERTa), and a 2-layer model of that family is saved with ``save_pretrained``. A base has
only the encoder; a classifier directory has the sequence-classification head and ``id2label``,
as a team's fine-tuned checkpoint would.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harness.synthetic import FILLER, NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS

_WORDS = FILLER + POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS
_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _bert_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator([" ".join(_WORDS)] * 4, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=specials, show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tokenizer


def _roberta_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tokenizer.train_from_iterator([" ".join(_WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tokenizer


def _config(family: str, vocab_size: int, labels: Sequence[str] | None):
    import transformers

    extra = {}
    if labels is not None:
        extra = dict(id2label=dict(enumerate(labels)),
                     label2id={label: i for i, label in enumerate(labels)})
    if family == "bert":
        return transformers.BertConfig(vocab_size=vocab_size, max_position_embeddings=64,
                                       pad_token_id=0, **_SIZES, **extra)
    return transformers.RobertaConfig(vocab_size=vocab_size, max_position_embeddings=66,
                                      pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                      **_SIZES, **extra)


def save_tiny_encoder(directory: Path, family: str = "bert", *,
                      labels: Sequence[str] | None = None, seed: int = 0) -> Path:
    """A base encoder (``labels`` None) or a classifier checkpoint, saved into ``directory``."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    tokenizer = _bert_tokenizer() if family == "bert" else _roberta_tokenizer()
    config = _config(family, tokenizer.get_vocab_size(), labels)
    torch.manual_seed(seed)
    model = (transformers.AutoModel.from_config(config) if labels is None
             else transformers.AutoModelForSequenceClassification.from_config(config))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory
