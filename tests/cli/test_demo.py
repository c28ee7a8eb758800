"""The README's main job, `seqserve demo`, end to end on a repository that already has the
default pair (here: the tiny models published under the default names)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME

from service.cli.exit_codes import ExitCode
from service.cli.main import main


def default_named_repository(tiny_repository: Path, target: Path) -> Path:
    for source, name in ((LSTM_NAME, "sentiment-lstm"), (TRANSFORMER_NAME,
                                                          "sentiment-transformer")):
        version = shutil.copytree(tiny_repository / source / "1", target / name / "1")
        manifest = json.loads((version / "manifest.json").read_text())
        manifest["name"] = name
        (version / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_demo_serves_classifies_compares_and_drains(tiny_repository, tmp_path):
    repository = default_named_repository(tiny_repository, tmp_path / "repo")
    run = subprocess.run([sys.executable, "-m", "service", "demo", "--repository",
                          str(repository)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "sentiment-lstm v1 (lstm, fp32 on cpu)" in out
    assert "sentiment-transformer v1 (transformer, fp32 on cpu)" in out
    # One comparison row per architecture, with a throughput figure.
    rows = [line.split() for line in out.splitlines() if line.startswith(("lstm ", "transformer "))]
    assert [row[0] for row in rows] == ["lstm", "transformer"]
    assert all(float(row[-2]) > 0 for row in rows)
    assert "server drained and stopped (exit code 0)" in out


def test_build_skips_models_already_in_the_repository(tiny_repository, tmp_path, capsys):
    repository = default_named_repository(tiny_repository, tmp_path / "repo")
    assert main(["build", "--repository", str(repository), "--json"]) == ExitCode.OK
    report = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["version"], m["skipped"]) for m in report["models"]] == [
        ("sentiment-lstm", 1, True), ("sentiment-transformer", 1, True)]
