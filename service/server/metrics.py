"""Every Prometheus metric of the server, declared here and nowhere else.

Names follow Prometheus conventions (base units: seconds, ``_total`` counters). Every series of a
served model carries the same label set, ``model, version, architecture, precision, device``,
so the architectures can be put side by side with one ``by (architecture)``; ``code`` and
``reason`` take values from closed sets. Nothing client-controlled becomes a label value: a
request for an unknown model is counted under empty model labels.

Buckets are explicit and chosen on purpose: geometric for durations (a percentile is then off by
at most one factor of the ratio), powers of two for sizes and tokens, tenths for ratios.
Each server owns a ``CollectorRegistry``, so several servers can live in one process (tests).
gRPC core's own call counters are read from channelz at each scrape (``call_counters.py``).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.server.call_counters import GrpcCallCounters, HandledCalls
from service.server.errors import REASONS
from service.server.metrics_http import start_metrics_server
from service.server.sessions import FALLBACK_REASONS, DeviceSelection

MODEL_LABELS = ("model", "version", "architecture", "precision", "device")
SHADOW_LABELS = ("model", "shadow_model")
SHADOW_OUTCOMES = ("ok", "dropped", "error")


def geometric(start: float, factor: float, count: int) -> tuple[float, ...]:
    return tuple(start * factor**i for i in range(count))


# 100 µs .. 13 s: end-to-end and inference times, from a tiny batch to a long overload.
DURATION_BUCKETS = geometric(100e-6, 2.0, 18)
# 10 µs .. 5 s: queueing and tokenizing are often far below a millisecond.
SHORT_DURATION_BUCKETS = geometric(10e-6, 2.0, 20)
BATCH_SIZE_BUCKETS = geometric(1, 2, 11)  # 1 .. 1024 texts
PADDED_TOKEN_BUCKETS = geometric(8, 2, 15)  # 8 .. 131072 tokens
# 0 gets its own bucket: a batch with no padding at all is the best case worth seeing.
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class ModelLabels:
    model: str
    version: str
    architecture: str
    precision: str
    device: str

    def values(self) -> tuple[str, ...]:
        return astuple(self)


UNRESOLVED = ModelLabels("", "", "", "", "")


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        m = MODEL_LABELS
        self.request_duration = Histogram(
            "seqserve_request_duration_seconds", "End-to-end time of a request, on the server",
            m, buckets=DURATION_BUCKETS, registry=r)
        self.queue_duration = Histogram(
            "seqserve_queue_duration_seconds", "Time a request's texts waited for a batch",
            m, buckets=SHORT_DURATION_BUCKETS, registry=r)
        self.tokenize_duration = Histogram(
            "seqserve_tokenize_duration_seconds", "Time to tokenize a request's texts",
            m, buckets=SHORT_DURATION_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "seqserve_inference_duration_seconds", "ONNX Runtime time of one executed batch",
            m, buckets=DURATION_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "seqserve_batch_size", "Texts in one executed batch",
            m, buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_padded_tokens = Histogram(
            "seqserve_batch_padded_tokens", "Tokens computed in one batch (longest x texts)",
            m, buckets=PADDED_TOKEN_BUCKETS, registry=r)
        self.batch_padding_ratio = Histogram(
            "seqserve_batch_padding_ratio", "Share of a batch's computed tokens that are padding",
            m, buckets=RATIO_BUCKETS, registry=r)
        self.requests = Counter(
            "seqserve_requests", "Requests answered, by gRPC status code",
            (*m, "code"), registry=r)
        self.texts = Counter("seqserve_texts", "Texts classified", m, registry=r)
        self.tokens = Counter(
            "seqserve_tokens", "Real (unpadded) tokens classified", m, registry=r)
        self.rejections = Counter(
            "seqserve_rejections", "Requests refused or dropped, by reason",
            (*m, "reason"), registry=r)
        self.queue_depth = Gauge(
            "seqserve_queue_depth", "Texts waiting to be batched", m, registry=r)
        self.inflight = Gauge(
            "seqserve_inflight_requests", "Requests being processed", m, registry=r)
        self.model_info = Gauge(
            "seqserve_model_info", "Served model versions (always 1)", m, registry=r)
        self.model_load_duration = Gauge(
            "seqserve_model_load_duration_seconds",
            "Time to verify, load and warm up a model version", m, registry=r)
        self.model_ready = Gauge(
            "seqserve_model_ready", "1 when the model version accepts requests", m, registry=r)
        self.model_load_failures = Counter(
            "seqserve_model_load_failures", "Model versions refused at load", ("model",),
            registry=r)
        self.device_fallback = Gauge(
            "seqserve_device_fallback", "1 while a served version runs on CPU because CUDA "
            "could not be used, by reason (closed set: no_gpu_driver, missing_cuda_library, ...)",
            (*m, "reason"), registry=r)
        self.cuda_library_missing = Gauge(
            "seqserve_cuda_library_missing", "1 for each library the CUDA provider needs that "
            "was not found or did not load, 0 once it loaded (set when CUDA was tried)",
            ("library",), registry=r)
        self.device_gate_agreement = Gauge(
            "seqserve_device_gate_agreement", "Fraction of the evaluation slice on which the "
            "candidate precision predicted fp32's label, both run on the serving device",
            (*m, "candidate"), registry=r)
        self.device_gate_passed = Gauge(
            "seqserve_device_gate_passed", "1 when the candidate precision passed its re-gate on "
            "the serving device (and is served), 0 when fp32 is served instead",
            (*m, "candidate"), registry=r)
        self.cpu_compute_nodes = Gauge(
            "seqserve_cpu_compute_nodes", "Compute ops (MatMul, LSTM, float Gather, ...) ONNX "
            "Runtime placed on CPU in a CUDA session: each costs device copies", m, registry=r)
        self.memcpy_nodes = Gauge(
            "seqserve_memcpy_nodes", "MemcpyToHost/MemcpyFromHost nodes ONNX Runtime inserted "
            "in a CUDA session where data crosses between CPU and CUDA nodes: each is a "
            "host-device copy per batch", m, registry=r)
        self.repository_scans = Counter(
            "seqserve_repository_scans", "Scans of the model repository completed (polls, "
            "SIGHUP and start-up)", registry=r)
        self.shadow_requests = Counter(
            "seqserve_shadow_requests", "Mirrored requests, by outcome",
            (*SHADOW_LABELS, "outcome"), registry=r)
        self.shadow_agreement = Counter(
            "seqserve_shadow_agreement", "Mirrored texts where shadow and primary labels agree",
            (*SHADOW_LABELS, "agree"), registry=r)
        self.shadow_duration = Histogram(
            "seqserve_shadow_duration_seconds", "Time the shadow model took on a mirrored request",
            SHADOW_LABELS, buckets=DURATION_BUCKETS, registry=r)
        # seqserve_grpc_calls_{started,succeeded,failed,handled}_total
        self.grpc_calls = GrpcCallCounters(HandledCalls())
        r.register(self.grpc_calls)
        self._http: tuple[WSGIServer, Thread] | None = None

    def model(self, labels: ModelLabels) -> ModelMetrics:
        return ModelMetrics(self, labels)

    def remove_model(self, labels: ModelLabels) -> None:
        """Forget a swapped-out version's series, so dashboards stop showing it."""
        values = labels.values()
        for family in (
            self.request_duration, self.queue_duration, self.tokenize_duration,
            self.inference_duration, self.batch_size, self.batch_padded_tokens,
            self.batch_padding_ratio, self.texts, self.tokens, self.queue_depth, self.inflight,
            self.model_info, self.model_load_duration, self.model_ready,
            self.cpu_compute_nodes, self.memcpy_nodes,
        ):
            family.remove(*values)
        for reason in FALLBACK_REASONS:
            self.device_fallback.remove(*values, reason)
        for candidate in ("fp16", "int8"):
            self.device_gate_agreement.remove(*values, candidate)
            self.device_gate_passed.remove(*values, candidate)
        for code in grpc.StatusCode:
            self.requests.remove(*values, code.name)
        for reason in REASONS:
            self.rejections.remove(*values, reason)

    def start_http(self, host: str, port: int) -> None:
        """Serve ``/metrics`` (only that path) on ``host:port``; raises ``OSError``."""
        self._http = start_metrics_server(host, port, self.registry)

    def stop_http(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None


class ModelMetrics:
    """The series of one served model version, bound to its labels once."""

    def __init__(self, metrics: ServingMetrics, labels: ModelLabels) -> None:
        self.labels = labels
        self._m = metrics
        values = labels.values()
        self._request_duration = metrics.request_duration.labels(*values)
        self._queue = metrics.queue_duration.labels(*values)
        self._tokenize = metrics.tokenize_duration.labels(*values)
        self._inference = metrics.inference_duration.labels(*values)
        self._batch_size = metrics.batch_size.labels(*values)
        self._padded = metrics.batch_padded_tokens.labels(*values)
        self._ratio = metrics.batch_padding_ratio.labels(*values)
        self._texts = metrics.texts.labels(*values)
        self._tokens = metrics.tokens.labels(*values)
        self._depth = metrics.queue_depth.labels(*values)
        self.inflight = metrics.inflight.labels(*values)
        self._requests_by_code: dict[grpc.StatusCode, Any] = {}
        self._rejections_by_reason: dict[str, Any] = {}

    def loaded(self, seconds: float) -> None:
        values = self.labels.values()
        self._m.model_info.labels(*values).set(1)
        self._m.model_load_duration.labels(*values).set(seconds)

    def device_selected(self, selection: DeviceSelection) -> None:
        """Why the version runs where it runs: fallback reason, libraries, re-gate, placement."""
        values = self.labels.values()
        if selection.fallback_kind:
            self._m.device_fallback.labels(*values, selection.fallback_kind).set(1)
        for library, loaded in selection.libraries:
            self._m.cuda_library_missing.labels(library).set(0 if loaded else 1)
        gate = selection.gate
        if gate is not None:
            if gate.comparison is not None:
                self._m.device_gate_agreement.labels(*values, gate.candidate).set(
                    gate.comparison.agreement)
            self._m.device_gate_passed.labels(*values, gate.candidate).set(
                1 if gate.passed else 0)
        if self.labels.device.startswith("cuda"):
            self._m.cpu_compute_nodes.labels(*values).set(
                len(selection.placement.cpu_compute_nodes))
            self._m.memcpy_nodes.labels(*values).set(selection.placement.memcpy_nodes)

    def set_ready(self, ready: bool) -> None:
        self._m.model_ready.labels(*self.labels.values()).set(1 if ready else 0)

    def request_done(self, code: grpc.StatusCode, seconds: float) -> None:
        # Children are looked up once per code: labels() hashes and locks on every call, and
        # this runs once per request.
        counter = self._requests_by_code.get(code)
        if counter is None:
            counter = self._requests_by_code[code] = self._m.requests.labels(
                *self.labels.values(), code.name)
        counter.inc()
        self._request_duration.observe(seconds)

    def reject(self, reason: str, count: int = 1) -> None:
        counter = self._rejections_by_reason.get(reason)
        if counter is None:
            counter = self._rejections_by_reason[reason] = self._m.rejections.labels(
                *self.labels.values(), reason)
        counter.inc(count)

    def tokenized(self, seconds: float) -> None:
        self._tokenize.observe(seconds)

    def queued(self, seconds: float) -> None:
        self._queue.observe(seconds)

    def queue_depth(self, texts: int) -> None:
        self._depth.set(texts)

    def batch(self, texts: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        self._batch_size.observe(texts)
        self._padded.observe(padded_tokens)
        self._ratio.observe(1.0 - real_tokens / padded_tokens if padded_tokens else 0.0)
        self._inference.observe(seconds)
        self._texts.inc(texts)
        self._tokens.inc(real_tokens)


class ShadowMetrics:
    def __init__(self, metrics: ServingMetrics, primary: str, shadow: str) -> None:
        self._m = metrics
        self._labels = (primary, shadow)
        # Create every outcome at 0 so rate() sees the first drop or disagreement.
        for outcome in SHADOW_OUTCOMES:
            metrics.shadow_requests.labels(*self._labels, outcome)
        for agree in ("true", "false"):
            metrics.shadow_agreement.labels(*self._labels, agree)

    def outcome(self, outcome: str) -> None:
        self._m.shadow_requests.labels(*self._labels, outcome).inc()

    def compared(self, agree: int, disagree: int, seconds: float) -> None:
        self._m.shadow_agreement.labels(*self._labels, "true").inc(agree)
        self._m.shadow_agreement.labels(*self._labels, "false").inc(disagree)
        self._m.shadow_duration.labels(*self._labels).observe(seconds)
