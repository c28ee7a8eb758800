"""The release pipeline (.github/workflows/release.yml) calls seqserve commands that exist.

Every `seqserve ...` line of every `run:` step is parsed with the real parser
(``service.cli.main.build_parser()``), so a renamed command or flag fails here, not in a release.
The pipeline's shape is checked too: it trains, exports without bypassing a gate, checks the
repository on replicas, publishes it as an artifact, and builds every image in deploy/docker/.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import REPO_ROOT

from service.cli.main import build_parser

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "release.yml"
# ${{ expressions }} stand for values only GitHub knows; any word keeps the parse honest.
EXPRESSION = re.compile(r"\$\{\{[^}]*\}\}")


def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def steps() -> list[dict[str, Any]]:
    return [step for job in workflow()["jobs"].values() for step in job["steps"]]


def shell_lines(script: str) -> list[str]:
    """Logical lines of a `run:` script (continuations joined)."""
    return [line.strip() for line in script.replace("\\\n", " ").splitlines() if line.strip()]


def seqserve_commands() -> list[list[str]]:
    """argv (without `seqserve`) of every seqserve command the workflow runs."""
    commands = []
    for step in steps():
        for line in shell_lines(step.get("run", "")):
            for part in re.split(r"&&|\|\||;|\|", EXPRESSION.sub("VALUE", line)):
                words = shlex.split(part.split(">", 1)[0])
                if words and words[0] == "seqserve":
                    commands.append(words[1:])
    return commands


def test_every_seqserve_command_exists_with_its_flags() -> None:
    commands = seqserve_commands()
    assert commands, "no seqserve command found"
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"`seqserve {shlex.join(argv)}` does not parse with the real parser")


def test_the_work_is_done_by_seqserve_commands_only() -> None:
    used = {argv[0] for argv in seqserve_commands()}
    assert {"data", "train", "export", "replicas", "classify"} <= used
    for step in steps():
        script = step.get("run", "")
        assert "python -m service" not in script, "call the `seqserve` command"
        assert not re.search(r"\bpython\b(?! -m pip)", script), f"not a seqserve command: {script}"


def test_a_failed_gate_fails_the_release() -> None:
    exports = [argv for argv in seqserve_commands() if argv[0] == "export"]
    assert len(exports) >= 2
    for argv in exports:
        assert "--allow-fp16-failure" not in argv, "a gate must not be bypassed"
    for step in steps():
        for line in shell_lines(step.get("run", "")):
            if line.startswith("seqserve"):
                # `|| true` or `; exit 0` would swallow exit 5 (gate failed) or 4 (checks).
                assert "|| true" not in line and "exit 0" not in line, line
                assert not step.get("continue-on-error"), step["name"]


def test_the_repository_is_published_and_every_image_built() -> None:
    uploads = [s for s in steps() if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert any(s["with"]["name"] == "model-repository"
               and s["with"]["path"].rstrip("/") == "model_repository" for s in uploads)
    exported_to = {argv[argv.index("--repository") + 1] for argv in seqserve_commands()
                   if argv[0] == "export"}
    assert exported_to == {"model_repository"}
    builds = [s for s in steps() if str(s.get("uses", "")).startswith("docker/build-push-action")]
    files = set()
    for step in builds:
        file = step["with"]["file"]
        if "matrix.variant" in file:
            job = next(j for j in workflow()["jobs"].values() if step in j["steps"])
            files |= {file.replace("${{ matrix.variant }}", v)
                      for v in job["strategy"]["matrix"]["variant"]}
        else:
            files.add(file)
    dockerfiles = {str(p.relative_to(REPO_ROOT)) for p in
                   (REPO_ROOT / "deploy" / "docker").glob("*.Dockerfile")}
    assert files == dockerfiles
    for file in files:
        assert (REPO_ROOT / file).is_file()
    # The models image is built from the published repository, not by retraining.
    (models,) = [s for s in builds if s["with"]["file"].endswith("models.Dockerfile")]
    assert models["with"]["build-contexts"] == "model_repository=./model_repository"


def test_the_workflow_runs_on_release_tags() -> None:
    document = workflow()
    triggers = document.get("on", document.get(True))  # YAML 1.1 reads a bare `on` as True
    assert triggers["push"]["tags"] == ["v*"]
    assert "workflow_dispatch" in triggers


@pytest.mark.parametrize("path", sorted((REPO_ROOT / ".github").rglob("*.yml")),
                         ids=lambda p: p.name)
def test_workflow_files_are_valid_yaml_with_jobs(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    assert document["jobs"], path
    for name, job in document["jobs"].items():
        assert job.get("timeout-minutes"), f"{name}: no timeout"
        assert job["runs-on"]
