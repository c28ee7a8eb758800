"""Several replicas, one client: the one home of the replica channel policy.

``service_config``/``channel_options`` are gRPC's own round_robin, health checking and retries
over several replicas; ``ReplicaClient`` is the opt-in replica-aware mode that hedges a slow
attempt onto another replica and ejects replicas that stop answering, for what gRPC's policies
do not do (measured in ``tests/reliability/test_replica_network.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from protos.inference import grpc_predict_v2_pb2 as oip_pb
from protos.seqserve.v1 import seqserve_pb2 as pb
from protos.seqserve.v1 import seqserve_pb2_grpc as pb_grpc
from service.channel_security import ChannelSecurity, open_aio_channel
from service.client import (
    AsyncClient,
    ClassifyResult,
    ClientError,
    from_response,
    merged_options,
    request,
)

CLASSIFIER = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
OPEN_INFERENCE = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


# UNAVAILABLE: a replica refusing calls while it drains, or gone. CANCELLED: a call that reached
# a replica in the instant its gRPC server shut down, before any handler took it, or one shed
# beyond the server's pending-call limit; gRPC core ends those CANCELLED, not UNAVAILABLE
# (grpc/grpc issue 41785), though nothing ran. Retrying either is safe only because both
# methods in ``service_config`` are idempotent.
RETRYABLE_CODES = ("UNAVAILABLE", "CANCELLED")


def service_config(*, max_attempts: int = 5, health_check: bool = True) -> dict[str, Any]:
    """gRPC's service config for several replicas: ``round_robin`` over every address,
    health-checked (a draining replica says NOT_SERVING and leaves the pick list before it
    stops), and retries of ``RETRYABLE_CODES`` for the idempotent inference methods of both
    APIs.

    What it cannot do (measured with grpcio 1.85 against replicas in network namespaces): a
    retry may land on the same replica, so a hung or slowed replica still holds a third of the
    calls; ``hedgingPolicy`` is ignored (one attempt reaches the server), and
    ``perAttemptRecvTimeout`` is ignored unless ``grpc.experimental.enable_hedging`` is set.
    ``ReplicaClient`` does both on distinct replicas."""
    method: dict[str, Any] = {"name": [{"service": CLASSIFIER, "method": "Classify"},
                                       {"service": OPEN_INFERENCE, "method": "ModelInfer"}]}
    if max_attempts > 1:  # gRPC refuses a retry policy of one attempt: 1 means no retries
        method["retryPolicy"] = {
            "maxAttempts": max_attempts, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
            "backoffMultiplier": 2, "retryableStatusCodes": list(RETRYABLE_CODES)}
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}],
                              "methodConfig": [method]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": CLASSIFIER}
    return config


def channel_options(config: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    """Channel arguments carrying ``config`` (default: ``service_config()``), for a channel to
    an ``ipv4:`` list of replicas (``round_robin_target``) or a ``dns:///`` name."""
    return [("grpc.service_config", json.dumps(config or service_config())),
            ("grpc.enable_retries", 1),
            # The addresses are the whole configuration: no resolver may replace it.
            ("grpc.service_config_disable_resolution", 1)]


def round_robin_target(addresses: Sequence[str]) -> str:
    """``ipv4:127.0.0.1:p1,127.0.0.1:p2,...``: one channel, one subchannel per replica."""
    return "ipv4:" + ",".join(addresses)


@dataclass(frozen=True)
class HedgePolicy:
    """How ``ReplicaClient`` spreads one call over replicas.

    A call starts on the next replica in round-robin order. When no answer has come after the
    hedge delay, it is also sent to another replica (``max_attempts`` distinct replicas at
    most), and the first answer wins; the others are cancelled. A retryable failure
    (``retry_codes``: nothing ran) goes to another replica at once. The hedge delay is the
    ``hedge_quantile`` of this client's recent winning attempts (``initial_hedge_s`` until it
    has ``min_samples``), within ``[min_hedge_s, max_hedge_s]``: hedging follows the
    replicas' own latency, so a healthy tail costs about 1 - quantile extra attempts.

    A replica strikes when its attempt fails retryably, is overtaken by a hedge, or is still
    pending at the deadline; ``eject_after`` strikes in a row (an answer resets them) eject it
    for ``eject_s``. Then one probe call (itself hedged) may try it; if it strikes again the
    ejection doubles, up to ``max_eject_s``, so a replica that is back rejoins within about that.
    With every replica ejected, calls still go to them: degraded, never refused by the client.
    """

    max_attempts: int = 3
    hedge_quantile: float = 0.95
    initial_hedge_s: float = 0.05
    min_hedge_s: float = 0.002
    max_hedge_s: float = 0.25
    min_samples: int = 64
    eject_after: int = 3
    eject_s: float = 0.25
    max_eject_s: float = 1.0
    # RESOURCE_EXHAUSTED: seqserve refuses before any work when a model is overloaded, so that
    # the caller goes to another replica; every attempt goes to a distinct replica, so a
    # cluster-wide overload costs at most max_attempts cheap refusals per call.
    retry_codes: tuple[str, ...] = (*RETRYABLE_CODES, "RESOURCE_EXHAUSTED")

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.eject_after < 1 or not 0 < self.hedge_quantile < 1:
            raise ValueError("HedgePolicy: max_attempts and eject_after >= 1, "
                             "0 < hedge_quantile < 1")


