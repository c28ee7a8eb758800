"""`seqserve train`: run directory contents, learning, reproducibility, tokenizer, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from harness.synthetic import separable_texts, tiny_param_flags, write_separable_csv

from export.config import RunConfig
from export.tokenizer import save_tokenizer, train_tokenizer
from models import create_model
from service.cli.exit_codes import ExitCode
from service.cli.main import main
from service.repo.tokenization import PAD_ID, TextTokenizer

RUN_FILES = {"config.json", "tokenizer.json", "labels.json", "model.pt", "metrics.json",
             "training_curve.png"}


def train_args(data: Path, out: Path, architecture: str, *extra: str) -> list[str]:
    return ["train", "-a", architecture, "-d", str(data), "--text-column", "review",
            "--label-column", "sentiment", "-o", str(out), "--epochs", "12", "--patience", "12",
            "--lr", "0.02", "--vocab-size", "300", "--max-length", "48", "--threads", "1",
            "--json", *tiny_param_flags(architecture), *extra]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_separable_csv(tmp_path_factory.mktemp("data") / "reviews.csv", count=1000)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["lstm", "transformer", "bow"])
def test_tiny_run_learns_separable_data(architecture, dataset, tmp_path, capsys):
    run_dir = tmp_path / architecture
    assert main(train_args(dataset, run_dir, architecture)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["test_accuracy"] > 0.95, summary
    assert {p.name for p in run_dir.iterdir()} >= RUN_FILES

    config = RunConfig.load(run_dir)
    assert config.data.text_column == "review" and config.architecture == architecture
    assert json.loads((run_dir / "labels.json").read_text()) == ["neg", "pos"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["confusion_matrix"] and len(metrics["test"]["per_class"]) == 2
    assert metrics["test"]["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
    # The weights load back into the resolved config with the safe loader.
    model = create_model(architecture, config.model)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))


def test_same_seed_same_metrics_and_weights(dataset, tmp_path, capsys):
    outputs = []
    for attempt in ("a", "b"):
        assert main(train_args(dataset, tmp_path / attempt, "bow", "--epochs", "3")) == 0
        outputs.append(json.loads((tmp_path / attempt / "metrics.json").read_text())["test"])
    assert outputs[0] == outputs[1]
    first = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    second = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(first[k], second[k]) for k in first)

    assert main(train_args(dataset, tmp_path / "c", "bow", "--epochs", "3", "--seed", "7")) == 0
    third = torch.load(tmp_path / "c" / "model.pt", weights_only=True)
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_tokenizer_round_trip_and_padding(tmp_path):
    texts = [text for text, _ in separable_texts(200)]
    tokenizer = save_tokenizer(train_tokenizer(texts, vocab_size=300), tmp_path / "tok.json",
                               max_length=8)
    reloaded = TextTokenizer.from_file(tmp_path / "tok.json", max_length=8)
    assert reloaded.vocab_size == tokenizer.vocab_size

    batch = reloaded.encode_batch(["The film was GREAT", "dull", "the " * 30])
    assert batch.input_ids.dtype == np.int64 and batch.input_ids.shape == (3, 8)
    assert batch.lengths.tolist() == [4, 1, 8]
    assert batch.truncated.tolist() == [False, False, True]
    assert (batch.input_ids[batch.attention_mask == 0] == PAD_ID).all()
    ids, _ = reloaded.token_ids(["the film was great"])
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tmp_path / "tok.json"))
    assert raw.decode(ids[0]) == "the film was great"
    assert raw.token_to_id("[PAD]") == PAD_ID


def test_train_help_and_failures(tmp_path, capsys):
    help_run = subprocess.run([sys.executable, "-m", "service.cli.main", "train", "--help"],
                              capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "--architecture" in help_run.stdout

    missing = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "train", "-a", "lstm", "-d",
         str(tmp_path / "nope.csv"), "-o", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120)
    assert missing.returncode == ExitCode.DATA_ERROR
    assert missing.stderr.strip().count("\n") == 0 and "nope.csv" in missing.stderr

    data = write_separable_csv(tmp_path / "d.csv", count=100)
    assert main(["train", "-a", "lstm", "-d", str(data), "-o", str(tmp_path / "r"),
                 "--text-column", "review", "--label-column", "sentiment",
                 "--model-param", "no_such_param=3"]) == ExitCode.USAGE
    assert "no_such_param" in capsys.readouterr().err

    with pytest.raises(SystemExit) as usage:
        main(["train", "-a", "gru"])
    assert usage.value.code == ExitCode.USAGE


def test_training_needs_validation_and_test_texts(tmp_path, capsys):
    data = write_separable_csv(tmp_path / "d.csv", count=100)
    for flag in ("--validation-fraction", "--test-fraction"):
        code = main(["train", "-a", "bow", "-d", str(data), "-o", str(tmp_path / "r"),
                     "--text-column", "review", "--label-column", "sentiment", flag, "0"])
        assert code == ExitCode.USAGE
        assert f"data.{flag[2:].replace('-', '_')} must be above 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
