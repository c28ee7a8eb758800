"""Training the WordPiece tokenizer a model is trained, exported and served with."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from service.repo.tokenization import PAD_ID, PAD_TOKEN, UNK_TOKEN, TextTokenizer

# Order fixes the ids: [PAD] must be 0 to match every embedding's padding_idx.
SPECIAL_TOKENS = [PAD_TOKEN, UNK_TOKEN]


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train on the training split only, so no validation or test text leaks into the vocabulary."""
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN, max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.token_to_id(PAD_TOKEN) != PAD_ID:
        raise RuntimeError(f"{PAD_TOKEN} was not given id {PAD_ID}")
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path, *, max_length: int) -> TextTokenizer:
    """Save with truncation configured, and return the runtime wrapper reading that file back."""
    tokenizer.enable_truncation(max_length)
    tokenizer.save(str(path))
    return TextTokenizer.from_file(path, max_length)
