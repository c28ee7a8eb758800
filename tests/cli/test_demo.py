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
from service.server.runtime import choose_artifact

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
