"""``service.replica_client.ReplicaClient``'s logic against real servers on loopback: hedging onto
another replica, retrying where nothing ran, ejection and the probe that lets a replica back,
the adaptive hedge delay, round robin without bias; and what gRPC core itself does with the
service config (the measurements the replica-aware mode exists for, kept as tests so that a
grpcio that changes them is noticed).

One server answers at once; the other runs ``SlowInference``, whose delay each test sets
(0 between tests). The network faults themselves are tests/reliability/test_replica_network.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness.metrics import scrape, total
from harness.server import (
    RunningServer,
    SlowInference,
    free_port,
    server_settings,
    wait_until,
)
from harness.tiny_models import LSTM_NAME

from service.client import Client, ClientError, merged_options
from service.replica_client import (
    CLASSIFIER,
    HedgePolicy,
    ReplicaClient,
    channel_options,
    service_config,
)

SLOW_S = 0.3
# Fixed hedge delay (never re-estimated) and a long ejection: each test sees one ejection.
FIXED = HedgePolicy(initial_hedge_s=0.03, min_samples=10**6, eject_s=5.0, max_eject_s=5.0)


@pytest.fixture(scope="module")
def lstm_only(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("replicas") / "repo"
    shutil.copytree(tiny_repository / LSTM_NAME, repository / LSTM_NAME)
    return repository


@pytest.fixture(scope="module")
def servers(lstm_only: Path) -> Iterator[tuple[RunningServer, RunningServer, SlowInference,
                                                int]]:
    """(fast, slow, the slow one's delay, the slow one's metrics port)."""
    slow_inference = SlowInference(0.0)
    metrics_port = free_port()
    fast = RunningServer(server_settings(lstm_only)).start()
    slow = RunningServer(server_settings(lstm_only, metrics_port=metrics_port),
                         loader=slow_inference).start()
    yield fast, slow, slow_inference, metrics_port
    slow.close()
    fast.close()


@pytest.fixture
def delay(servers: tuple[RunningServer, RunningServer, SlowInference, int]
          ) -> Iterator[SlowInference]:
    yield servers[2]
    servers[2].delay = 0.0


def _dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens: connections are refused at once


async def _calls(client: ReplicaClient, count: int, model: str = LSTM_NAME) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        await client.classify(["a fine film"], model=model)
        latencies.append(time.monotonic() - started)
    return latencies


@pytest.mark.timeout(60)
def test_a_slow_replica_is_hedged_around_then_ejected(servers, delay) -> None:
    fast, slow, _, _ = servers
    delay.delay = SLOW_S

    async def scenario() -> tuple[list[float], int, int]:
        async with ReplicaClient([slow.target, fast.target], timeout=5.0, policy=FIXED) as c:
            latencies = await _calls(c, 6)
            attempts_when_out = c.replicas[0].attempts
            latencies += await _calls(c, 10)
            return latencies, attempts_when_out, c.replicas[0].attempts

    latencies, attempts_when_out, attempts_after = asyncio.run(scenario())
    # Every call answered by the fast replica after the hedge delay, none waited for the slow.
    assert max(latencies) < SLOW_S * 0.8, latencies
    # Three overtaken attempts in a row eject it: no call tried it afterwards.
    assert attempts_after == attempts_when_out == FIXED.eject_after


@pytest.mark.timeout(60)
def test_a_refused_attempt_goes_to_another_replica_at_once(servers) -> None:
    fast = servers[0]

    async def scenario() -> tuple[list[float], int, int]:
        async with ReplicaClient([_dead_address(), fast.target], timeout=5.0,
                                 policy=FIXED) as client:
            latencies = await _calls(client, 12)
            dead = client.replicas[0]
            return latencies, dead.failed, dead.ejections

    latencies, failed, ejections = asyncio.run(scenario())
    assert len(latencies) == 12  # none failed
    assert max(latencies) < FIXED.initial_hedge_s * 3  # not waiting for a hedge: at once
    assert failed == FIXED.eject_after and ejections == 1


@pytest.mark.timeout(60)
def test_an_answer_that_is_an_error_is_not_retried(servers) -> None:
    fast, slow = servers[0], servers[1]

    async def scenario() -> tuple[ClientError, int, int]:
        async with ReplicaClient([fast.target, slow.target], timeout=5.0,
                                 policy=FIXED) as client:
            with pytest.raises(ClientError) as raised:
                await client.classify(["text"], model="no-such-model")
            return (raised.value, sum(r.attempts for r in client.replicas),
                    sum(r.strikes for r in client.replicas))

    error, attempts, strikes = asyncio.run(scenario())
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert attempts == 1 and strikes == 0  # the replica answered: it is healthy


@pytest.mark.timeout(60)
def test_the_deadline_holds_when_every_replica_is_slow(servers, delay) -> None:
    slow = servers[1]
    delay.delay = 2 * SLOW_S

    async def scenario() -> tuple[ClientError, float, int]:
        async with ReplicaClient([slow.target], timeout=0.2, policy=FIXED) as client:
            started = time.monotonic()
            with pytest.raises(ClientError) as raised:
                await client.classify(["text"], model=LSTM_NAME)
            return raised.value, time.monotonic() - started, client.replicas[0].failed

    error, elapsed, failed = asyncio.run(scenario())
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.19 <= elapsed < 0.4
    assert failed == 1


@pytest.mark.timeout(60)
def test_an_ejected_replica_gets_one_probe_at_a_time_and_rejoins(servers, delay) -> None:
    fast, slow = servers[0], servers[1]
    policy = HedgePolicy(initial_hedge_s=0.03, min_samples=10**6, eject_s=0.2,
                         max_eject_s=0.4)
    delay.delay = SLOW_S

    async def scenario() -> tuple[int, int, int, int]:
        async with ReplicaClient([slow.target, fast.target], timeout=5.0,
                                 policy=policy) as client:
            stats = client.replicas[0]
            while stats.ejections == 0:
                await _calls(client, 1)
            out_at, watched_until = stats.attempts, time.monotonic() + 1.0
            calls = 0
            while time.monotonic() < watched_until:  # a second of calls while it stays slow
                calls += len(await _calls(client, 1))
            probes = stats.attempts - out_at
            delay.delay = 0.0
            answered = stats.answered
            give_up = time.monotonic() + 5.0
            while stats.answered == answered and time.monotonic() < give_up:
                await _calls(client, 1)  # until a probe finds it fast again
            return calls, probes, stats.answered - answered, stats.strikes

    calls, probes, answered_again, strikes = asyncio.run(scenario())
    # Ejections of 0.2 then 0.4 s: a probe about every 0.4 s, while ~30 calls went elsewhere.
    assert calls >= 10 and 1 <= probes <= 4, (calls, probes)
    assert answered_again >= 1 and strikes == 0


@pytest.mark.timeout(60)
def test_the_hedge_delay_follows_the_replicas_latency(servers) -> None:
    fast = servers[0]
    policy = HedgePolicy(initial_hedge_s=0.2, min_samples=16, min_hedge_s=0.001,
                         max_hedge_s=0.25)

    async def scenario() -> tuple[float, list[float]]:
        async with ReplicaClient([fast.target], timeout=5.0, policy=policy) as client:
            latencies = await _calls(client, 48)
            return client.hedge_delay_s, latencies

    hedge_s, latencies = asyncio.run(scenario())
    assert policy.min_hedge_s <= hedge_s < policy.initial_hedge_s
    assert hedge_s <= max(latencies)  # a quantile of what it measured


@pytest.mark.timeout(60)
def test_round_robin_skips_an_ejected_replica_without_favouring_its_neighbour(servers) -> None:
    fast = servers[0]

    async def scenario() -> list[int]:
        async with ReplicaClient([_dead_address(), fast.target, fast.target], timeout=5.0,
                                 policy=FIXED) as client:
            await _calls(client, 10)  # the dead one ejected
            before = [r.answered for r in client.replicas]
            await _calls(client, 40)
            return [r.answered - b for r, b in zip(client.replicas, before, strict=True)]

    answered = asyncio.run(scenario())
    assert answered[0] == 0 and sum(answered) == 40
    assert abs(answered[1] - answered[2]) <= 2, answered


# --- what gRPC core does with the service config (grpcio 1.85) --------------------------------


def _requests(port: int) -> float:
    return total(scrape(port), "seqserve_requests_total")


def _one_call(target: str, method: dict, port: int, extra: list[tuple[str, int]]
              ) -> tuple[str, float, float]:
    config = service_config(max_attempts=1) | {"methodConfig": [method]}
    with Client("ipv4:" + target, options=channel_options(config) + extra) as client:
        before = _requests(port)
        started = time.monotonic()
        try:
            client.classify(["text"], model=LSTM_NAME, timeout=3.0)
            code = "OK"
        except ClientError as error:
            code = error.code.name
        elapsed = time.monotonic() - started
    # An attempt gRPC core gave up on still runs on the server: count it once it ends.
    wait_until(lambda: total(scrape(port), "seqserve_inflight_requests") == 0, timeout=10)
    return code, elapsed, _requests(port) - before


@pytest.mark.timeout(60)
def test_grpc_core_ignores_a_hedging_policy(servers, delay) -> None:
    slow, port = servers[1], servers[3]
    delay.delay = SLOW_S
    name = service_config()["methodConfig"][0]["name"]
    method = {"name": name, "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.05s",
                                              "nonFatalStatusCodes": ["UNAVAILABLE"]}}
    for extra in ([], [("grpc.experimental.enable_hedging", 1)]):
        code, elapsed, requests = _one_call(slow.target, method, port, extra)
        assert (code, requests) == ("OK", 1), extra  # one attempt, waited for
        assert elapsed >= SLOW_S


@pytest.mark.timeout(60)
def test_grpc_core_honours_per_attempt_timeouts_only_behind_the_hedging_flag(servers,
                                                                             delay) -> None:
    slow, port = servers[1], servers[3]
    delay.delay = SLOW_S
    retry = service_config(max_attempts=3)["methodConfig"][0]
    retry["retryPolicy"]["perAttemptRecvTimeout"] = "0.1s"
    code, elapsed, requests = _one_call(slow.target, retry, port, [])
    assert (code, requests) == ("OK", 1) and elapsed >= SLOW_S  # ignored
    code, elapsed, requests = _one_call(slow.target, retry, port,
                                        [("grpc.experimental.enable_hedging", 1)])
    # Three attempts of 0.1 s on the one replica, and the call ends CANCELLED, not with the
    # deadline: a retry on the same slow replica is all gRPC core can do.
    assert (code, requests) == ("CANCELLED", 3) and elapsed < SLOW_S * 2


# --- the policy's parts ---------------------------------------------------------------------


def test_the_channel_policy_balances_checks_health_and_retries_where_nothing_ran() -> None:
    config = service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": CLASSIFIER}
    assert "healthCheckConfig" not in service_config(health_check=False)
    options = dict(channel_options())
    assert json.loads(options["grpc.service_config"]) == config
    assert options["grpc.enable_retries"] == 1
    assert set(HedgePolicy().retry_codes) == {"UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED"}


def test_options_given_replace_the_clients_defaults() -> None:
    merged = merged_options([("grpc.keepalive_time_ms", 30_000)])
    assert [v for k, v in merged if k == "grpc.keepalive_time_ms"] == [30_000]
    # 10 s: the shortest client ping interval seqserve's default server accepts.
    assert dict(merged_options())["grpc.keepalive_time_ms"] == 10_000
    with pytest.raises(ValueError):
        ReplicaClient([])


def test_the_deploy_readme_shows_the_clients_own_channel_policy() -> None:
    from harness import REPO_ROOT

    readme = (REPO_ROOT / "deploy" / "README.md").read_text()
    section = readme[readme.index("### Client-side load balancing"):]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, object] = {}
    exec(block, scope)  # builds a channel object; connecting waits for a first call
    scope["channel"].close()  # type: ignore[attr-defined]
    assert scope["config"] == service_config()
    assert scope["options"] == merged_options(channel_options())
