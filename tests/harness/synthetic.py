"""A small, trivially separable dataset: tests train real models on it in seconds."""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path

POSITIVE_WORDS = ["great", "wonderful", "brilliant", "superb", "delightful", "moving", "fun"]
NEGATIVE_WORDS = ["awful", "boring", "dreadful", "tedious", "terrible", "clumsy", "dull"]
NEUTRAL_WORDS = ["average", "ordinary", "passable", "middling", "fair", "okay", "mixed"]
WORDS_BY_LABEL = {"pos": POSITIVE_WORDS, "positive": POSITIVE_WORDS, "neg": NEGATIVE_WORDS,
                  "negative": NEGATIVE_WORDS, "neutral": NEUTRAL_WORDS}
FILLER = ["the", "film", "was", "a", "plot", "actors", "really", "story", "and", "quite", "it"]


def separable_texts(count: int, seed: int = 0,
                    labels: Sequence[str] = ("pos", "neg")) -> list[tuple[str, str]]:
    """(text, label) pairs; the label is decided by which word list a text draws from, and
    lengths vary from 3 to ~40 words so padding is exercised."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        label = labels[index % len(labels)]
        words = WORDS_BY_LABEL[label]
        length = rng.choice([3, 5, 8, 12, 20, 40])
        tokens = [rng.choice(FILLER) for _ in range(length)]
        for _ in range(max(1, length // 4)):
            tokens[rng.randrange(length)] = rng.choice(words)
        rows.append((" ".join(tokens), label))
    return rows


def write_separable_csv(path: Path, count: int = 600, *, text_column: str = "review",
                        label_column: str = "sentiment", seed: int = 0,
                        labels: Sequence[str] = ("pos", "neg")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", text_column, label_column])
        for index, (text, label) in enumerate(separable_texts(count, seed, labels)):
            writer.writerow([index, text, label])
    return path


TINY_MODEL_PARAMS = {
    "lstm": {"embed_dim": 16, "hidden_dim": 16},
    "transformer": {"d_model": 16, "num_heads": 2, "num_layers": 1, "ff_dim": 32},
    "bow": {"embed_dim": 16},
}


def tiny_encoder(vocab_size: int) -> dict:
    """The model config of a tiny randomly initialised BERT for ``-a pretrained`` (no base
    directory: what a run directory records, rebuilt with ``from_config``)."""
    return {"base": "tiny-bert", "encoder": {
        "model_type": "bert", "vocab_size": vocab_size, "hidden_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 128, "pad_token_id": 0}}


def tiny_param_flags(architecture: str) -> list[str]:
    flags = []
    for key, value in TINY_MODEL_PARAMS[architecture].items():
        flags += ["--model-param", f"{key}={value}"]
    return flags
