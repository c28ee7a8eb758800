"""The layer contracts of pyproject.toml hold, and they bite: a forbidden import breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO_ROOT

PACKAGES = ("service", "export", "models", "protos")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages under ``root``, with ``root``'s pyproject.toml."""
    env = os.environ | {"PYTHONPATH": str(root)}
    command = "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"
    return subprocess.run([sys.executable, "-c", command, "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_project_keeps_every_layer_contract() -> None:
    run = lint_imports(REPO_ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")


@pytest.mark.parametrize(("module", "line", "broken"), [
    # The server must never need torch: export/ is reachable only from the CLI.
    ("service/server/core.py", "import export.train  # noqa", "Only the CLI"),
    # The model-repository contract sits below everything that reads it.
    ("service/repo/manifest.py", "import service.server.settings  # noqa", "cli -> report"),
    # A cycle between two modules of one package.
    ("service/cli/train.py", "import service.cli.export  # noqa", "No import cycles"),
])
def test_a_forbidden_import_breaks_its_contract(tree_copy: Path, module: str, line: str,
                                                broken: str) -> None:
    _append(tree_copy / module, line)
    run = lint_imports(tree_copy)
    assert run.returncode != 0
    assert f"{broken}" in run.stdout and "BROKEN" in run.stdout, run.stdout
