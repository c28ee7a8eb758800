"""``seqserve serve`` as a real process (real signals, real CLI), optionally with slow inference.

The slow variant wraps the batcher's model-thread step in a delay before handing over to the real
command line, so calls are reliably in flight when a test sends a signal; warm-up is not slowed.
A slow file makes the delay switchable while the server runs: while the file exists, each batch
first sleeps the seconds it holds (read per batch, so the switch takes effect at the next one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from harness import REPO_ROOT

READY_PREFIX = "seqserve: serving on "

_SLOW_SERVE = """
import os, sys, time
from service.server.batching import Batcher
delay = float(sys.argv[1])
slow_file = os.environ.get("SEQSERVE_TEST_SLOW_FILE")
run = Batcher._run
def switched_delay():
    try:
        with open(slow_file) as f:
            return float(f.read())
    except (FileNotFoundError, ValueError):
        return 0.0
def slow_run(self, batch):
    pause = delay + (switched_delay() if slow_file else 0.0)
    if pause:
        time.sleep(pause)
    return run(self, batch)
Batcher._run = slow_run
from service.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def serve_process(repository: Path, *flags: str, inference_delay_s: float = 0.0,
                  log_level: str = "INFO", host: str = "127.0.0.1", port: int = 0,
                  prefix: Sequence[str] = (), slow_file: Path | None = None,
                  stderr: IO[str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start ``seqserve serve`` on ``host:port`` (default: a free loopback port); returns the
    process and its address.

    ``prefix``: a wrapper command, e.g. ``ip netns exec NS`` (it must exec the server, so that
    the pid is the server's). ``slow_file``: the run-time switch of an extra delay (above).
    stderr (the log) is a pipe the caller reads after the process ends, or ``stderr``: a file,
    for a server that logs for long (a pipe nobody reads would fill and block it)."""
    command = [*prefix, sys.executable, "-c", _SLOW_SERVE, str(inference_delay_s),
               "--log-level", log_level, "serve", "--repository", str(repository),
               "--host", host, "--port", str(port), "--device", "cpu",
               "--poll-interval-s", "0", *flags]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    if slow_file is not None:
        env["SEQSERVE_TEST_SLOW_FILE"] = str(slow_file)
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE if stderr is None else stderr, text=True,
                               env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(READY_PREFIX):
        process.kill()
        log = process.stderr.read() if process.stderr is not None else ""
        raise AssertionError(f"server did not start: {line}{log}")
    return process, line.removeprefix(READY_PREFIX).strip()
