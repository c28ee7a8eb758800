"""A small typed client for seqserve.v1: ``Client`` (blocking) and ``AsyncClient`` (asyncio),
with the channel defaults every client shares (keepalive, reconnect backoff). Several replicas:
``service/replica_client.py``.

Results come back as plain dataclasses, and every failure as ``ClientError`` carrying the gRPC
status code, so callers (the CLI, the benchmark, tests) never touch protobuf messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.seqserve.v1 import seqserve_pb2 as pb
from protos.seqserve.v1 import seqserve_pb2_grpc as pb_grpc
from service import defaults
from service.channel_security import ChannelSecurity, open_aio_channel, open_channel

DEFAULT_TARGET = defaults.SERVER
# Keepalive: 10 s is the shortest ping interval seqserve's default server accepts without data
# (keepalive_min_client_ping_s): a 1 s client keepalive had an idle stream GOAWAYed
# (too_many_pings) within 4 s; 10 s kept one 36 s. Dead connections of a cut or hung node are
# found within keepalive time + timeout; the replica-aware mode does not wait for that.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
# Reconnect at most 1 s apart, and give up a connect attempt after 1 s (gRPC's default: 20 s),
# so a replica back on the network is reconnected within about a second, not after its SYN's
# next retransmission (3, 7, 15 s ...) or a backoff grown to minutes during a long outage.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200),
                     ("grpc.max_reconnect_backoff_ms", 1_000),
                     ("grpc.min_reconnect_backoff_ms", 1_000)]
# Responses carry one result per text; leave room for large requests' answers.
_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS), *RECONNECT_OPTIONS]


def merged_options(options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The client's default channel arguments, each one ``options`` names replaced by it."""
    given = {name for name, _ in options}
    return [*(o for o in _OPTIONS if o[0] not in given), *options]


class ClientError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> ClientError:
        return cls(error.code(), error.details() or "")  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    top: list[tuple[str, float]]
    token_count: int
    truncated: bool


@dataclass(frozen=True)
class Timing:
    """Server-side timings, in microseconds."""

    queue_us: int
    tokenize_us: int
    inference_us: int
    total_us: int
    batch_size: int
    batches: int


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    version: int
    architecture: str
    precision: str
    device: str
    results: list[Classification]
    timing: Timing | None  # None: the protocol does not report it (the Open Inference Protocol)
    id: str = ""


@dataclass(frozen=True)
class ModelDescription:
    name: str
    version: int
    architecture: str
    precision: str
    device: str
    labels: list[str]
    max_length: int
    state: str
    providers: list[str] = field(default_factory=list)
    available_versions: list[int] = field(default_factory=list)
    failed_versions: dict[int, str] = field(default_factory=dict)
    load_seconds: float = 0.0
    evaluation: dict[str, Any] = field(default_factory=dict)
    max_texts_per_request: int = 0  # 0: a server too old to say
    source: str = ""
    device_fallback_reason: str = ""  # why CPU although the policy would have used CUDA
    device_gate: dict[str, Any] = field(default_factory=dict)  # fp16 re-gated on the device
    placement: dict[str, int] = field(default_factory=dict)  # provider -> graph nodes
    cpu_compute_nodes: list[str] = field(default_factory=list)  # compute ops CUDA left on CPU
    memcpy_nodes: int = 0  # host-device copy nodes ORT inserted in a CUDA session
    precision_reason: str = ""  # why this precision (int8 where its gates passed, ...)
    intra_op_threads: int = 0  # 0: a server too old to say
    intra_op_threads_reason: str = ""
    fused_ops: dict[str, int] = field(default_factory=dict)  # fused ORT op -> nodes
    distillation: dict[str, Any] = field(default_factory=dict)  # teacher, transfer set; {}: none


@dataclass(frozen=True)
class StreamItem:
    """One ClassifyStream answer: a result, or the error of that one request."""

    result: ClassifyResult | None
    error: ClientError | None


def request(texts: Sequence[str], model: str, version: int | None = None, top_k: int = 0,
            request_id: str = "") -> pb.ClassifyRequest:
    message = pb.ClassifyRequest(model=model, texts=list(texts), top_k=top_k, id=request_id)
    if version is not None:
        message.version = version
    return message


def from_response(message: pb.ClassifyResponse) -> ClassifyResult:
    t = message.timing
    return ClassifyResult(
        model=message.model, version=message.version, architecture=message.architecture,
        precision=message.precision, device=message.device, id=message.id,
        results=[
            Classification(r.label, r.score, [(s.label, s.score) for s in r.top],
                           r.token_count, r.truncated)
            for r in message.results
        ],
        timing=Timing(t.queue_us, t.tokenize_us, t.inference_us, t.total_us, t.batch_size,
                      t.batches),
    )


