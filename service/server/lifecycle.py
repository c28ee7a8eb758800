"""Server lifecycle and the standard ``grpc.health.v1`` status that mirrors it.

loading -> serving -> draining. Health answers NOT_SERVING for the overall service ("") and for
every served gRPC service name while loading and while draining, so Kubernetes gRPC probes and
load balancers stop sending traffic before the process goes away. Draining refuses new calls
with UNAVAILABLE and waits, at most the grace period, for the calls in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Iterator, Sequence

from grpc_health.v1 import health, health_pb2

from service.server.errors import unavailable

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class State(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"


class Lifecycle:
    def __init__(self, services: Sequence[str]) -> None:
        self.health = health.aio.HealthServicer()
        self.state = State.LOADING
        self._services = ["", *services]
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._force = asyncio.Event()
        self._last_refused = 0.0  # monotonic time of the last call refused while draining

    @property
    def inflight(self) -> int:
        return self._inflight

    async def loading(self) -> None:
        await self._set_all(NOT_SERVING)

    async def serving(self) -> None:
        self.state = State.SERVING
        await self._set_all(SERVING)
        log.info("serving")

    def check_accepting(self) -> None:
        if self.state is State.LOADING:
            raise unavailable("server is still loading its models; retry shortly")
        if self.state is State.DRAINING:
            self._last_refused = time.monotonic()
            raise unavailable("server is shutting down; retry on another instance")

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a call as in flight for the drain."""
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def drain(self, grace: float) -> bool:
        """NOT_SERVING, refuse new calls, wait for the calls in flight; True if all finished."""
        if self.state is not State.DRAINING:
            self.state = State.DRAINING
            # Also makes later set() calls no-ops, so nothing flips health back to SERVING.
            await self.health.enter_graceful_shutdown()
            log.info("draining: %d call(s) in flight, grace %.1fs", self._inflight, grace)
        idle = asyncio.ensure_future(self._idle.wait())
        force = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait({idle, force}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            force.cancel()
        if self._inflight:
            log.warning("grace period over with %d call(s) still in flight", self._inflight)
        return self._inflight == 0

    async def quiet(self, window: float, *, limit: float) -> None:
        """Wait until no call has been refused for ``window`` seconds, or ``limit`` passed."""
        deadline = time.monotonic() + limit
        while (now := time.monotonic()) < deadline and not self._force.is_set():
            wait = min(self._last_refused + window, deadline) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)  # a timer, not synchronisation: it re-checks the clock

    def force(self) -> None:
        """A second signal: stop waiting for calls in flight."""
        self._force.set()

    async def _set_all(self, status: int) -> None:
        for service in self._services:
            await self.health.set(service, status)
