"""Tokenization stops at max_length: a long text is tokenized from a prefix, and the ids and
truncation flags are exactly those of tokenizing the whole text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from harness.tiny_pretrained import save_tiny_encoder
from tokenizers import Tokenizer

from export.datasets import DatasetSpec, load_dataset
from export.pretrained_bases import resolve_base
from service.repo.tokenization import CHARS_PER_TOKEN_BOUND, TextTokenizer


def _whole(path: Path, max_length: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer


def _same_as_whole(path: Path, texts: list[str], max_length: int, pad_id: int = 0) -> None:
    bounded = TextTokenizer.from_file(path, max_length, pad_id)
    ids, truncated = bounded.token_ids(texts)
    whole = _whole(path, max_length).encode_batch(texts)
    assert [row for row in ids] == [enc.ids or row for enc, row in zip(whole, ids, strict=True)]
    assert truncated == [bool(enc.overflowing) for enc in whole]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory, tiny_repository: Path) -> dict:
    roberta = save_tiny_encoder(tmp_path_factory.mktemp("bpe") / "roberta", "roberta")
    return {"wordpiece trained here": (tiny_repository / "tiny-lstm/1/tokenizer.json", 0),
            "MiniLM WordPiece": (resolve_base("minilm-l6") / "tokenizer.json", 0),
            "byte-level BPE": (roberta / "tokenizer.json", 1)}


@pytest.mark.parametrize("name", ["wordpiece trained here", "MiniLM WordPiece",
                                  "byte-level BPE"])
def test_long_real_documents_tokenize_exactly_as_whole(tokenizers, name) -> None:
    path, pad_id = tokenizers[name]
    documents = [text for text, _ in load_dataset(DatasetSpec(source="20newsgroups")).test]
    long = [text for text in documents if len(text) > 64 * CHARS_PER_TOKEN_BOUND][:400]
    assert len(long) == 400
    for max_length in (64, 256):
        _same_as_whole(path, long, max_length, pad_id)


@pytest.mark.parametrize("name", ["wordpiece trained here", "MiniLM WordPiece",
                                  "byte-level BPE"])
def test_awkward_long_texts_tokenize_exactly_as_whole(tokenizers, name) -> None:
    path, pad_id = tokenizers[name]
    rng = random.Random(5)
    words = ["the", "Film", "naïve", "café", "東京", "😀", "don't", "x" * 300, "3.14", "—"]
    texts = [
        " ".join(rng.choice(words) for _ in range(2000)),  # mixed scripts and a huge word
        "\n\t".join(rng.choice(words) for _ in range(1500)),  # other whitespace
        "y" * 5000,  # no whitespace at all: tokenized whole
        " " * 3000 + "good film " * 400,  # the cut point inside leading whitespace
        "good " * 100,  # short: never cut
    ]
    _same_as_whole(path, texts, 32, pad_id)
