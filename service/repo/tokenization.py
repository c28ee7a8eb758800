"""Turning texts into the ``input_ids`` / ``attention_mask`` pair every architecture takes.

The same code runs at evaluation time in the exporter and at serving time, so a model is served
with exactly the token ids it was evaluated on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
PAD_ID = 0
# The pad tokens of WordPiece (BERT) and BPE (RoBERTa) vocabularies.
PAD_TOKENS = (PAD_TOKEN, "<pad>")
# encode_batch hands texts to the tokenizer's thread pool: worth it from about this many texts.
# Below, waking the pool costs more than it saves (measured ~10x slower for one text on a busy
# 2-core server, where ORT and gRPC threads hold the cores).
PARALLEL_ENCODE_MIN_TEXTS = 8
# Characters per token above which a prefix of a text is very likely to hold max_length
# tokens already (English WordPiece averages ~4.5); a prefix that does not is redone whole.
CHARS_PER_TOKEN_BOUND = 8


@dataclass(frozen=True)
class EncodedBatch:
    """Right-padded to the longest row of this batch (not to max_length)."""

    input_ids: np.ndarray  # int64 [batch, sequence]
    attention_mask: np.ndarray  # int64 [batch, sequence]
    lengths: np.ndarray  # int64 [batch]
    truncated: np.ndarray  # bool [batch]

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)


class TextTokenizer:
    """A ``tokenizers`` tokenizer that truncates to ``max_length`` and pads with ``pad_id``.

    Its own special tokens and post-processing ([CLS] ... [SEP], <s> ... </s>) are kept: a model
    is served with exactly the token ids it was trained and evaluated on.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_id: int = PAD_ID) -> None:
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad id {pad_id} is outside the tokenizer's vocabulary "
                             f"(size {vocab_size})")
        named = {token: found for token in PAD_TOKENS
                 if (found := tokenizer.token_to_id(token)) is not None}
        if named and pad_id not in named.values():
            raise ValueError(f"pad id {pad_id} is not the tokenizer's pad token ("
                             + ", ".join(f"{token} = {i}" for token, i in named.items()) + ")")
        self.max_length = max_length
        self.pad_id = pad_id
        self._char_bound = max_length * CHARS_PER_TOKEN_BOUND
        self._unk_id = unknown_token_id(tokenizer, fallback=pad_id)
        self._tokenizer = tokenizer
        # Padding is done here in numpy; the tokenizer only truncates.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)

    @classmethod
    def from_file(cls, path: Path, max_length: int, pad_id: int = PAD_ID) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)), max_length, pad_id)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def token_ids(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text (truncated to max_length) and whether each was truncated.

        A long text is tokenized from a prefix cut at a whitespace after ``max_length *
        CHARS_PER_TOKEN_BOUND`` characters: pre-tokenizers split words at whitespace and
        normalise character by character, so the prefix's first tokens are the whole text's,
        and once the prefix alone overflows ``max_length`` its truncated ids are exactly the
        whole text's (a prefix that does not overflow is redone from the whole text). So a
        6,000-character document costs what 256 tokens cost.
        """
        bounded = [self._prefix(text) for text in texts]
        encodings = self._encode(bounded)
        redo = [i for i, (text, enc) in enumerate(zip(bounded, encodings, strict=True))
                if text is not texts[i] and not enc.overflowing]
        if redo:
            for i, enc in zip(redo, self._encode([texts[i] for i in redo]), strict=True):
                encodings[i] = enc
        # A text made only of characters the normaliser strips still needs one token: every
        # architecture pools over at least one real position.
        ids = [enc.ids or [self._unk_id] for enc in encodings]
        truncated = [bool(enc.overflowing) for enc in encodings]
        return ids, truncated

    def _encode(self, texts: list[str]) -> list:
        # encode_batch_fast skips character offsets (unused here): ~24 us instead of ~39 us for
        # one short text. Small requests are encoded one by one: handing a few texts to the
        # tokenizer's thread pool costs more than it saves on a busy server.
        if len(texts) < PARALLEL_ENCODE_MIN_TEXTS:
            return [self._tokenizer.encode_batch_fast([text])[0] for text in texts]
        return self._tokenizer.encode_batch_fast(texts)

    def _prefix(self, text: str) -> str:
        """``text`` itself, or for a long one a prefix ending before a whitespace."""
        if len(text) <= self._char_bound:
            return text
        cut = max(text.rfind(" ", 0, self._char_bound), text.rfind("\n", 0, self._char_bound),
                  text.rfind("\t", 0, self._char_bound))
        return text[:cut] if cut > 0 else text

    def encode_batch(self, texts: list[str]) -> EncodedBatch:
        ids, truncated = self.token_ids(texts)
        return pad_batch(ids, truncated, pad_id=self.pad_id)


def unknown_token_id(tokenizer: Tokenizer, *, fallback: int) -> int:
    """The id of the tokenizer model's unknown token ([UNK], <unk>), else ``fallback``."""
    for token in (getattr(tokenizer.model, "unk_token", None), UNK_TOKEN, "<unk>"):
        if token and (found := tokenizer.token_to_id(token)) is not None:
            return found
    return fallback


def pad_batch(ids: list[list[int]], truncated: list[bool] | None = None, *,
              pad_id: int = PAD_ID) -> EncodedBatch:
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    width = int(lengths.max()) if len(ids) else 0
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    for row, tokens in enumerate(ids):
        input_ids[row, : len(tokens)] = tokens
    attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    flags = np.asarray(truncated if truncated is not None else [False] * len(ids), dtype=bool)
    return EncodedBatch(input_ids, attention_mask, lengths, flags)