@dataclass
class ReplicaStats:
    """One replica as a ``ReplicaClient`` sees it (read-only for callers)."""

    address: str
    attempts: int = 0
    answered: int = 0  # attempts that won their call (an answer, OK or not)
    overtaken: int = 0  # attempts a hedge on another replica beat
    failed: int = 0  # retryable failures, and attempts still pending at the deadline
    strikes: int = 0
    ejected_until: float = 0.0  # time.monotonic()
    ejections: int = 0
    last_answer_at: float = 0.0


@dataclass
class _Replica:
    stats: ReplicaStats
    channel: grpc.aio.Channel
    stub: pb_grpc.ClassifierStub
    eject_s: float
    probing: bool = False


@dataclass
class _Attempt:
    replica: _Replica
    call: Any  # the grpc.aio call object, cancelled when another attempt wins
    started: float
    probe: bool


class ReplicaClient(AsyncClient):
    """The replica-aware mode of ``AsyncClient`` (opt-in): one channel per replica address and
    ``Classify`` hedged across them by ``HedgePolicy``.

    Why not gRPC's channel alone: measured against three replicas in network namespaces with
    32 callers and a 1 s deadline, round_robin with retries (and keepalive, and
    ``perAttemptRecvTimeout``) let 2 % of calls fail while one replica was SIGSTOPped and
    raised p99 from ~70 to ~680 ms while one was slowed to 0.3 s a batch; this mode keeps
    >= 99.9 % and p99 within 2x (tests/reliability/test_replica_network.py).

    The addresses are fixed (no DNS re-resolution: list the pods, or use ``channel_options``
    with a ``dns:///`` target). Only ``classify`` is hedged; ``list_models`` and the other
    methods use the first replica's channel. Each channel has the client's keepalive and
    reconnect settings and no retry policy: retrying on the same replica would only delay the
    move to another."""

    def __init__(self, addresses: Sequence[str], *, timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] = (),
                 security: ChannelSecurity | None = None,
                 policy: HedgePolicy | None = None) -> None:
        if not addresses:
            raise ValueError("ReplicaClient needs at least one address")
        self.policy = policy or HedgePolicy()
        self.target = round_robin_target(addresses)
        self.timeout = timeout
        self._replicas: list[_Replica] = []
        for address in addresses:
            channel = open_aio_channel(address, merged_options(options), security)
            self._replicas.append(_Replica(ReplicaStats(address), channel,
                                           pb_grpc.ClassifierStub(channel),
                                           self.policy.eject_s))
        self._channel, self._stub = self._replicas[0].channel, self._replicas[0].stub
        self._next = 0
        self._samples: list[float] = []  # recent winning attempts' latencies, a ring
        self._recorded = 0
        self._hedge_s = self.policy.initial_hedge_s

    @property
    def replicas(self) -> list[ReplicaStats]:
        return [replica.stats for replica in self._replicas]

    @property
    def hedge_delay_s(self) -> float:
        return self._hedge_s

    async def close(self) -> None:
        for replica in self._replicas:
            await replica.channel.close()

    async def classify(self, texts: Sequence[str], *, model: str, version: int | None = None,
                       top_k: int = 0, timeout: float | None = None, request_id: str = ""
                       ) -> ClassifyResult:
        message = request(texts, model, version, top_k, request_id)
        response = await self._hedged(lambda stub, left: stub.Classify(message, timeout=left),
                                      timeout or self.timeout)
        return from_response(response)

    def _pick(self, tried: set[int], *, fallback_ok: bool) -> tuple[int, bool] | None:
        """The next replica not tried yet, round robin: a healthy one, or an ejected one whose
        ejection is over and that has no probe out (it becomes the probe); else, with
        ``fallback_ok``, the ejected one due back soonest. None when there is none."""
        now, count = time.monotonic(), len(self._replicas)
        fallback = None
        for step in range(count):
            index = (self._next + step) % count
            if index in tried:
                continue
            replica = self._replicas[index]
            if replica.stats.strikes < self.policy.eject_after:
                return self._chose(index, probe=False)
            if replica.stats.ejected_until <= now and not replica.probing:
                replica.probing = True
                return self._chose(index, probe=True)
            if fallback is None or (replica.stats.ejected_until
                                    < self._replicas[fallback].stats.ejected_until):
                fallback = index
        return None if fallback is None or not fallback_ok else self._chose(fallback,
                                                                            probe=False)

    def _chose(self, index: int, *, probe: bool) -> tuple[int, bool]:
        # The turn moves past the replica chosen, not the one it started at: otherwise the
        # replica after an ejected one would take its turns as well as its own.
        self._next = (index + 1) % len(self._replicas)
        return index, probe

    def _strike(self, attempt: _Attempt, *, failed: bool) -> None:
        replica, stats, policy = attempt.replica, attempt.replica.stats, self.policy
        if failed:
            stats.failed += 1
        else:
            stats.overtaken += 1
        stats.strikes += 1
        if attempt.probe:
            replica.probing = False
            replica.eject_s = min(policy.max_eject_s, 2 * replica.eject_s)
        elif stats.strikes != policy.eject_after:
            return  # not yet out, or out already (its in-flight attempts striking late)
        stats.ejections += 1
        stats.ejected_until = time.monotonic() + replica.eject_s

    def _answered(self, attempt: _Attempt, ended: float) -> None:
        replica, stats = attempt.replica, attempt.replica.stats
        stats.answered += 1
        stats.last_answer_at = ended
        stats.strikes = 0
        replica.eject_s, replica.probing = self.policy.eject_s, False
        self._record(ended - attempt.started)

    def _record(self, latency: float) -> None:
        policy = self.policy
        ring = 4 * policy.min_samples
        if len(self._samples) < ring:
            self._samples.append(latency)
        else:
            self._samples[self._recorded % ring] = latency
        self._recorded += 1
        # Re-estimated every min_samples answers: sorting on every call would cost more than
        # the estimate moves.
        if self._recorded % policy.min_samples == 0:
            ordered = sorted(self._samples)
            quantile = ordered[min(len(ordered) - 1, int(policy.hedge_quantile * len(ordered)))]
            self._hedge_s = min(policy.max_hedge_s, max(policy.min_hedge_s, quantile))

    async def _hedged(self, send: Callable[[pb_grpc.ClassifierStub, float | None], Any],
                      timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        pending: dict[asyncio.Future[Any], _Attempt] = {}
        tried: set[int] = set()
        last_error: grpc.aio.AioRpcError | None = None

        def launch(*, hedge: bool = False) -> bool:
            if len(tried) >= min(self.policy.max_attempts, len(self._replicas)):
                return False
            # A hedge joins an attempt still out: sending it to a replica known to be bad
            # would only add to that replica's backlog.
            picked = self._pick(tried, fallback_ok=not hedge)
            if picked is None:
                return False
            index, probe = picked
            tried.add(index)
            replica = self._replicas[index]
            replica.stats.attempts += 1
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            call = send(replica.stub, left)
            pending[asyncio.ensure_future(_awaited(call))] = _Attempt(
                replica, call, time.monotonic(), probe)
            return True

        launch()
        hedging = True  # until no replica is left worth a hedge
        try:
            while pending:
                can_hedge = hedging and len(tried) < min(self.policy.max_attempts,
                                                         len(self._replicas))
                wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
                if can_hedge:
                    wait_s = self._hedge_s if wait_s is None else min(wait_s, self._hedge_s)
                done, _ = await asyncio.wait(pending, timeout=wait_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                ended = time.monotonic()
                if deadline is not None and ended >= deadline and not done:
                    break
                if not done:
                    hedging = launch(hedge=True)
                    continue
                retry = False
                for future in done:
                    attempt = pending.pop(future)
                    error = future.exception()
                    if not isinstance(error, grpc.aio.AioRpcError):
                        self._answered(attempt, ended)
                        for other in pending.values():
                            if other.started < attempt.started:  # overtaken by a later one
                                self._strike(other, failed=False)
                        return future.result()
                    code = error.code()
                    if code.name in self.policy.retry_codes:
                        self._strike(attempt, failed=True)
                        last_error, retry = error, True
                    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        self._strike(attempt, failed=True)
                        last_error = error
                    else:  # an answer (a bad request, an unknown model): the replica is fine
                        self._answered(attempt, ended)
                        raise ClientError.from_rpc(error) from None
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if retry:
                    launch()  # nothing ran: straight to another replica
            for attempt in pending.values():  # still out at the deadline
                self._strike(attempt, failed=True)
            pending.clear()
            if last_error is not None and last_error.code().name in self.policy.retry_codes \
                    and (deadline is None or time.monotonic() < deadline):
                raise ClientError.from_rpc(last_error) from None
            raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        finally:
            for future, attempt in pending.items():  # lost the race, or the caller gave up
                attempt.call.cancel()
                future.cancel()
                if attempt.probe:
                    attempt.replica.probing = False


async def _awaited(call: Awaitable[Any]) -> Any:
    return await call
