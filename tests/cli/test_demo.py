"""The README's main job, `seqserve demo`, end to end on a repository that already has the
three default models (here: the tiny ones published under the default names)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from harness.tiny_models import LSTM_NAME, PRETRAINED_NAME, TRANSFORMER_NAME

from service.cli.exit_codes import ExitCode
from service.cli.main import main
from service.repo.layout import latest_version
from service.server.planning import choose_artifact

DEFAULT_NAMES = {LSTM_NAME: "sentiment-lstm", TRANSFORMER_NAME: "sentiment-transformer",
                 PRETRAINED_NAME: "sentiment-pretrained"}


def default_named_repository(three_architectures: Path, target: Path) -> Path:
    """The three tiny contenders, published under the default names."""
    for source, name in DEFAULT_NAMES.items():
        version = shutil.copytree(three_architectures / source / "1", target / name / "1")
        manifest = json.loads((version / "manifest.json").read_text())
        manifest["name"] = name
        (version / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_demo_serves_classifies_compares_and_drains(three_architectures, tmp_path):
    repository = default_named_repository(three_architectures, tmp_path / "repo")
    run = subprocess.run([sys.executable, "-m", "service", "demo", "--repository",
                          str(repository)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    # Each model at the precision the CPU policy picks for it, and the reason, said.
    served = {name: choose_artifact(latest_version(repository, name).load_manifest(), "auto",
                                    "cpu") for name in DEFAULT_NAMES.values()}
    for name, architecture in (("sentiment-lstm", "lstm"),
                               ("sentiment-transformer", "transformer"),
                               ("sentiment-pretrained", "pretrained")):
        artifact, why = served[name]
        assert f"{name} v1 ({architecture}, {artifact.precision} on cpu)" in out
        assert f"  {name}: {why}; " in out
    assert served["sentiment-lstm"][0].precision == "fp32"  # no int8 for the LSTM
    # One comparison row per architecture, with its precision and a throughput figure.
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("lstm ", "transformer ", "pretrained "))]
    assert [row[0] for row in rows] == ["lstm", "transformer", "pretrained"]
    assert [row[1] for row in rows] == [served[f"sentiment-{row[0]}"][0].precision
                                        for row in rows]
    assert all(float(row[-2]) > 0 for row in rows)
    assert "server drained and stopped (exit code 0)" in out


def test_build_skips_models_already_in_the_repository(three_architectures, tmp_path, capsys):
    repository = default_named_repository(three_architectures, tmp_path / "repo")
    assert main(["build", "--repository", str(repository), "--json"]) == ExitCode.OK
    report = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["version"], m["skipped"]) for m in report["models"]] == [
        ("sentiment-lstm", 1, True), ("sentiment-transformer", 1, True),
        ("sentiment-pretrained", 1, True)]


def add_distilled(repository: Path, three_architectures: Path) -> None:
    """The tiny LSTM published again as ``sentiment-distilled``, its manifest saying it was
    taught by sentiment-pretrained (what ``build --distilled`` writes)."""
    version = shutil.copytree(three_architectures / LSTM_NAME / "1",
                              repository / "sentiment-distilled" / "1")
    manifest = json.loads((version / "manifest.json").read_text())
    manifest.update(name="sentiment-distilled", source={"kind": "distilled"}, distillation={
        "teacher": {"kind": "repository", "name": "sentiment-pretrained", "version": 1,
                    "sha256": "0" * 64, "precision": "fp32", "architecture": "pretrained",
                    "test_accuracy": 0.84},
        "loss": "mse", "alpha": 0.0,
        "transfer_set": {"texts": 60, "training": 10, "augmented": 50, "unlabelled": 0,
                         "dropped_held_out": 0, "augmentation": "5 copies"}})
    (version / "manifest.json").write_text(json.dumps(manifest))


def test_demo_compares_the_distilled_model_when_the_repository_has_it(three_architectures,
                                                                     tmp_path, capsys):
    repository = default_named_repository(three_architectures, tmp_path / "repo")
    add_distilled(repository, three_architectures)
    assert main(["build", "--repository", str(repository), "--distilled",
                 "--json"]) == ExitCode.OK
    report = json.loads(capsys.readouterr().out)
    assert report["models"][-1] == {"name": "sentiment-distilled", "version": 1,
                                    "skipped": True,
                                    "path": str(repository / "sentiment-distilled" / "1")}
    run = subprocess.run([sys.executable, "-m", "service", "demo", "--repository",
                          str(repository), "--distilled"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines()
            if line.startswith(("lstm ", "transformer ", "pretrained "))]
    assert [" ".join(row[:2]) for row in rows][-1] == "lstm distilled"
    assert "sentiment-distilled v1 (lstm, fp32 on cpu)" in run.stdout
    header = next(line for line in run.stdout.splitlines() if line.startswith("text "))
    assert header.rstrip().endswith("sentiment-distilled")


def test_build_distilled_needs_its_teacher(tmp_path, capsys):
    code = main(["build", "--repository", str(tmp_path / "empty"), "--distilled",
                 "--no-pretrained"])
    assert code == ExitCode.USAGE
    assert "--distilled needs its teacher sentiment-pretrained" in capsys.readouterr().err
