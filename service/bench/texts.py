"""Benchmark texts of a chosen length in tokens, cut from real dataset texts.

Sequence length is the axis the LSTM-vs-Transformer question turns on, so every text of a cell
must have (about) the cell's token count *by the model's own tokenizer*. Real sentences are
concatenated and cut at a token boundary rather than padded with filler, so the vocabulary mix
(and the tokenizer's work per token) is that of real traffic.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from service import defaults
from service.bench.errors import BenchError

DEFAULT_SOURCE = "rotten-tomatoes"
SYNTHETIC = "synthetic"
# Distinct texts per (tokenizer, length): enough that consecutive requests differ, few enough
# that building them stays well under a second.
VARIANTS = 64
_SYNTHETIC_TEXT = (
    "the film is a quietly moving story about two brothers and their father , but its slow "
    "pace and thin script leave the cast with little to do ; still , the photography is "
    "lovely and the ending earns its tears . a clumsy , overlong sequel that mistakes noise "
    "for wit and never finds a reason to exist beyond the box office"
)


@dataclass(frozen=True)
class TextSet:
    length: int  # tokens asked for
    texts: list[str]
    tokens: list[int]  # tokens per text by the model's tokenizer, before any truncation


def load_pool(source: str, warn: Callable[[str], None]) -> tuple[list[str], str]:
    """Source texts and the name of where they came from (``synthetic`` after a fallback).

    A built-in dataset that is not cached falls back to synthetic words with a warning (a
    benchmark should not start a download); a file that cannot be read is an error, because
    the user named it on purpose.
    """
    if source == SYNTHETIC:
        return _synthetic_pool(), SYNTHETIC
    from export.builtin_datasets import BUILTINS, is_cached
    from export.datasets import DatasetError, DatasetSpec, load_dataset

    builtin = source in BUILTINS
    if builtin and not is_cached(source):
        warn(f"dataset {source} is not cached (run `seqserve data fetch {source}`); "
             "using synthetic words, so token mixes differ from real reviews")
        return _synthetic_pool(), SYNTHETIC
    try:
        splits = load_dataset(DatasetSpec(source=source))
    except (DatasetError, OSError) as error:
        if not builtin:
            raise BenchError(f"--texts {source}: {error}", "data") from None
        warn(f"dataset {source} unavailable ({error}); using synthetic words")
        return _synthetic_pool(), SYNTHETIC
    # Test texts first (what the models were evaluated on); the others only top up small sets.
    texts = [text for split in (splits.test, splits.validation, splits.train)
             for text, _ in split if text.strip()]
    if not texts:
        raise BenchError(f"--texts {source}: no usable texts", "data")
    return texts, source if builtin else Path(source).name


def _synthetic_pool(count: int = 256, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    words = _SYNTHETIC_TEXT.split(" ")
    return [" ".join(rng.choices(words, k=rng.randint(8, 30))) for _ in range(count)]


class TextBuilder:
    """Builds and caches ``TextSet``s per tokenizer file, so models sharing a tokenizer get the
    very same texts."""

    def __init__(self, pool: list[str], seed: int = defaults.SEED,
                 variants: int = VARIANTS) -> None:
        self._pool = pool
        self._seed = seed
        self._variants = variants
        self._cache: dict[tuple[str, int], TextSet] = {}

    def build(self, tokenizer_file: Path | None, length: int) -> TextSet:
        key = (str(tokenizer_file), length)
        if key not in self._cache:
            rng = random.Random(self._seed * 1000 + length)
            if tokenizer_file is None:
                self._cache[key] = _by_words(self._pool, length, self._variants, rng)
            else:
                tokenizer = Tokenizer.from_file(str(tokenizer_file))
                # The saved tokenizer truncates at the model's max_length; here we want the
                # full text so lengths beyond it can be built (the server then truncates them).
                tokenizer.no_truncation()
                tokenizer.no_padding()
                self._cache[key] = _by_tokens(self._pool, tokenizer, length, self._variants, rng)
        return self._cache[key]


def _by_tokens(pool: list[str], tokenizer: Tokenizer, length: int, variants: int,
               rng: random.Random) -> TextSet:
    order = list(range(len(pool)))
    rng.shuffle(order)
    texts, counts = [], []
    cursor = 0
    for _ in range(variants):
        pieces: list[str] = []
        encoding = None
        # Each source text adds at least one token, so this ends within `length` pieces; the
        # second bound guards against a pool of texts that all tokenize to nothing.
        for _ in range(length + len(pool)):
            pieces.append(pool[order[cursor % len(order)]])
            cursor += 1
            encoding = tokenizer.encode(" ".join(pieces))
            if len(encoding.ids) >= length:
                break
        assert encoding is not None
        text = " ".join(pieces)
        if len(encoding.ids) > length:
            # Cut right after the length-th token's characters: a token boundary.
            text = text[: encoding.offsets[length - 1][1]]
        texts.append(text)
        counts.append(len(tokenizer.encode(text).ids))
    return TextSet(length, texts, counts)


def _by_words(pool: list[str], length: int, variants: int, rng: random.Random) -> TextSet:
    """Without the model's tokenizer (a remote server): about one token per word."""
    words = [word for text in pool for word in text.split()]
    texts = []
    for _ in range(variants):
        start = rng.randrange(len(words))
        texts.append(" ".join(words[(start + i) % len(words)] for i in range(length)))
    return TextSet(length, texts, [length] * len(texts))
