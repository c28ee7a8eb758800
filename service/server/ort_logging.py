"""ONNX Runtime's default logger severity, which is process-global and has no getter.

Whoever quiets it must put back what was set before, not a constant: seqserve sets it only
through here, so the level it last set is known (ORT starts at WARNING, 2).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import onnxruntime as ort

SILENT = 4  # FATAL only
_level = 2  # ORT's own default
_lock = threading.Lock()


def set_severity(level: int) -> int:
    """Set the default logger severity; returns the previous one."""
    global _level
    with _lock:
        previous, _level = _level, level
        ort.set_default_logger_severity(level)
    return previous


def severity() -> int:
    return _level


@contextlib.contextmanager
def quiet_ort_logging(enabled: bool = True) -> Iterator[None]:
    """Silence ORT's default logger inside the block (a CUDA probe's expected failures)."""
    if not enabled:
        yield
        return
    previous = set_severity(SILENT)
    try:
        yield
    finally:
        set_severity(previous)
