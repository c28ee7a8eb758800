"""What the GPU check's stages share: the time budget, the models, running a command."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def newest_versions(repository: Path) -> list[Path]:
    """The newest complete version directory of every model."""
    found = []
    for model in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = [v for v in model.iterdir() if v.name.isdigit() and
                    (v / "manifest.json").is_file()]
        if versions:
            found.append(max(versions, key=lambda v: int(v.name)))
    return found


def run_command(command: list[str], timeout: float) -> dict[str, Any]:
    """Exit code, seconds, the stdout parsed as JSON when it is, and the stderr's tail."""
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        return {"command": command, "exit_code": None, "seconds": round(timeout, 1),
                "error": f"timed out after {timeout:.0f}s", "stderr_tail": tail(exc.stderr)}
    result: dict[str, Any] = {"command": command, "exit_code": done.returncode,
                              "seconds": round(time.monotonic() - started, 1),
                              "stderr_tail": tail(done.stderr)}
    try:
        result["json"] = json.loads(done.stdout)
    except json.JSONDecodeError:
        result["stdout_tail"] = tail(done.stdout)
    return result


def tail(text: Any, chars: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return (text or "")[-chars:]
