"""The transfer set: augmentation as documented, the no-leak rule, and the teacher's cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.config import AugmentationConfig, DistillationConfig
from export.distill import DistillationLoss
from export.teacher import Teacher, TeacherError, TeacherIdentity, label_order
from export.transfer_set import (
    CACHE_FILE,
    NO_LABEL,
    Augmenter,
    build_transfer_set,
    label_with_teacher,
)
from service.repo.tokenization import UNK_TOKEN

TRAINING = [(f"the film was {word} and the plot was {other}", index % 2)
            for index, (word, other) in enumerate(
                [("great", "fun"), ("dull", "slow"), ("moving", "tight"), ("awful", "thin"),
                 ("superb", "clever"), ("boring", "long")] * 5)]


def test_augmented_words_are_masks_or_training_words():
    settings = AugmentationConfig(copies=1, mask_probability=0.3, swap_probability=0.3,
                                  ngram_probability=0.0)
    augmenter = Augmenter([t for t, _ in TRAINING], settings, np.random.default_rng(0))
    vocabulary = {w for t, _ in TRAINING for w in t.split()}
    copies = [augmenter.copy(text) for text, _ in TRAINING for _ in range(20)]
    words = [w for copy in copies for w in copy.split()]
    assert set(words) <= vocabulary | {UNK_TOKEN}
    masked = words.count(UNK_TOKEN) / len(words)
    assert 0.2 < masked < 0.4, masked  # p = 0.3 per word
    assert sum(c != t for c, (t, _) in zip(copies[::20], TRAINING, strict=True)) > 0


def test_ngram_sampling_cuts_copies_to_at_most_max_ngram_words():
    settings = AugmentationConfig(copies=1, mask_probability=0.0, swap_probability=0.0,
                                  ngram_probability=1.0, max_ngram=3)
    augmenter = Augmenter([t for t, _ in TRAINING], settings, np.random.default_rng(0))
    for text, _ in TRAINING:
        copy = augmenter.copy(text)
        assert 1 <= len(copy.split()) <= 3 and copy in text


def test_same_seed_same_transfer_set_and_gold_only_on_training_texts():
    settings = AugmentationConfig(copies=3)
    first = build_transfer_set(TRAINING, [], settings, seed=5)
    second = build_transfer_set(TRAINING, [], settings, seed=5)
    assert first.texts == second.texts and first.digest() == second.digest()
    assert len(set(first.texts)) == len(first.texts)  # no text twice
    gold = dict(TRAINING)
    for text, label in zip(first.texts, first.gold.tolist(), strict=True):
        assert label == gold.get(text, NO_LABEL)
    assert first.origins["training"] == len(gold)
    assert first.origins["augmented"] == len(first) - len(gold) > len(gold)


def test_no_held_out_text_reaches_the_transfer_set():
    """A validation or test text is dropped wherever it comes from: the training split (a
    duplicate across splits), augmentation (an n-gram equal to a short test text) or the
    user's unlabelled file."""
    held_out = ["the film was great", "dull", "the plot was thin", TRAINING[0][0]]
    settings = AugmentationConfig(copies=20, ngram_probability=1.0, max_ngram=4,
                                  mask_probability=0.0, swap_probability=0.0)
    unlabelled = ["a new text the teacher labels", "the plot was thin"]
    transfer = build_transfer_set(TRAINING, held_out, settings, seed=0,
                                  unlabelled=unlabelled)
    assert not set(transfer.texts) & set(held_out)
    assert transfer.dropped_held_out > 5  # 5 copies of TRAINING[0], then n-grams
    assert "a new text the teacher labels" in transfer.texts
    assert transfer.origins["unlabelled"] == 1


def test_label_order_permutes_the_same_labels_and_refuses_others():
    assert label_order(["pos", "neg"], ["neg", "pos"], teacher="t", data="d").tolist() == [1, 0]
    with pytest.raises(TeacherError) as error:
        label_order(["negative", "neutral", "positive"], ["neg", "pos"], teacher="big",
                    data="reviews.csv")
    message = str(error.value)
    assert "['negative', 'neutral', 'positive']" in message and "['neg', 'pos']" in message


class CountingTeacher(Teacher):
    """A real ``Teacher`` whose logits are a fixed function of the text, counting calls."""

    def __init__(self, sha256: str = "a" * 64) -> None:
        super().__init__(TeacherIdentity("repository", "counting", 1, sha256, "fp32", "lstm"),
                         ["neg", "pos"], tokenizer=None, graph=None)  # type: ignore[arg-type]
        self.calls = 0

    def logits(self, texts, *, work_dir, threads=None, progress=False):
        self.calls += 1
        return np.array([[len(t) / 7.0, -len(t) / 3.0] for t in texts], dtype=np.float32)


def test_teacher_labels_are_cached_by_teacher_and_texts(tmp_path: Path):
    transfer = build_transfer_set(TRAINING, [], AugmentationConfig(copies=2), seed=0)
    teacher = CountingTeacher()
    columns = np.array([1, 0])  # the student's labels in the other order
    assert label_with_teacher(transfer, teacher, columns, tmp_path, progress=False) is False
    labelled = transfer.teacher_logits.copy()
    expected = np.array([[-len(t) / 3.0, len(t) / 7.0] for t in transfer.texts])
    np.testing.assert_allclose(labelled, expected, atol=1e-5)
    header = json.loads((tmp_path / CACHE_FILE).read_text().splitlines()[0])
    assert header["teacher_sha256"] == "a" * 64 and header["texts"] == len(transfer)

    again = build_transfer_set(TRAINING, [], AugmentationConfig(copies=2), seed=0)
    assert label_with_teacher(again, teacher, columns, tmp_path, progress=False) is True
    assert teacher.calls == 1
    np.testing.assert_array_equal(again.teacher_logits, labelled)

    other_teacher = CountingTeacher(sha256="b" * 64)
    label_with_teacher(again, other_teacher, columns, tmp_path, progress=False)
    other_texts = build_transfer_set(TRAINING, [], AugmentationConfig(copies=3), seed=0)
    label_with_teacher(other_texts, other_teacher, columns, tmp_path, progress=False)
    assert other_teacher.calls == 2  # another teacher, then other texts: labelled again

    (tmp_path / CACHE_FILE).write_text((tmp_path / CACHE_FILE).read_text()[:-40])
    assert label_with_teacher(other_texts, other_teacher, columns, tmp_path,
                              progress=False) is False  # a damaged cache is not trusted


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_distillation_loss_mixes_gold_and_teacher(loss: str):
    teacher_logits = np.array([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]], dtype=np.float32)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    gold = torch.tensor([0, NO_LABEL, NO_LABEL])
    rows = np.array([0, 1, 2])
    settings = DistillationConfig(teacher="t", loss=loss, alpha=0.25, temperature=2.0)
    value = DistillationLoss(settings, teacher_logits)(logits, gold, rows)
    target = torch.from_numpy(teacher_logits)
    if loss == "mse":
        teacher_part = ((logits - target) ** 2).mean()
    else:
        p = torch.softmax(target / 2, -1)
        teacher_part = (p * (p.log() - torch.log_softmax(logits / 2, -1))).sum(-1).mean() * 4
    gold_part = torch.nn.functional.cross_entropy(logits[:1], gold[:1])
    assert value.item() == pytest.approx((0.25 * gold_part + 0.75 * teacher_part).item(),
                                         rel=1e-5)
