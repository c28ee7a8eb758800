"""Programs the suite needs besides Python packages. A missing one fails its tests with the
way to install it: the suite skips nothing, so a green run has really run the real-Prometheus
and manifest tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

INSTALL = "run `bash scripts/install-test-deps` (the README's test command does)"


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and Path(f"/usr/bin/{name}").is_file():  # PATH without /usr/bin
        found = f"/usr/bin/{name}"
    return found


def require(name: str) -> str:
    """The path of program ``name``, or fail the calling test saying how to install it."""
    found = which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {INSTALL}", pytrace=False)
    return found

