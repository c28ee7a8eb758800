"""The transfer set a student is distilled on: the training texts, augmented copies of them and
the user's unlabelled texts, each with the teacher's logits.

Augmentation follows Tang et al. 2019 ("Distilling Task-Specific Knowledge from BERT into Simple
Neural Networks"): each word of a copy is, with some probability, masked (``[UNK]``, which every
tokenizer here maps to its unknown token) or swapped; then, with some probability, the copy is
cut to one of its n-grams. Tang et al. swap a word for another of the same part of speech; with
no tagger here, a word is swapped for one that follows the same preceding word somewhere in the
training texts — words that share a left context mostly share a part of speech.

Only the training split feeds it (and the user's texts): a text of the validation or test split
that turns up, whether in the user's file or made by augmentation, is dropped, so neither the
gold labels nor the teacher's reading of a held-out text reach the student. The teacher's
logits are cached in the run directory under the teacher's sha256 and the texts' digest: a
rerun with the same teacher and texts does not label again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from export.config import AugmentationConfig
from export.teacher import Teacher, TeacherIdentity
from service.repo.tokenization import UNK_TOKEN

log = logging.getLogger(__name__)

CACHE_FILE = "transfer_set.jsonl"
CACHE_DECIMALS = 5
#: Gold label of a text that has none (an augmented copy, a user's unlabelled text).
NO_LABEL = -1


@dataclass
class TransferSet:
    texts: list[str]
    gold: np.ndarray  # int64 label ids, NO_LABEL where the text has none
    origins: dict[str, int] = field(default_factory=dict)  # training / augmented / unlabelled
    dropped_held_out: int = 0
    teacher_logits: np.ndarray | None = None  # float32 [texts, labels], the student's order

    def __len__(self) -> int:
        return len(self.texts)

    def digest(self) -> str:
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode("utf-8"))
            digest.update(b"\0")
        return digest.hexdigest()


class Augmenter:
    """Augmented copies of texts, from a seeded generator (the same texts on every rerun)."""

    def __init__(self, training_texts: list[str], settings: AugmentationConfig,
                 rng: np.random.Generator) -> None:
        self.settings = settings
        self.rng = rng
        followers: dict[str, list[str]] = defaultdict(list)
        vocabulary: list[str] = []
        for text in training_texts:
            words = text.split()
            vocabulary.extend(words)
            for previous, word in pairwise(words):
                followers[previous].append(word)
        self._followers = dict(followers)
        self._vocabulary = vocabulary

    def copy(self, text: str) -> str:
        words = text.split()
        draws = self.rng.random(len(words))
        mask, swap = self.settings.mask_probability, self.settings.swap_probability
        out = []
        for index, (word, draw) in enumerate(zip(words, draws, strict=True)):
            if draw < mask:
                out.append(UNK_TOKEN)
            elif draw < mask + swap:
                out.append(self._swap(words[index - 1] if index else None, word))
            else:
                out.append(word)
        if out and self.rng.random() < self.settings.ngram_probability:
            n = int(self.rng.integers(1, min(self.settings.max_ngram, len(out)) + 1))
            start = int(self.rng.integers(0, len(out) - n + 1))
            out = out[start : start + n]
        return " ".join(out)

    def _swap(self, previous: str | None, word: str) -> str:
        candidates = self._followers.get(previous, ()) if previous is not None else ()
        if len(candidates) < 2:
            candidates = self._vocabulary
        if not candidates:
            return word
        return candidates[int(self.rng.integers(0, len(candidates)))]


def build_transfer_set(training: list[tuple[str, int]], held_out: Iterable[str],
                       settings: AugmentationConfig, *, seed: int,
                       unlabelled: list[str] = ()) -> TransferSet:
    """The training texts with their gold labels, then ``settings.copies`` distinct augmented
    copies of each (no duplicates of any text already in the set), then the unlabelled texts;
    anything equal to a held-out text is dropped."""
    held = set(held_out)
    seen: set[str] = set()
    texts: list[str] = []
    gold: list[int] = []
    dropped = 0

    def add(text: str, label: int) -> bool:
        nonlocal dropped
        if not text.strip() or text in seen:
            return False
        if text in held:
            dropped += 1
            return False
        seen.add(text)
        texts.append(text)
        gold.append(label)
        return True

    for text, label in training:
        add(text, label)
    origins = {"training": len(texts)}
    augmenter = Augmenter([text for text, _ in training], settings,
                          np.random.default_rng(seed))
    before = len(texts)
    for _ in range(settings.copies):
        for text, _ in training:
            add(augmenter.copy(text), NO_LABEL)
    origins["augmented"] = len(texts) - before
    before = len(texts)
    for text in unlabelled:
        add(text, NO_LABEL)
    origins["unlabelled"] = len(texts) - before
    if dropped:
        log.info("transfer set: %d text(s) equal to a validation or test text dropped", dropped)
    return TransferSet(texts, np.array(gold, dtype=np.int64), origins, dropped)


def label_with_teacher(transfer: TransferSet, teacher: Teacher, columns: np.ndarray,
                       run_dir: Path, *, progress: bool, threads: int | None = None) -> bool:
    """Fill ``transfer.teacher_logits`` (in the student's label order, ``columns`` picking the
    teacher's), from the run's cache when it was made by this teacher for these texts; True
    when the cache answered."""
    cache = run_dir / CACHE_FILE
    digest = transfer.digest()
    cached = read_cache(cache, teacher.identity, digest, len(transfer), columns)
    if cached is not None:
        log.info("transfer set: the teacher's logits for %d texts read from %s",
                 len(transfer), cache)
        transfer.teacher_logits = cached
        return True
    logits = teacher.logits(transfer.texts, work_dir=run_dir, threads=threads,
                            progress=progress)
    write_cache(cache, transfer, logits[:, columns], columns, teacher.identity, digest)
    # Read back, so this run trains on exactly the (rounded) numbers a rerun reads.
    transfer.teacher_logits = read_cache(cache, teacher.identity, digest, len(transfer),
                                         columns)
    return False


def _header(identity: TeacherIdentity, digest: str, size: int, columns: np.ndarray) -> dict:
    return {"teacher_sha256": identity.sha256, "teacher_precision": identity.precision,
            "texts_sha256": digest, "texts": size, "teacher_columns": columns.tolist()}


def read_cache(path: Path, identity: TeacherIdentity, digest: str, size: int,
               columns: np.ndarray) -> np.ndarray | None:
    """The cached logits if ``path`` was written for this teacher and these texts, else None."""
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as handle:
        try:
            header = json.loads(handle.readline())
            if header != _header(identity, digest, size, columns):
                log.info("transfer set: %s was made by another teacher or for other texts; "
                         "labelling again", path)
                return None
            logits = np.asarray([json.loads(line)["teacher_logits"] for line in handle],
                                dtype=np.float32)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("transfer set: %s is damaged; labelling again", path)
            return None
    return logits if logits.shape == (size, len(columns)) else None


def write_cache(path: Path, transfer: TransferSet, logits: np.ndarray, columns: np.ndarray,
                identity: TeacherIdentity, digest: str) -> None:
    """One JSON line of what made it, then one line per text: a file a person can read."""
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(_header(identity, digest, len(transfer), columns)) + "\n")
        for text, gold, row in zip(transfer.texts, transfer.gold.tolist(),
                                      logits.tolist(), strict=True):
            handle.write(json.dumps({"text": text, "gold": None if gold == NO_LABEL else gold,
                                     "teacher_logits": [round(v, CACHE_DECIMALS) for v in row]})
                         + "\n")
    partial.replace(path)
