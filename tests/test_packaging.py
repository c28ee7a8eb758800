"""The serving install works without torch; the README's commands and CI stay in step."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WITHOUT_TORCH = """
import importlib, pkgutil, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
sys.modules["transformers"] = None
import service
for module in pkgutil.walk_packages(service.__path__, "service."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)  # every serving-side module, the CLI too
import export.datasets
import service.cli.main
service.cli.main.build_parser()
sys.exit(service.cli.main.main(["train", "-a", "lstm"]))
"""


def test_serving_code_imports_and_runs_without_torch():
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 7, run.stderr  # MISSING_EXTRA, not a traceback
    assert run.stderr.strip() == "seqserve: error: this command needs torch: pip install " \
        "'seqserve[train]'"


def test_torch_is_only_a_training_extra_and_one_onnxruntime_per_platform():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("torch") for dep in project["dependencies"])
    assert any(dep.startswith("torch") for dep in project["optional-dependencies"]["train"])
    runtimes = [dep for dep in project["dependencies"] if dep.startswith("onnxruntime")]
    gpu = next(dep for dep in runtimes if dep.startswith("onnxruntime-gpu"))
    cpu = next(dep for dep in runtimes if not dep.startswith("onnxruntime-gpu"))
    # The CPU build's marker is the exact negation of the GPU build's.
    assert "sys_platform == 'linux' and platform_machine == 'x86_64'" in gpu
    assert "sys_platform != 'linux' or platform_machine != 'x86_64'" in cpu


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up: the two commands.*?```bash\n(.*?)```", readme, re.S)
    assert block, "the README's set-up block is missing"
    commands = [line for line in block.group(1).splitlines()
                if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    main_job, tests = commands
    assert "seqserve demo" in main_job
    # The test command installs what the tests need (Debian's prometheus included) first.
    assert tests.startswith("bash scripts/install-test-deps && "), tests
    installer = (ROOT / "scripts" / "install-test-deps").read_text()
    assert "apt-get install" in installer and "prometheus" in installer
    assert 'pip install -q -e ".[train,dev]"' in installer
    ci = (ROOT / ".ci" / "run").read_text()
    for part in tests.split(" && "):
        assert part.strip() in ci, f"{part!r} of the README's test command is not in .ci/run"
