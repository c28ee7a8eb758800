"""The data plane shared by every transport: validate, tokenize, queue, wait, shape results.

The gRPC skins (``transport/native.py`` for seqserve.v1, ``transport/open_inference.py`` for the
Open Inference Protocol) only convert messages and map ``ServingError`` to a status; every rule
about requests lives here, once. Validation and tokenization happen in the request handler,
before anything is queued: token counts are then known to the batcher, and a bad request fails
alone.

Tokenization runs inline on the event loop on purpose: resolving the model, tokenizing and
queueing with no ``await`` in between means a hot swap can never land between them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from service.server.errors import ServingError, invalid, not_found
from service.server.lifecycle import Lifecycle, State
from service.server.metrics import UNRESOLVED, ServingMetrics
from service.server.registry import ModelRegistry, ServedModel
from service.server.settings import ServeSettings
from service.server.shadow import SHADOW_QUEUE_SHARE, ShadowMirror

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifyCall:
    model: str
    texts: Sequence[str]
    version: int | None = None
    top_k: int = 0
    deadline: float | None = None  # monotonic seconds
    field: str = "texts"  # how error messages name the texts (OIP calls them "TEXT")
    mirrored: bool = False  # a shadow copy of another model's request: never mirrored again


@dataclass(frozen=True)
class TextResult:
    label: str
    score: float
    top: list[tuple[str, float]]
    token_count: int
    truncated: bool
    probabilities: np.ndarray  # float32 [labels]


@dataclass(frozen=True)
class Timing:
    queue_s: float
    tokenize_s: float
    inference_s: float
    total_s: float
    batch_size: int
    batches: int


@dataclass(frozen=True)
class ClassifyOutcome:
    model: ServedModel
    results: list[TextResult]
    timing: Timing


@dataclass(frozen=True)
class ModelView:
    """What GetModel / ListModels / ModelMetadata report about a served model."""

    served: ServedModel
    available_versions: list[int]
    failed_versions: dict[int, str]
    max_texts_per_request: int


class InferenceCore:
    def __init__(
        self,
        settings: ServeSettings,
        registry: ModelRegistry,
        lifecycle: Lifecycle,
        metrics: ServingMetrics,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.lifecycle = lifecycle
        self._unresolved = metrics.model(UNRESOLVED)
        self.shadow = (ShadowMirror(settings.shadow, metrics, settings.shadow_max_pending,
                                    self._classify_mirrored) if settings.shadow else None)

    # --- control plane ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.lifecycle.state is State.SERVING

    def list_models(self) -> list[ModelView]:
        return [self._view(served) for served in self.registry.models()]

    def get_model(self, name: str, version: int | None = None) -> ModelView:
        return self._view(self._resolve(name, version))

    def model_ready(self, name: str, version: int | None = None) -> bool:
        try:
            served = self._resolve(name, version)
        except ServingError:
            return False
        return self.ready and served.state == "ready"

    # --- data plane ---------------------------------------------------------------------

    def refused(self, error: ServingError) -> None:
        """Count a request a skin refused before it could reach ``classify``."""
        self._unresolved.reject(error.reason)
        self._unresolved.request_done(error.code, 0.0)

    async def classify(self, call: ClassifyCall) -> ClassifyOutcome:
        started = time.monotonic()
        metrics = self._unresolved
        try:
            self.lifecycle.check_accepting()
            served = self._resolve(call.model, call.version)
            metrics = served.metrics
            with self.lifecycle.track():
                metrics.inflight.inc()
                try:
                    outcome = await self._classify(served, call, started)
                finally:
                    metrics.inflight.dec()
        except ServingError as error:
            metrics.reject(error.reason)
            metrics.request_done(error.code, time.monotonic() - started)
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler when the caller cancels, and also at the deadline.
            now = time.monotonic()
            if call.deadline is not None and now >= call.deadline:
                metrics.reject("deadline_exceeded")
                metrics.request_done(grpc.StatusCode.DEADLINE_EXCEEDED, now - started)
            else:
                metrics.reject("cancelled")
                metrics.request_done(grpc.StatusCode.CANCELLED, now - started)
            raise
        metrics.request_done(grpc.StatusCode.OK, outcome.timing.total_s)
        if self.shadow is not None and not call.mirrored:
            self.shadow.offer(served.name, call.texts, [r.label for r in outcome.results])
        return outcome

    async def _classify_mirrored(self, model: str, texts: list[str]) -> list[str]:
        outcome = await self.classify(ClassifyCall(model=model, texts=texts, mirrored=True))
        return [result.label for result in outcome.results]

    async def _classify(
        self, served: ServedModel, call: ClassifyCall, started: float
    ) -> ClassifyOutcome:
        self._validate(served, call)
        tokenizer = served.loaded.tokenizer
        tokenize_started = time.monotonic()
        ids, truncated = tokenizer.token_ids(list(call.texts))
        tokenize_s = time.monotonic() - tokenize_started
        if self.settings.truncation == "reject" and any(truncated):
            index = truncated.index(True)
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{call.field}[{index}]: longer than the {tokenizer.max_length} tokens model "
                f"{served.name} accepts (the server runs with --truncation reject)",
                "too_long",
            )
        batcher = served.batcher
        job = batcher.new_job(len(ids), call.deadline)
        # Mirrored texts may fill only part of the queue, so a shadow never pushes the shadow
        # model's own callers into RESOURCE_EXHAUSTED.
        limit = int(batcher.max_queue * SHADOW_QUEUE_SHARE) if call.mirrored else None
        batcher.submit(job, ids, limit=limit)
        served.metrics.tokenized(tokenize_s)
        await job.future
        served.metrics.queued(job.queue_seconds)
        results = _results(served.labels, job.probabilities, ids, truncated, call.top_k)
        timing = Timing(
            queue_s=job.queue_seconds, tokenize_s=tokenize_s,
            inference_s=job.inference_seconds, total_s=time.monotonic() - started,
            batch_size=job.batch_size, batches=job.batches,
        )
        return ClassifyOutcome(served, results, timing)

    def _validate(self, served: ServedModel, call: ClassifyCall) -> None:
        field, count, limit = call.field, len(call.texts), self.settings.max_texts_per_request
        if count == 0:
            raise invalid(f"{field}: at least one text is required")
        if count > limit:
            raise invalid(f"{field}: {count} texts, more than the limit of {limit} per request")
        for index, text in enumerate(call.texts):
            if not text or text.isspace():
                raise invalid(f"{field}[{index}]: empty or whitespace-only text")
        labels = len(served.labels)
        if call.top_k < 0 or call.top_k > labels:
            raise invalid(f"top_k: {call.top_k} is outside 0..{labels} "
                          f"(model {served.name} has {labels} labels)")

    def _resolve(self, name: str, version: int | None) -> ServedModel:
        if not name:
            raise invalid("model: a model name is required")
        if version is not None and version < 1:
            raise invalid(f"version: {version} is not a version number (they start at 1)")
        served = self.registry.get(name)
        if served is None:
            names = ", ".join(m.name for m in self.registry.models()) or "none"
            raise not_found(f"model {name!r} is not loaded (loaded: {names})")
        if version is not None and version != served.version:
            raise not_found(f"model {name} version {version} is not loaded "
                            f"(serving version {served.version})")
        return served

    def _view(self, served: ServedModel) -> ModelView:
        return ModelView(served, self.registry.available_versions(served.name),
                         self.registry.failed_versions(served.name),
                         self.settings.max_texts_per_request)


def _results(
    labels: list[str], probabilities: np.ndarray, ids: list[list[int]], truncated: list[bool],
    top_k: int,
) -> list[TextResult]:
    best = probabilities.argmax(axis=1)
    # Stable sort on the negated scores: ties keep label order, so results are deterministic.
    ranking = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    return [
        TextResult(
            label=labels[best[row]],
            score=float(probabilities[row, best[row]]),
            top=[(labels[i], float(probabilities[row, i])) for i in ranking[row]],
            token_count=len(ids[row]),
            truncated=truncated[row],
            probabilities=probabilities[row],
        )
        for row in range(len(ids))
    ]
