"""The data plane shared by every transport: validate, tokenize, queue, wait, shape results.

The gRPC skins (``transport/native.py`` for seqserve.v1, ``transport/open_inference.py`` for the
Open Inference Protocol) only convert messages and map ``ServingError`` to a status; every rule
about requests lives here, once. Validation and tokenization happen in the request handler,
before anything is queued: token counts are then known to the batcher, and a bad request fails
alone.

Admission comes before any work: a request the model's queue cannot take is refused before it
is tokenized. Small requests are tokenized inline on the event loop (resolving the model,
tokenizing and queueing with no ``await`` in between, so a hot swap never lands between them);
large ones in a worker thread, so that no request can stall the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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

# Requests with more characters than this are tokenized in a worker thread (~16 KiB tokenizes
# in about 2 ms: longer would hold up every other call on the event loop).
OFF_LOOP_TOKENIZE_CHARS = 16_384
MAX_NAME_IN_MESSAGE = 64
TOKENIZE_WORKERS = 2


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
        self._tokenize_pool = ThreadPoolExecutor(max_workers=TOKENIZE_WORKERS,
                                                 thread_name_prefix="tokenize")
        self.shadow = (ShadowMirror(settings.shadow, metrics, settings.shadow_max_pending,
                                    self._classify_mirrored) if settings.shadow else None)

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

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

    def refused(self, error: ServingError, model: str = "") -> None:
        """Count a request a skin refused before it could reach ``classify``: under the
        model's labels when it names a served model, else under empty ones (nothing a client
        sends becomes a label value)."""
        served = self.registry.get(model) if model else None
        metrics = served.metrics if served is not None else self._unresolved
        metrics.reject(error.reason)
        metrics.request_done(error.code, 0.0)

    async def classify(self, call: ClassifyCall) -> ClassifyOutcome:
        started = time.monotonic()
        metrics = self._unresolved
        try:
            self.lifecycle.check_accepting()
            # Resolved first (a dictionary lookup), so that a refusal is counted under the
            # model's labels, where its dashboards and alerts look.
            served = self._resolve(call.model, call.version)
            metrics = served.metrics
            if self.lifecycle.inflight >= self.settings.max_inflight_requests:
                raise ServingError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server overloaded: {self.lifecycle.inflight} calls in flight (limit "
                    f"{self.settings.max_inflight_requests}); retry with backoff or on another "
                    "replica", "overloaded")
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
        # Mirrored texts may fill only part of the queue, so a shadow never pushes the shadow
        # model's own callers into RESOURCE_EXHAUSTED.
        share = SHADOW_QUEUE_SHARE if call.mirrored else 1.0
        # Refused before any work: a request that cannot be queued is not tokenized first.
        served.batcher.check_room(len(call.texts), call.deadline, share=share)
        texts = list(call.texts)
        tokenize_started = time.monotonic()
        served, ids, truncated = await self._tokenize(served, texts)
        tokenize_s = time.monotonic() - tokenize_started
        if self.settings.truncation == "reject" and any(truncated):
            index = truncated.index(True)
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{call.field}[{index}]: longer than the {served.loaded.tokenizer.max_length} "
                f"tokens model {served.name} accepts (the server runs with --truncation "
                "reject)",
                "too_long",
            )
        pending = served.batcher.submit(ids, call.deadline, share=share)
        served.metrics.tokenized(tokenize_s)
        batched = await pending
        served.metrics.queued(batched.queue_s)
        results = _results(served.labels, batched.probabilities, ids, truncated, call.top_k)
        timing = Timing(
            queue_s=batched.queue_s, tokenize_s=tokenize_s, inference_s=batched.inference_s,
            total_s=time.monotonic() - started, batch_size=batched.batch_size,
            batches=batched.batches,
        )
        return ClassifyOutcome(served, results, timing)

    async def _tokenize(self, served: ServedModel, texts: list[str]
                        ) -> tuple[ServedModel, list[list[int]], list[bool]]:
        """Token ids with the served version's tokenizer. A small request is tokenized right
        here, so resolving, tokenizing and queueing happen with no await between them and a
        hot swap cannot land in the middle. A large one goes to a worker thread, so it cannot
        stall the calls (and health checks) behind it; if a swap landed meanwhile, it is
        tokenized again for the version now served."""
        if sum(len(text) for text in texts) < OFF_LOOP_TOKENIZE_CHARS:
            return served, *served.loaded.tokenizer.token_ids(texts)
        loop = asyncio.get_running_loop()
        while True:
            ids, truncated = await loop.run_in_executor(
                self._tokenize_pool, served.loaded.tokenizer.token_ids, texts)
            current = self.registry.get(served.name)
            if current is None or current is served:
                return served, ids, truncated
            served = current

    def _validate(self, served: ServedModel, call: ClassifyCall) -> None:
        field, count, limit = call.field, len(call.texts), self.settings.max_texts_per_request
        if count == 0:
            raise invalid(f"{field}: at least one text is required")
        if count > limit:
            raise invalid(f"{field}: {count} texts, more than the limit of {limit} per request")
        max_text, max_request = self.settings.max_text_bytes, self.settings.max_request_bytes
        for index, text in enumerate(call.texts):
            if not text or text.isspace():
                raise invalid(f"{field}[{index}]: empty or whitespace-only text")
            # A character is 1-4 bytes in UTF-8: only a non-ASCII text near the bound is encoded
            # to count (isascii() reads a flag of the string; encoding 4 MiB takes ~2 ms).
            if len(text) * 4 > max_text and (size := _utf8_size(text)) > max_text:
                raise invalid(f"{field}[{index}]: {size} bytes, more than the limit of "
                              f"{max_text} per text (--max-text-bytes)")
        if sum(len(text) for text in call.texts) * 4 > max_request:
            total = sum(_utf8_size(text) for text in call.texts)
            if total > max_request:
                raise invalid(f"{field}: {total} bytes in all, more than the limit of "
                              f"{max_request} per request (--max-request-bytes)")
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
            # Bounded (a client may send a megabyte of name) and without the list of models:
            # ListModels says what is served, to those allowed to ask.
            shown = name if len(name) <= MAX_NAME_IN_MESSAGE else name[:MAX_NAME_IN_MESSAGE] + "…"
            raise not_found(f"model {shown!r} is not loaded")
        if version is not None and version != served.version:
            raise not_found(f"model {name} version {version} is not loaded "
                            f"(serving version {served.version})")
        return served

    def _view(self, served: ServedModel) -> ModelView:
        return ModelView(served, self.registry.available_versions(served.name),
                         self.registry.failed_versions(served.name),
                         self.settings.max_texts_per_request)


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _results(
    labels: list[str], probabilities: np.ndarray, ids: list[list[int]], truncated: list[bool],
    top_k: int,
) -> list[TextResult]:
    best = probabilities.argmax(axis=1).tolist()
    scores = probabilities.max(axis=1).tolist()
    ranking: list[list[int]] = [[] for _ in ids]
    if top_k:
        # Stable sort on the negated scores: ties keep label order, so results are
        # deterministic.
        ranking = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k].tolist()
    return [
        TextResult(
            label=labels[best[row]],
            score=scores[row],
            top=[(labels[i], float(probabilities[row, i])) for i in ranking[row]],
            token_count=len(ids[row]),
            truncated=truncated[row],
            probabilities=probabilities[row],
        )
        for row in range(len(ids))
    ]
