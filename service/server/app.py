"""Assembles the server: one ``grpc.aio`` port for seqserve.v1, the Open Inference Protocol,
health and reflection; a Prometheus port; the registry's poller; signals.

Start-up order matters for probes: the port opens first with health NOT_SERVING, models load
and warm up, and only then does health turn SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.seqserve.v1 import seqserve_pb2
from service.server import heap
from service.server.call_counters import channelz_server_ids
from service.server.core import InferenceCore
from service.server.lifecycle import Lifecycle
from service.server.metrics import ServingMetrics
from service.server.registry import Loader, ModelRegistry
from service.server.runtime import SessionBuilder, load_version
from service.server.security import SecurityError, ServerSecurity
from service.server.settings import ServeSettings
from service.server.transport import native, open_inference
from service.server.transport.registration import add_servicer

log = logging.getLogger(__name__)

# The one stdout line a started server prints, for parents that start it on port 0.
READY_PREFIX = "seqserve: serving on "
SERVICES = (native.SERVICE_NAME, open_inference.SERVICE_NAME)
# After the drain, in-flight streams get this long to notice the server closing.
STOP_GRACE_S = 1.0
# After the drain, the server closes once no call has arrived for this long (within the grace).
QUIET_WINDOW_S = 0.25


class StartupError(Exception):
    """The server cannot start; the message is one line."""


def channel_options(settings: ServeSettings) -> list[tuple[str, int]]:
    ms = 1000
    options = [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * ms)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms",
         int(settings.keepalive_min_client_ping_s * ms)),
        # Fail loudly when the port is taken instead of silently sharing it.
        ("grpc.so_reuseport", 0),
        # When the event loop is the bottleneck, calls pile up in gRPC before any handler runs.
        # Beyond this many, C-core sheds them at once, before Python sees them (it reports them
        # CANCELLED: measured, README "Guarantees"), instead of parking them until their
        # deadline while memory grows (at 3x capacity: 406 MB and 95 % DEADLINE_EXCEEDED).
        ("grpc.server.max_pending_requests", settings.max_pending_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", settings.max_pending_rpcs),
    ]
    if settings.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_s * ms)))
        options.append(("grpc.max_connection_age_grace_ms",
                        int(settings.max_connection_age_grace_s * ms)))
    return options


class SeqServer:
    def __init__(
        self,
        settings: ServeSettings,
        *,
        builder: SessionBuilder | None = None,
        loader: Loader = load_version,
    ) -> None:
        self.settings = settings
        self.metrics = ServingMetrics()
        self.lifecycle = Lifecycle(SERVICES)
        self.registry = ModelRegistry(settings, self.metrics, builder, loader=loader)
        self.core = InferenceCore(settings, self.registry, self.lifecycle, self.metrics)
        self.security = ServerSecurity(settings)
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        host = self.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> None:
        """Open the port (NOT_SERVING), load every model, then turn SERVING."""
        s = self.settings
        try:
            self.security.load((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME))
        except SecurityError as exc:
            raise StartupError(str(exc)) from exc
        servers_before = channelz_server_ids()
        # The counter first, so that calls any later interceptor refuses are counted too.
        server = grpc.aio.server(options=channel_options(s),
                                 interceptors=[self.metrics.grpc_calls.handled,
                                               *self.security.interceptors])
        add_servicer(server, seqserve_pb2, "Classifier", native.ClassifierServicer(self.core),
                     refused=self.core.refused)
        add_servicer(server, open_inference.pb, "GRPCInferenceService",
                     open_inference.InferenceServicer(self.core), refused=self.core.refused)
        health_pb2_grpc.add_HealthServicer_to_server(self.lifecycle.health, server)
        if s.reflection:
            reflection.enable_server_reflection(
                (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        host = f"[{s.host}]" if ":" in s.host else s.host
        try:
            self.port = self.security.add_port(server, f"{host}:{s.port}")
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {host}:{s.port}: {exc}") from exc
        self._server = server
        await self.lifecycle.loading()
        await server.start()
        self.metrics.grpc_calls.attach(servers_before)
        log.info("listening on %s:%d (health NOT_SERVING while loading)", s.host, self.port)
        if s.metrics_port:
            try:
                self.metrics.start_http(s.metrics_host, s.metrics_port)
            except OSError as exc:
                await self.stop(grace=0)
                raise StartupError(
                    f"cannot serve metrics on {s.metrics_host}:{s.metrics_port}: {exc}") from exc
            log.info("metrics on http://%s:%d/metrics", s.metrics_host, s.metrics_port)
        await self._load()
        await self.lifecycle.serving()
        self._poller = asyncio.create_task(self.registry.poll(), name="repository-poller")

    async def _load(self) -> None:
        if not self.settings.repository.is_dir():
            await self.stop(grace=0)
            raise StartupError(f"model repository {self.settings.repository} is not a directory")
        report = await self.registry.scan()
        problem = None
        if report.failed and self.settings.strict_startup:
            problem = f"{len(report.failed)} model version(s) refused: {report.failed[0]}"
        elif not self.registry.models():
            problem = f"no model could be loaded from {self.settings.repository}"
        if problem:
            await self.stop(grace=0)
            raise StartupError(problem)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let calls in flight finish, then close."""
        grace = self.settings.drain_grace_s if grace is None else grace
        started = time.monotonic()
        drained = await self.lifecycle.drain(grace)
        if self._poller is not None:
            self._poller.cancel()
        if drained and grace > 0:
            # Keep answering UNAVAILABLE until callers stop arriving: a call that reaches gRPC
            # while it shuts down ends CANCELLED (grpc/grpc#41785), which a client does not
            # retry elsewhere the way it retries UNAVAILABLE.
            await self.lifecycle.quiet(QUIET_WINDOW_S,
                                       limit=max(0.0, grace - (time.monotonic() - started)))
        if self._server is not None:
            await self._server.stop(STOP_GRACE_S if drained else 0)
        if self.core.shadow is not None:
            await self.core.shadow.close()
        self.core.close()
        await self.registry.close()
        self.metrics.stop_http()
        log.info("stopped after %.2fs of draining (%s)", time.monotonic() - started,
                 "clean" if drained else "grace period exceeded")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(settings: ServeSettings, *, overridden: set[str] = frozenset()) -> int:
    """Run until SIGTERM/SIGINT (drain, exit 0); SIGHUP rescans the repository and rereads
    the TLS certificates and the token file."""
    for line in settings.describe(overridden):
        log.info("setting %s", line)
    loop = asyncio.get_running_loop()
    log.info("event loop: %s.%s", type(loop).__module__, type(loop).__name__)
    if heap.retain_freed(settings.heap_retain_bytes):
        log.info("heap: keeping up to %d MiB of freed memory for reuse",
                 settings.heap_retain_bytes >> 20)
    server = SeqServer(settings)
    stop = asyncio.Event()

    def on_stop(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: not waiting for calls in flight", signal.Signals(signum).name)
            server.lifecycle.force()
        else:
            log.info("%s received: draining", signal.Signals(signum).name)
            stop.set()

    def on_hup() -> None:
        log.info("SIGHUP received: rescanning the repository")
        server.registry.request_scan(retry_failed=True)
        server.security.reload()  # rotated certificates and token file

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # stopped while loading: nothing is in flight yet
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await server.stop(grace=0)
        return 0
    stopping.cancel()
    starting.result()  # raises StartupError
    # One line on stdout, for scripts that start the server on port 0 and need its address.
    print(f"{READY_PREFIX}{server.address}", flush=True)
    await stop.wait()
    await server.stop()
    return 0
