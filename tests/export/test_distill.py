"""`seqserve train --teacher`: a student taught by a run directory or by a served model,
exported, published and served like any model, with its teacher on record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from harness.cli import run_cli
from harness.server import server_settings
from harness.synthetic import tiny_param_flags, write_separable_csv
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME
from harness.tiny_runs import train_tiny_run

from export.datasets import DatasetSpec, load_dataset
from export.transfer_set import CACHE_FILE
from service.cli.exit_codes import ExitCode
from service.repo.layout import latest_version
from service.repo.manifest import sha256_file

pytestmark = pytest.mark.slow

# The tiny LSTM of the shared repository was trained on these labels (sorted by the dataset).
STUDENT_LABELS = ("positive", "negative")


@pytest.fixture(scope="module")
def student_data(tmp_path_factory) -> Path:
    return write_separable_csv(tmp_path_factory.mktemp("data") / "reviews.csv", count=400,
                               labels=STUDENT_LABELS, seed=4)


def distill_args(data: Path, out: Path, teacher: str, *extra: str,
                 architecture: str = "bow") -> list[str]:
    return ["train", "-a", architecture, "-d", str(data), "--text-column", "review",
            "--label-column", "sentiment", "-o", str(out), "--teacher", teacher,
            "--epochs", "4", "--patience", "4", "--lr", "0.02", "--vocab-size", "300",
            "--max-length", "32", "--threads", "1", "--augment-copies", "2", "--json",
            *tiny_param_flags(architecture), *extra]


def summary_of(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_served_model_teaches_a_student_that_is_served_with_its_teacher_on_record(
        tiny_repository: Path, student_data: Path, tmp_path: Path, capsys,
        start_server) -> None:
    run_dir = tmp_path / "student"
    code = run_cli(distill_args(student_data, run_dir, LSTM_NAME,
                                "--teacher-repository", str(tiny_repository)))
    assert code == ExitCode.OK
    summary = summary_of(capsys)
    teacher_version = latest_version(tiny_repository, LSTM_NAME)
    teacher_manifest = teacher_version.load_manifest()
    fp32 = teacher_manifest.artifact("fp32")
    assert summary["teacher"] == {
        "kind": "repository", "name": LSTM_NAME, "version": 1, "sha256": fp32.sha256,
        "precision": "fp32", "architecture": "lstm",
        "test_accuracy": summary["teacher"]["test_accuracy"]}
    assert summary["teacher"]["test_accuracy"] > 0.9 and summary["test_accuracy"] > 0.8
    transfer = summary["transfer_set"]
    assert transfer["training"] > 250 and transfer["augmented"] > transfer["training"]
    assert transfer["texts"] == transfer["training"] + transfer["augmented"]

    # No text of the validation or test split is in the transfer set, and every gold label
    # in it is the training split's own label for that text.
    splits = load_dataset(DatasetSpec(source=str(student_data), text_column="review",
                                      label_column="sentiment"))
    held_out = {t for t, _ in splits.validation} | {t for t, _ in splits.test}
    training = dict(splits.train)
    rows = [json.loads(line) for line in (run_dir / CACHE_FILE).read_text().splitlines()[1:]]
    assert len(rows) == transfer["texts"]
    assert not {row["text"] for row in rows} & held_out
    for row in rows:
        assert row["gold"] is None or training[row["text"]] == row["gold"]
    assert sum(row["gold"] is not None for row in rows) == transfer["training"]

    repository = Path(shutil.copytree(tiny_repository, tmp_path / "repo"))
    assert run_cli(["export", str(run_dir), "--repository", str(repository), "--name",
                    "tiny-distilled", "--json"]) == ExitCode.OK
    capsys.readouterr()
    manifest = latest_version(repository, "tiny-distilled").load_manifest()
    assert manifest.source.kind == "distilled"
    assert manifest.distillation.teacher.sha256 == fp32.sha256
    assert manifest.distillation.transfer_set.texts == transfer["texts"]
    assert {a.precision for a in manifest.artifacts} >= {"fp32", "fp16"}

    assert run_cli(["repo", "show", "tiny-distilled", "--repository", str(repository),
                    "--json"]) == ExitCode.OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["distillation"]["teacher"]["name"] == LSTM_NAME
    assert run_cli(["repo", "list", "--repository", str(repository)]) == ExitCode.OK
    assert f"distilled from {LSTM_NAME}:1" in capsys.readouterr().out

    server = start_server(server_settings(repository))
    with server.client() as client:
        described = next(m for m in client.list_models() if m.name == "tiny-distilled")
        answer = client.classify(["a wonderful and brilliant film"], model="tiny-distilled")
    assert described.source == f"distilled from {LSTM_NAME} v1"
    assert described.distillation["teacher_name"] == LSTM_NAME
    assert described.distillation["teacher_sha256"] == fp32.sha256
    assert described.distillation["transfer_texts"] == transfer["texts"]
    assert described.distillation["loss"] == "mse"
    assert answer.results[0].label == "positive"


def test_a_run_directory_teaches_and_a_rerun_reads_the_cache(
        student_data: Path, tmp_path: Path, capsys) -> None:
    teacher = train_tiny_run(tmp_path / "runs", "lstm", labels=STUDENT_LABELS, rows=400,
                             name="teacher-run")
    run_dir = tmp_path / "student"
    args = distill_args(student_data, run_dir, str(teacher), "--distill-loss", "kl",
                        architecture="lstm")
    assert run_cli(args) == ExitCode.OK
    first = summary_of(capsys)
    assert first["teacher"]["kind"] == "run" and first["teacher"]["version"] is None
    assert first["teacher"]["sha256"] == sha256_file(teacher / "model.pt")
    assert first["transfer_set"]["labels_from_cache"] is False
    cache = (run_dir / CACHE_FILE).read_bytes()

    assert run_cli([*args, "--overwrite"]) == ExitCode.OK
    second = summary_of(capsys)
    assert second["transfer_set"]["labels_from_cache"] is True
    assert (run_dir / CACHE_FILE).read_bytes() == cache
    # Same targets, same seed: the same model up to CPU training's run-to-run noise (one CI
    # run in five differed by one of the 40 test texts).
    assert second["test_accuracy"] == pytest.approx(first["test_accuracy"], abs=0.05)

    # Another teacher (new weights) is labelled afresh, not served from the cache.
    retrained = train_tiny_run(tmp_path / "runs", "lstm", labels=STUDENT_LABELS, rows=400,
                               name="teacher-run", epochs=3)
    assert sha256_file(retrained / "model.pt") != first["teacher"]["sha256"]
    assert run_cli([*args, "--overwrite"]) == ExitCode.OK
    assert summary_of(capsys)["transfer_set"]["labels_from_cache"] is False


def test_a_teacher_of_other_labels_is_refused_naming_both(
        tiny_repository: Path, student_data: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "student"
    code = run_cli(distill_args(student_data, run_dir, TRANSFORMER_NAME,
                                "--teacher-repository", str(tiny_repository)))
    assert code == ExitCode.DATA_ERROR == 3
    error = capsys.readouterr().err
    assert "['negative', 'neutral', 'positive']" in error and "['negative', 'positive']" in error
    assert not (run_dir / "model.pt").exists()


@pytest.mark.parametrize(("teacher", "expected"), [
    ("no-such-model", "neither a run directory nor a model"),
    (f"{LSTM_NAME}:7", "has no version 7"),
    (f"{LSTM_NAME}:x", "must be a number"),
])
def test_a_missing_teacher_is_a_data_error(tiny_repository: Path, student_data: Path,
                                           tmp_path: Path, capsys, teacher: str,
                                           expected: str) -> None:
    code = run_cli(distill_args(student_data, tmp_path / "student", teacher,
                                "--teacher-repository", str(tiny_repository)))
    assert code == ExitCode.DATA_ERROR
    assert expected in capsys.readouterr().err


def test_unlabelled_texts_are_labelled_and_held_out_ones_dropped(
        tiny_repository: Path, student_data: Path, tmp_path: Path, capsys) -> None:
    splits = load_dataset(DatasetSpec(source=str(student_data), text_column="review",
                                      label_column="sentiment"))
    test_text = splits.test[0][0]
    unlabelled = tmp_path / "more.jsonl"
    unlabelled.write_text("\n".join(json.dumps({"review": text}) for text in [
        "a superb and delightful story", "dreadful clumsy dull plot", test_text, ""]) + "\n")
    run_dir = tmp_path / "student"
    assert run_cli(distill_args(student_data, run_dir, LSTM_NAME, "--teacher-repository",
                                str(tiny_repository), "--unlabelled",
                                str(unlabelled))) == ExitCode.OK
    transfer = summary_of(capsys)["transfer_set"]
    assert transfer["unlabelled"] == 2 and transfer["unlabelled_file"] == str(
        unlabelled.resolve())
    texts = {json.loads(line)["text"]
             for line in (run_dir / CACHE_FILE).read_text().splitlines()[1:]}
    assert "a superb and delightful story" in texts and test_text not in texts


def test_distillation_flags_need_a_teacher(student_data: Path, tmp_path: Path,
                                           capsys) -> None:
    code = run_cli(["train", "-a", "lstm", "-d", str(student_data), "--text-column", "review",
                    "--label-column", "sentiment", "-o", str(tmp_path / "x"),
                    "--distill-loss", "kl"])
    assert code == ExitCode.USAGE
    assert "--distill-loss needs --teacher" in capsys.readouterr().err
