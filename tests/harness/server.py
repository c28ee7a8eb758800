"""Running real seqserve servers in tests: on a private event loop thread, on loopback.

A ``RunningServer`` runs ``SeqServer`` on its own event loop in a background thread, so tests
talk to it over real gRPC with the blocking client, exactly as a remote caller would.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(every)


def server_settings(repository: Path, **overrides: Any) -> Any:
    from service.server.settings import ServeSettings

    defaults: dict[str, Any] = dict(
        repository=repository, host=LOOPBACK, port=0, metrics_port=0, metrics_host=LOOPBACK,
        device="cpu", poll_interval_s=0, drain_grace_s=5, intra_op_threads=1,
        inter_op_threads=1, max_batch_delay_ms=5,
        # The server tests compare answers with in-process fp32; the precision policy has
        # its own tests (tests/server/test_precision_policy.py).
        precision="fp32",
    )
    return ServeSettings(**(defaults | overrides))


class RunningServer:
    """A SeqServer on a private event loop thread."""

    def __init__(self, settings: Any, **server_kwargs: Any) -> None:
        from service.server.app import SeqServer

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: SeqServer = self.run(self._make(SeqServer, settings, server_kwargs))
        self._starting: Any = None

    @staticmethod
    async def _make(cls: Any, settings: Any, kwargs: dict[str, Any]) -> Any:
        return cls(settings, **kwargs)

    def run(self, coroutine: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self, wait: bool = True) -> RunningServer:
        self._starting = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        if wait:
            self._starting.result(30)
        else:
            wait_until(lambda: self.server.port != 0 or self._starting.done())
        return self

    def wait_started(self, timeout: float = 30.0) -> None:
        self._starting.result(timeout)

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.server.port}"

    def client(self, **kwargs: Any) -> Any:
        from service.client import Client

        return Client(self.target, **kwargs)

    def stop_async(self, grace: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop)

    def close(self) -> None:
        if not self.server._stopped.is_set():
            self.run(self.server.stop(grace=2.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def reference_probabilities(repository: Path, name: str, texts: list[str],
                            version: int = 1, precision: str = "fp32") -> Any:
    """In-process ONNX Runtime on one artifact, one text at a time: what the server must
    return whatever batch a text lands in (and however it is padded)."""
    import numpy as np

    from service.repo.graph import open_session, run_logits
    from service.repo.manifest import Manifest
    from service.repo.probabilities import softmax
    from service.repo.tokenization import TextTokenizer

    directory = repository / name / str(version)
    manifest = Manifest.load(directory / "manifest.json")
    spec = manifest.tokenizer
    tokenizer = TextTokenizer.from_file(directory / spec.file, spec.max_length, spec.pad_id)
    session = open_session(directory / manifest.artifact(precision).file)
    rows = []
    for text in texts:
        batch = tokenizer.encode_batch([text])
        rows.append(softmax(run_logits(session, batch.input_ids, batch.attention_mask))[0])
    return np.stack(rows), manifest.labels


class SlowInference:
    """A loader that slows every batch of the chosen models by ``delay`` seconds and counts
    the texts really computed (to prove dropped work never reached the model)."""

    def __init__(self, delay: float, models: tuple[str, ...] | None = None) -> None:
        self.delay = delay
        self.models = models
        self.texts_computed: dict[str, int] = {}
        self.batches_started: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, model: Any, settings: Any, builder: Any) -> Any:
        from service.server.runtime import load_version

        loaded = load_version(model, settings, builder)
        if self.models is None or model.name in self.models:
            run = loaded.session.run

            def slow_run(input_ids: Any, attention_mask: Any) -> Any:
                with self._lock:
                    self.batches_started[model.name] = (
                        self.batches_started.get(model.name, 0) + 1)
                time.sleep(self.delay)
                with self._lock:
                    self.texts_computed[model.name] = (
                        self.texts_computed.get(model.name, 0) + len(input_ids))
                return run(input_ids, attention_mask)

            loaded.session.run = slow_run
        return loaded
