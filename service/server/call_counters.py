"""Every call gRPC received, including the ones it shed before any of seqserve's code ran.

When the event loop falls behind, calls wait in gRPC core; beyond ``--max-pending-rpcs`` core
refuses them itself, with CANCELLED, and no handler (so no other seqserve metric) sees them.
gRPC's channelz keeps per-server counters in core, so two counters side by side account for
them:

* ``seqserve_grpc_calls_started_total``: calls gRPC core received (channelz ``calls_started``),
  with ``..._succeeded_total`` and ``..._failed_total`` (finished OK / with a status from a
  handler);
* ``seqserve_grpc_calls_handled_total``: calls that reached seqserve (counted by the first
  interceptor, before authentication, so refused calls count too).

``started - handled`` is the calls gRPC core shed or that their callers abandoned while they
waited in it, plus, at the instant of a scrape, the calls still waiting (at most
``--max-pending-rpcs``): over a rate window the waiting ones vanish, which is how the alert
rule reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_channelz.v1 import channelz, channelz_pb2
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

Continuation = Callable[[grpc.HandlerCallDetails], Any]


class _Local:
    """The context channelz's servicer reports an error to when it is called in-process."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        pass


def channelz_server_ids() -> set[int]:
    """The channelz ids of the gRPC servers alive in this process."""
    ids: set[int] = set()
    start = 0
    while True:
        page = channelz.ChannelzServicer.GetServers(
            channelz_pb2.GetServersRequest(start_server_id=start), _Local())
        if page is None:
            return ids
        ids.update(server.ref.server_id for server in page.server)
        if page.end or not page.server:
            return ids
        start = max(server.ref.server_id for server in page.server) + 1


class HandledCalls(grpc.aio.ServerInterceptor):
    """Counts the calls that reached seqserve's Python code. Runs on the event loop only."""

    def __init__(self) -> None:
        self.count = 0

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails
                                ) -> grpc.RpcMethodHandler | None:
        self.count += 1
        return await continuation(handler_call_details)


class GrpcCallCounters(Collector):
    """The Prometheus view of one server's channelz counters and of ``HandledCalls``."""

    def __init__(self, handled: HandledCalls) -> None:
        self.handled = handled
        self.server_id: int | None = None

    def attach(self, before: set[int]) -> None:
        """Find this server's channelz id: the one server that appeared since ``before``."""
        new = channelz_server_ids() - before
        if len(new) == 1:
            self.server_id = new.pop()
        else:  # another server started in this process at the same moment (tests)
            log.warning("cannot tell this server's channelz counters apart (%d new servers); "
                        "seqserve_grpc_calls_started_total is not exported", len(new))

    def collect(self) -> Iterator[CounterMetricFamily]:
        handled = CounterMetricFamily(
            "seqserve_grpc_calls_handled", "gRPC calls that reached seqserve's handlers "
            "(every method, refused ones included)", value=self.handled.count)
        started = CounterMetricFamily(
            "seqserve_grpc_calls_started", "gRPC calls this server's gRPC core received "
            "(channelz); minus ..._handled_total: the calls it shed (CANCELLED) or whose "
            "callers left while they waited in it")
        succeeded = CounterMetricFamily(
            "seqserve_grpc_calls_succeeded", "gRPC calls that finished OK (channelz)")
        failed = CounterMetricFamily(
            "seqserve_grpc_calls_failed", "gRPC calls that finished with an error status set "
            "by a handler (channelz)")
        data = self._channelz_data()
        if data is not None:  # none before the server started, after it stopped
            started.add_metric([], data.calls_started)
            succeeded.add_metric([], data.calls_succeeded)
            failed.add_metric([], data.calls_failed)
        yield from (handled, started, succeeded, failed)

    def _channelz_data(self) -> channelz_pb2.ServerData | None:
        if self.server_id is None:
            return None
        response = channelz.ChannelzServicer.GetServer(
            channelz_pb2.GetServerRequest(server_id=self.server_id), _Local())
        if response is None or not response.HasField("server"):
            return None
        return response.server.data
