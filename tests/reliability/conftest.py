"""The reliability suite: overload, stalls, soak, faults, drain and fuzzing against real servers.

Every test is marked ``reliability`` (``pytest -m reliability`` runs just these) and records
its figures, printed at the end of the run: they are the figures the README's "Guarantees"
quote. ``SEQSERVE_RELIABILITY=long`` runs the longer mode (minutes instead of seconds).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.reliability import LONG

_FIGURES: list[tuple[str, str]] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, object]]:
    measured: dict[str, object] = {}
    yield measured
    if measured:
        text = ", ".join(f"{key} {value}" for key, value in measured.items())
        _FIGURES.append((request.node.name, text))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section(f"reliability figures ({'long' if LONG else 'CI'} mode)")
    for name, text in _FIGURES:
        terminalreporter.write_line(f"{name}: {text}")
