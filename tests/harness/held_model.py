"""A stand-in model for the batcher whose batches a test can hold and release."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np


class CountingModel:
    """logits = (sum of ids, -sum of ids) per row; records every batch it is given.

    ``started`` is set when a batch begins; with ``hold=True`` every batch then waits for
    ``release`` (a test decides when the model finishes, instead of sleeping and hoping).
    """

    def __init__(self, delay: float = 0.0, *, hold: bool = False) -> None:
        self.delay = delay
        self.batches: list[int] = []
        self.rows_seen: list[int] = []
        self.batch_rows: list[list[int]] = []
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.started.set()
        assert self.release.wait(10), "the test never released the model"
        time.sleep(self.delay)
        with self.lock:
            self.batches.append(len(input_ids))
            rows = [int(r.sum()) for r in input_ids]
            self.rows_seen += rows
            self.batch_rows.append(rows)
        total = (input_ids * attention_mask).sum(axis=1).astype(np.float32)
        return np.stack([total, -total], axis=1) / 10


async def running(model: CountingModel) -> None:
    """Wait (off the event loop) until the model has started a batch."""
    assert await asyncio.to_thread(model.started.wait, 10)