def from_model_info(info: pb.ModelInfo) -> ModelDescription:
    ev = info.evaluation
    # Empty when the model was published without evaluation.
    evaluation = {name.name: getattr(ev, name.name) for name in ev.DESCRIPTOR.fields
                  if not name.has_presence or ev.HasField(name.name)
                  } if info.HasField("evaluation") else {}
    return ModelDescription(
        name=info.name, version=info.version, architecture=info.architecture,
        precision=info.precision, device=info.device, labels=list(info.labels),
        max_length=info.max_length, state=pb.ModelState.Name(info.state),
        providers=list(info.providers), available_versions=list(info.available_versions),
        failed_versions={f.version: f.reason for f in info.failed_versions},
        load_seconds=info.load_seconds, evaluation=evaluation,
        max_texts_per_request=info.max_texts_per_request, source=info.source,
        device_fallback_reason=info.device_fallback_reason,
        device_gate=_fields_of(info.device_gate) if info.HasField("device_gate") else {},
        placement={p.provider: p.nodes for p in info.placement},
        cpu_compute_nodes=list(info.cpu_compute_nodes), memcpy_nodes=info.memcpy_nodes,
        precision_reason=info.precision_reason, intra_op_threads=info.intra_op_threads,
        intra_op_threads_reason=info.intra_op_threads_reason,
        fused_ops={f.op_type: f.count for f in info.fused_ops},
        distillation=_fields_of(info.distillation) if info.HasField("distillation") else {},
    )


def _fields_of(message: Any) -> dict[str, Any]:
    """A message's fields as a dict; unset optional fields left out."""
    return {f.name: value if isinstance(value, str | int | float) else list(value)
            for f in message.DESCRIPTOR.fields
            if not f.has_presence or message.HasField(f.name)
            for value in [getattr(message, f.name)]}


def _stream_item(message: pb.ClassifyStreamResponse) -> StreamItem:
    if message.HasField("error"):
        code = next((c for c in grpc.StatusCode if c.value[0] == message.error.code),
                    grpc.StatusCode.UNKNOWN)
        return StreamItem(None, ClientError(code, message.error.message))
    return StreamItem(from_response(message.response), None)


class Client:
    """Blocking client; thread-safe (one channel, as gRPC recommends)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] = (),
                 security: ChannelSecurity | None = None) -> None:
        """``options``: extra gRPC channel arguments, e.g. ``("grpc.service_config", json)``
        for client-side load balancing and retries over several replicas. ``security``: TLS,
        mutual TLS and a bearer token (``ChannelSecurity.from_files``); None: plaintext."""
        self.target = target
        self.timeout = timeout
        self._channel = open_channel(target, merged_options(options), security)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def classify(self, texts: Sequence[str], *, model: str, version: int | None = None,
                 top_k: int = 0, timeout: float | None = None, request_id: str = ""
                 ) -> ClassifyResult:
        try:
            response = self._stub.Classify(request(texts, model, version, top_k, request_id),
                                           timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise ClientError.from_rpc(error) from None
        return from_response(response)

    def classify_async(self, texts: Sequence[str], *, model: str, version: int | None = None,
                       top_k: int = 0, timeout: float | None = None) -> PendingResult:
        """Send without waiting (many calls can be in flight from one thread)."""
        future = self._stub.Classify.future(request(texts, model, version, top_k),
                                            timeout=timeout or self.timeout)
        return PendingResult(future)

    def classify_stream(self, requests: Iterable[pb.ClassifyRequest], *,
                        timeout: float | None = None) -> Iterator[StreamItem]:
        """One item per request, in order; build requests with ``client.request(...)``."""
        try:
            for message in self._stub.ClassifyStream(iter(requests),
                                                     timeout=timeout or self.timeout):
                yield _stream_item(message)
        except grpc.RpcError as error:
            raise ClientError.from_rpc(error) from None

    def list_models(self) -> list[ModelDescription]:
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as error:
            raise ClientError.from_rpc(error) from None
        return [from_model_info(info) for info in response.models]

    def get_model(self, name: str, version: int | None = None) -> ModelDescription:
        message = pb.GetModelRequest(model=name)
        if version is not None:
            message.version = version
        try:
            return from_model_info(self._stub.GetModel(message, timeout=self.timeout).model)
        except grpc.RpcError as error:
            raise ClientError.from_rpc(error) from None

    def health(self, service: str = "") -> str:
        """"SERVING", "NOT_SERVING", ... for the whole server ("") or one gRPC service."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=self.timeout or 5.0)
        except grpc.RpcError as error:
            raise ClientError.from_rpc(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class PendingResult:
    def __init__(self, future: grpc.Future) -> None:
        self._future = future

    def result(self, timeout: float | None = None) -> ClassifyResult:
        try:
            return from_response(self._future.result(timeout=timeout))
        except grpc.RpcError as error:
            raise ClientError.from_rpc(error) from None

    def cancel(self) -> bool:
        return self._future.cancel()


class AsyncClient:
    """asyncio client for load generators: ``async with AsyncClient(target) as client``."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] = (),
                 security: ChannelSecurity | None = None) -> None:
        """``options`` and ``security``: as for ``Client``."""
        self.target = target
        self.timeout = timeout
        self._channel = open_aio_channel(target, merged_options(options), security)
        self._stub = pb_grpc.ClassifierStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def classify(self, texts: Sequence[str], *, model: str, version: int | None = None,
                       top_k: int = 0, timeout: float | None = None, request_id: str = ""
                       ) -> ClassifyResult:
        try:
            response = await self._stub.Classify(
                request(texts, model, version, top_k, request_id),
                timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise ClientError.from_rpc(error) from None
        return from_response(response)

    async def list_models(self) -> list[ModelDescription]:
        try:
            response = await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as error:
            raise ClientError.from_rpc(error) from None
        return [from_model_info(info) for info in response.models]
