"""Which model versions are served, and hot reload.

Each model name maps to one served version: the newest complete one in the repository, or the
one pinned with ``--model-version NAME=N``. A scan (at start, every ``poll_interval_s``, and on
SIGHUP) loads a new target version *beside* the old one, in a worker thread, warms it up, and
only then swaps it in with a single dict assignment on the event loop: a request resolves its
model and queues its texts without awaiting in between, so it never sees half a swap. The old
version then finishes its queued work and is dropped, with its metric series.

A version that fails to load or verify is logged and remembered; polls skip it (a broken version
would otherwise be re-read every interval), a SIGHUP retries it. The old version keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.repo.layout import ModelVersion, model_names, versions
from service.repo.manifest import ManifestError
from service.server.admission import QueueAdmission
from service.server.batching import Batcher
from service.server.metrics import ModelLabels, ModelMetrics, ServingMetrics
from service.server.runtime import LoadedVersion, LoadError, SessionBuilder, load_version
from service.server.settings import ServeSettings

log = logging.getLogger(__name__)

Loader = Callable[[ModelVersion, ServeSettings, SessionBuilder], LoadedVersion]


@dataclass(eq=False)
class ServedModel:
    loaded: LoadedVersion
    batcher: Batcher
    metrics: ModelMetrics
    state: str = "ready"  # "ready", then "draining" once replaced

    @property
    def name(self) -> str:
        return self.loaded.manifest.name

    @property
    def version(self) -> int:
        return self.loaded.manifest.version

    @property
    def labels(self) -> list[str]:
        return self.loaded.manifest.labels

    @property
    def architecture(self) -> str:
        return self.loaded.manifest.architecture

    @property
    def precision(self) -> str:
        return self.loaded.session.precision

    @property
    def device(self) -> str:
        return self.loaded.session.device


@dataclass
class ScanReport:
    loaded: list[str] = field(default_factory=list)  # "name/version"
    failed: list[str] = field(default_factory=list)  # one line each


class ModelRegistry:
    def __init__(
        self,
        settings: ServeSettings,
        metrics: ServingMetrics,
        builder: SessionBuilder | None = None,
        *,
        loader: Loader = load_version,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._builder = builder if builder is not None else SessionBuilder(settings)
        self._loader = loader
        self._models: dict[str, ServedModel] = {}
        self._available: dict[str, list[int]] = {}
        self._failed: dict[str, dict[int, str]] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._retry_failed = False
        self._retiring: set[asyncio.Task[None]] = set()
        self._repository_present = True

    # --- lookups (event loop only) ------------------------------------------------------

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def models(self) -> list[ServedModel]:
        return [self._models[name] for name in sorted(self._models)]

    def available_versions(self, name: str) -> list[int]:
        return list(self._available.get(name, []))

    def failed_versions(self, name: str) -> dict[int, str]:
        return dict(self._failed.get(name, {}))

    # --- scanning -----------------------------------------------------------------------

    def request_scan(self, *, retry_failed: bool = False) -> None:
        """Ask the poller for a scan now (SIGHUP); ``retry_failed`` also retries refused ones."""
        self._retry_failed = self._retry_failed or retry_failed
        self._wake.set()

    async def poll(self) -> None:
        """Scan every ``poll_interval_s`` (0: only on request) until cancelled."""
        interval = self.settings.poll_interval_s or None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            retry, self._retry_failed = self._retry_failed, False
            try:
                await self.scan(retry_failed=retry)
            except Exception:  # a scan must never kill the poller
                log.exception("repository scan failed")

    async def scan(self, *, retry_failed: bool = False) -> ScanReport:
        async with self._lock:
            report = ScanReport()
            if retry_failed:  # SIGHUP: CUDA may work now (libraries installed, GPU freed)
                self._builder.retry_cuda()
            repository = self.settings.repository
            self._note_repository(repository)
            names = model_names(repository)
            for name in sorted(set(self.settings.model_versions) - set(names)):
                self._refuse(report, name, self.settings.model_versions[name],
                             f"pinned model {name} is not in {repository}")
            for name in names:
                found = versions(repository, name)
                self._available[name] = [v.version for v in found]
                target = self._target(name, found, report)
                if target is None:
                    continue
                current = self._models.get(name)
                if current is not None and current.version == target.version and not (
                        retry_failed and current.loaded.session.fell_back_from_cuda
                        and self._builder.cuda_may_start()):
                    continue
                failed = self._failed.get(name, {})
                if (target.version not in failed or retry_failed) and await self._load_and_swap(
                        target, report):
                    continue
                if current is None and name not in self.settings.model_versions:
                    await self._fall_back(name, found, target.version, report, retry_failed)
            self._metrics.repository_scans.inc()
            return report

    def _note_repository(self, repository: Path) -> None:
        """Say once when the repository disappears (an unmounted volume, a deleted directory)
        and once when it returns: what is loaded keeps serving meanwhile."""
        present = repository.is_dir()
        if present == self._repository_present:
            return
        self._repository_present = present
        if present:
            log.info("repository %s is back", repository)
        else:
            log.warning("repository %s is gone: serving the loaded versions until it returns",
                        repository)

    async def _fall_back(self, name: str, found: list[ModelVersion], newest: int,
                         report: ScanReport, retry_failed: bool) -> None:
        """Nothing serves ``name`` and its newest version was refused (at start-up, say):
        serve the newest older version that loads, rather than nothing."""
        for candidate in reversed(found):
            if candidate.version >= newest:
                continue
            if candidate.version in self._failed.get(name, {}) and not retry_failed:
                continue
            if await self._load_and_swap(candidate, report):
                log.warning("%s: serving version %d because %d was refused", name,
                            candidate.version, newest)
                return

    def _target(
        self, name: str, found: list[ModelVersion], report: ScanReport
    ) -> ModelVersion | None:
        pinned = self.settings.model_versions.get(name)
        if pinned is None:
            return found[-1] if found else None
        match = next((v for v in found if v.version == pinned), None)
        if match is None and pinned not in self._failed.get(name, {}):
            self._refuse(report, name, pinned, f"pinned version {name}/{pinned} not found")
        return match

    async def _load_and_swap(self, target: ModelVersion, report: ScanReport) -> bool:
        """Load ``target`` and swap it in; False (and remembered as failed) if it was refused."""
        name = target.name
        log.info("loading %s/%s from %s", name, target.version, target.directory)
        try:
            loaded = await asyncio.to_thread(self._loader, target, self.settings, self._builder)
        except (LoadError, ManifestError, OSError) as exc:
            self._refuse(report, name, target.version, str(exc).splitlines()[0])
            return False
        previous = self._models.get(name)
        if (previous is not None and previous.version == target.version
                and previous.device == loaded.session.device):
            log.info("%s/%s: still on %s after the retry (%s)", name, target.version,
                     previous.device, loaded.session.selection.fallback_reason)
            return True  # the one serving is as good; swapping would only churn its metrics
        served = self._activate(loaded)
        self._models[name] = served  # the atomic swap
        self._failed.get(name, {}).pop(target.version, None)
        report.loaded.append(f"{name}/{target.version}")
        log.info("serving %s/%s (%s, %s on %s, providers %s) loaded in %.2fs",
                 name, served.version, served.architecture, served.precision, served.device,
                 ",".join(loaded.session.providers), loaded.load_seconds)
        if previous is not None:
            task = asyncio.create_task(self._retire(previous))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return True

    def _refuse(self, report: ScanReport, name: str, version: int, reason: str) -> None:
        log.error("refused %s/%s: %s", name, version, reason)
        self._failed.setdefault(name, {})[version] = reason
        self._metrics.model_load_failures.labels(name).inc()
        report.failed.append(f"{name}/{version}: {reason}")

    def _activate(self, loaded: LoadedVersion) -> ServedModel:
        s = self.settings
        manifest, session = loaded.manifest, loaded.session
        labels = ModelLabels(manifest.name, str(manifest.version), manifest.architecture,
                             session.precision, session.device)
        metrics = self._metrics.model(labels)
        if manifest.tokenizer.max_length > s.max_batch_tokens:
            log.warning("%s: max_length %d exceeds max_batch_tokens %d; long texts run alone",
                        manifest.name, manifest.tokenizer.max_length, s.max_batch_tokens)
        batcher = Batcher(
            f"{manifest.name}/{manifest.version}", session.run, len(manifest.labels),
            max_texts=s.max_batch_texts, max_tokens=s.max_batch_tokens,
            max_delay_s=s.max_batch_delay_ms / 1000, cost_tokens=s.batch_cost_tokens,
            max_queue=s.max_queue_texts, metrics=metrics, pad_id=manifest.tokenizer.pad_id,
            admission=QueueAdmission(s.max_batch_texts, s.max_batch_tokens,
                                     s.max_queue_batches, s.max_queue_delay_ms / 1000),
        )
        batcher.start()
        metrics.loaded(loaded.load_seconds)
        metrics.device_selected(session.selection)
        metrics.set_ready(True)
        return ServedModel(loaded, batcher, metrics)

    async def _retire(self, served: ServedModel) -> None:
        served.state = "draining"
        served.metrics.set_ready(False)
        started = time.monotonic()
        await served.batcher.close(self.settings.drain_grace_s)
        self._metrics.remove_model(served.metrics.labels)
        log.info("unloaded %s/%s after %.2fs of draining", served.name, served.version,
                 time.monotonic() - started)

    async def close(self) -> None:
        """Stop every batcher (the server has already drained its calls)."""
        for served in self._models.values():
            served.state = "draining"
            served.metrics.set_ready(False)
        await asyncio.gather(*(m.batcher.close(0.0) for m in self._models.values()),
                             *self._retiring, return_exceptions=True)
