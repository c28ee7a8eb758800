"""Shared fixtures for the server tests: a tiny real model repository and real servers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.server import RunningServer, free_port, server_settings


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per session; never modify it: copy it with ``repository_copy``."""
    from harness.tiny_models import build_tiny_repository  # only sessions that need it pay

    return build_tiny_repository(tmp_path_factory.mktemp("tiny-repository") / "repo")


@pytest.fixture
def repository_copy(tiny_repository: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_repository, tmp_path / "repo"))


@pytest.fixture(scope="session")
def tiny_pretrained_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny-pretrained/1`` alone, built once per session; never modify it."""
    from harness.tiny_models import build_tiny_pretrained

    return build_tiny_pretrained(tmp_path_factory.mktemp("tiny-pretrained") / "repo")


@pytest.fixture
def three_architectures(tiny_repository: Path, tiny_pretrained_repository: Path,
                        tmp_path: Path) -> Path:
    """A copy of the tiny repository with the tiny pretrained model beside the LSTM and the
    Transformer: the three contenders of the comparison."""
    repository = Path(shutil.copytree(tiny_repository, tmp_path / "repo"))
    shutil.copytree(tiny_pretrained_repository / "tiny-pretrained",
                    repository / "tiny-pretrained")
    return repository


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """Factory fixture: ``start_server(settings, wait=True, **SeqServer kwargs)``."""
    servers: list[RunningServer] = []

    def start(settings: Any, *, wait: bool = True, **kwargs: Any) -> RunningServer:
        running = RunningServer(settings, **kwargs)
        servers.append(running)
        return running.start(wait=wait)

    yield start
    for running in reversed(servers):
        running.close()


@pytest.fixture(scope="module")
def shared_server(tiny_repository: Path) -> Iterator[RunningServer]:
    """One server for the read-only API tests of a module."""
    running = RunningServer(server_settings(
        tiny_repository, metrics_port=free_port(), max_receive_message_bytes=256 * 1024))
    running.start()
    yield running
    running.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test fails the run: the suite is meant to run whole on every machine
    (``SEQSERVE_ALLOW_SKIPS=1`` to look at a partial run anyway)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == pytest.ExitCode.OK and not os.environ.get(
            "SEQSERVE_ALLOW_SKIPS"):
        reporter.write("\n")
        reporter.write_line(f"seqserve: {skipped} test(s) skipped, so the run fails: "
                            "run `bash scripts/install-test-deps` first", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
