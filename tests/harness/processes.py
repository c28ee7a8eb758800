"""``seqserve serve`` as a real process (real signals, real CLI), optionally with slow inference.

The slow variant wraps the batcher's model-thread step in a delay before handing over to the real
command line, so calls are reliably in flight when a test sends a signal; warm-up is not slowed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness import REPO_ROOT

READY_PREFIX = "seqserve: serving on "

_SLOW_SERVE = """
import sys, time
from service.server.batching import Batcher
delay = float(sys.argv[1])
run = Batcher._run
def slow_run(self, batch):
    time.sleep(delay)
    return run(self, batch)
Batcher._run = slow_run
from service.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def serve_process(repository: Path, *flags: str, inference_delay_s: float = 0.0,
                  log_level: str = "INFO") -> tuple[subprocess.Popen[str], str]:
    """Start ``seqserve serve`` on a free loopback port; returns the process and its address.

    stderr (the log) is a pipe the caller reads after the process ends."""
    command = [sys.executable, "-c", _SLOW_SERVE, str(inference_delay_s), "--log-level",
               log_level, "serve", "--repository", str(repository), "--host", "127.0.0.1",
               "--port", "0", "--device", "cpu", "--poll-interval-s", "0", *flags]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None and process.stderr is not None
    line = process.stdout.readline()
    if not line.startswith(READY_PREFIX):
        process.kill()
        raise AssertionError(f"server did not start: {line}{process.stderr.read()}")
    return process, line.removeprefix(READY_PREFIX).strip()
