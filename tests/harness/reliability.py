"""The reliability suite's two modes: CI (seconds) and long (``SEQSERVE_RELIABILITY=long``)."""

from __future__ import annotations

import os
from pathlib import Path

LONG = os.environ.get("SEQSERVE_RELIABILITY") == "long"


def scaled(short: float, long: float) -> float:
    """A duration or count: ``short`` in CI, ``long`` in the long mode."""
    return long if LONG else short


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024
