"""Scale-out on one machine: N ``seqserve serve`` replicas of one model repository, balanced by
gRPC's own client-side ``round_robin``, checked under steady load.

This is what a headless Service, a rolling model update and a rolling restart do in Kubernetes,
on loopback, with real processes (``ChildServer``) and a real gRPC channel:

1. **throughput**: the same closed-loop load against one replica, then against all of them.
2. **reload**: a new model version is published once (atomically, as the exporter does) while
   the load runs; every replica must pick it up through its repository poll, with 0 failed calls.
3. **failover**: one replica is drained (SIGTERM) and another killed (SIGKILL) while the load
   runs; the channel's retry policy (UNAVAILABLE only: ``Classify`` is idempotent) must keep
   ≥ 99.9 % of calls succeeding, and a call may fail only if it was in flight at the kill.

The replicas serve a temporary copy of the newest version of one model, so the user's
repository is never changed. Every loop is bounded in calls and in time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.bench.child_server import ChildServer
from service.bench.errors import BenchError
from service.bench.load_steady import Call, SteadyLoad
from service.bench.texts import SYNTHETIC, load_pool
from service.client import AsyncClient, ClientError
from service.replica_client import channel_options, round_robin_target, service_config
from service.repo.layout import latest_version, model_names, next_version_number
from service.repo.manifest import MANIFEST_FILE, Manifest

MIN_SUCCESS_RATE = 0.999
# Calls answered through the balancer after each event before a phase ends: enough that every
# surviving replica has carried traffic, few enough to keep the run short.
SETTLE_CALLS = 200
# Throughput measurements of 1 and of all replicas, alternated.
THROUGHPUT_ROUNDS = 2
# Calls in the failover phase at least: with fewer, one failed call alone would be > 0.1 %.
FAILOVER_MIN_CALLS = 2000
CALL_TIMEOUT_S = 10.0


def stage_repository(source: Path, model: str, into: Path) -> int:
    """Copy the newest complete version of ``model`` into a fresh repository; its number."""
    newest = latest_version(source, model)
    if newest is None:
        raise BenchError(f"{source}: no complete version of {model}", "data")
    shutil.copytree(newest.directory, into / model / str(newest.version))
    return newest.version


def publish_copy(repository: Path, model: str, source_version: int) -> int:
    """Publish ``source_version`` again as the next version, atomically like the exporter: built
    in a hidden directory beside the target, then renamed, so no poll sees half a version."""
    target = next_version_number(repository, model)
    staging = repository / model / f".tmp-replicas-{target}"
    shutil.copytree(repository / model / str(source_version), staging)
    manifest_path = staging / MANIFEST_FILE
    manifest = Manifest.load(manifest_path)
    manifest.model_copy(update={"version": target}).write(manifest_path)
    staging.rename(repository / model / str(target))
    return target


@dataclass(frozen=True)
class ReplicaConfig:
    repository: Path
    model: str | None = None  # default: the first model of the repository
    replicas: int = 3
    callers: int = 16
    throughput_requests: int = 2000
    phase_timeout_s: float = 60.0
    poll_interval_s: float = 0.2
    drain_grace_s: float = 5.0
    # One ORT thread per replica: N replicas on a few cores would otherwise fight over them.
    serve_args: tuple[str, ...] = ("--intra-op-threads", "1")
    startup_timeout_s: float = 180.0
    log_level: str = "WARNING"
    max_attempts: int = 5  # per call, first try included; 1: no retries (to see what they save)


def start_replicas(config: ReplicaConfig, repository: Path) -> list[ChildServer]:
    """Start every replica at once (their start-ups overlap); all or none."""
    serve_args = ["--poll-interval-s", f"{config.poll_interval_s:g}",
                  "--drain-grace-s", f"{config.drain_grace_s:g}", *config.serve_args]
    servers = [ChildServer(repository, serve_args, log_level=config.log_level,
                           startup_timeout_s=config.startup_timeout_s)
               for _ in range(config.replicas)]
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        started = [pool.submit(server.start) for server in servers]
        errors = [future.exception() for future in started]
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        for server in servers:
            server.stop()
        raise failed
    return servers


def summarize(calls: list[Call], texts_per_call: int = 1) -> dict[str, Any]:
    ok = [c for c in calls if c.ok]
    wall = (max(c.ended for c in calls) - min(c.started for c in calls)) if calls else 0.0
    return {"calls": len(calls), "failed": len(calls) - len(ok),
            "success_rate": len(ok) / len(calls) if calls else 0.0,
            "texts_per_s": len(ok) * texts_per_call / wall if wall > 0 else 0.0,
            "wall_s": round(wall, 3)}


class Phases:
    """The three phases against started replicas, in one event loop."""

    def __init__(self, config: ReplicaConfig, servers: list[ChildServer], repository: Path,
                 model: str, version: int, texts: list[str],
                 progress: Callable[[str], None]) -> None:
        self.config, self.servers, self.repository = config, servers, repository
        self.model, self.version, self.texts, self.progress = model, version, texts, progress
        self.options = channel_options(service_config(max_attempts=config.max_attempts))

    def client(self, addresses: Sequence[str]) -> AsyncClient:
        return AsyncClient(round_robin_target(addresses), timeout=CALL_TIMEOUT_S,
                           options=self.options)

    def load(self, client: AsyncClient, max_calls: int) -> SteadyLoad:
        return SteadyLoad(client, self.model, self.texts, callers=self.config.callers,
                          max_calls=max_calls, max_seconds=self.config.phase_timeout_s)

    async def throughput(self, addresses: Sequence[str]) -> dict[str, Any]:
        async with self.client(addresses) as client:
            # Connect every subchannel and warm every replica before measuring.
            for _ in range(2 * len(addresses)):
                await client.classify(self.texts[:1], model=self.model)
            cpu_before = [s.cpu_seconds() or 0.0 for s in self.servers]
            client_before = time.process_time()
            calls = await self.load(client, self.config.throughput_requests).run()
            client_cpu = time.process_time() - client_before
            servers_cpu = sum((s.cpu_seconds() or 0.0) - b
                              for s, b in zip(self.servers, cpu_before, strict=True))
        figures = summarize(calls)
        wall = figures["wall_s"] or 1e-9
        # CPU-seconds per second of the replicas and of this load generator: when their sum
        # nears the core count, the machine, not seqserve, is the limit.
        figures.update(replicas=len(addresses), servers_cores_busy=round(servers_cpu / wall, 2),
                       client_cores_busy=round(client_cpu / wall, 2))
        return figures

    async def served_versions(self) -> list[int]:
        """The version of the model each replica serves, asked directly (not balanced)."""
        versions = []
        for server in self.servers:
            async with AsyncClient(server.address, timeout=CALL_TIMEOUT_S) as client:
                models = {m.name: m for m in await client.list_models()}
                versions.append(models[self.model].version)
        return versions

    async def reload(self) -> dict[str, Any]:
        addresses = [s.address for s in self.servers]
        async with self.client(addresses) as client:
            async with self.load(client, max_calls=1_000_000).running() as load:
                await load.wait_for(lambda: load.succeeded >= SETTLE_CALLS)
                new_version = await asyncio.to_thread(
                    publish_copy, self.repository, self.model, self.version)
                published = time.monotonic()
                self.progress(f"published {self.model} version {new_version}")
                deadline = published + self.config.phase_timeout_s
                while (versions := await self.served_versions()) != [new_version] * len(addresses):
                    if time.monotonic() > deadline:
                        raise BenchError(f"replicas still serve versions {versions} "
                                         f"{self.config.phase_timeout_s:g}s after publishing "
                                         f"{new_version}", "server")
                    await asyncio.sleep(self.config.poll_interval_s / 2)  # poll a condition
                switched_s = time.monotonic() - published
                answered_new = load.answered_by(new_version)
                await load.wait_for(
                    lambda: load.answered_by(new_version) >= answered_new + SETTLE_CALLS)
            calls = load.calls
        figures = summarize(calls)
        by_version: dict[str, int] = {}
        for call in calls:
            if call.ok:
                by_version[str(call.version)] = by_version.get(str(call.version), 0) + 1
        figures.update(from_version=self.version, to_version=new_version,
                       replicas_serving_new=versions.count(new_version),
                       seconds_until_all_switched=round(switched_s, 3),
                       calls_by_version=by_version)
        return figures

    async def failover(self) -> dict[str, Any]:
        drained, killed = self.servers[0], self.servers[1]
        async with self.client([s.address for s in self.servers]) as client:
            async with self.load(client, max_calls=1_000_000).running() as load:
                await load.wait_for(lambda: load.succeeded >= SETTLE_CALLS)
                os.kill(drained.pid, signal.SIGTERM)
                os.kill(killed.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                in_flight_at_kill = load.in_flight
                self.progress(f"SIGTERM to {drained.address}, SIGKILL to {killed.address}")
                try:
                    drained_code = await asyncio.to_thread(
                        drained.wait, self.config.drain_grace_s + 30.0)
                except subprocess.TimeoutExpired:
                    raise BenchError(f"{drained.address} did not exit after SIGTERM",
                                     "server") from None
                after = load.succeeded
                await load.wait_for(lambda: load.succeeded >= after + SETTLE_CALLS
                                    and len(load.calls) >= FAILOVER_MIN_CALLS)
            calls = load.calls
        killed_code = killed.stop()
        failed = [c for c in calls if not c.ok]
        # A call may fail only if the kill cut it: it started before and ended after.
        outside = [c for c in failed if not c.started <= killed_at <= c.ended]
        figures = summarize(calls)
        figures.update(
            in_flight_at_kill=in_flight_at_kill,
            failed_codes=sorted({c.code for c in failed}),
            failed_not_in_flight_at_kill=len(outside),
            drained_exit_code=drained_code, killed_exit_code=killed_code)
        return figures


async def _run_phases(phases: Phases) -> dict[str, Any]:
    addresses = [s.address for s in phases.servers]
    # Alternated and repeated, the better of each kept: on a machine shared with other work, a
    # single pair of runs measures the neighbours as much as the replicas.
    runs: dict[int, list[dict[str, Any]]] = {1: [], len(addresses): []}
    for _ in range(THROUGHPUT_ROUNDS):
        for count in runs:
            phases.progress(f"throughput: {count} replica(s), {phases.config.callers} callers")
            runs[count].append(await phases.throughput(addresses[:count]))
    one, all_replicas = (max(rows, key=lambda row: row["texts_per_s"])
                         for rows in runs.values())
    for best, rows in ((one, runs[1]), (all_replicas, runs[len(addresses)])):
        best["texts_per_s_runs"] = [round(row["texts_per_s"], 1) for row in rows]
    phases.progress("reload: publishing a new version under load")
    reload = await phases.reload()
    phases.progress("failover: drain one replica, kill another, under load")
    failover = await phases.failover()
    return {"throughput": {"one": one, "all": all_replicas,
                           "ratio": round(all_replicas["texts_per_s"]
                                          / max(one["texts_per_s"], 1e-9), 3)},
            "reload": reload, "failover": failover}


def checks(report: dict[str, Any]) -> dict[str, bool]:
    """The claims the run must support; the command fails unless all hold."""
    reload, failover = report["reload"], report["failover"]
    return {
        "reload: every replica serves the new version": (
            reload["replicas_serving_new"] == report["replicas"]),
        "reload: 0 failed calls": reload["failed"] == 0,
        f"failover: success rate >= {MIN_SUCCESS_RATE:.1%}": (
            failover["success_rate"] >= MIN_SUCCESS_RATE),
        "failover: failures only among calls in flight at the kill": (
            failover["failed_not_in_flight_at_kill"] == 0),
        "failover: the drained replica exited cleanly": failover["drained_exit_code"] == 0,
    }


def run_replicas(config: ReplicaConfig,
                 progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Runs the three phases; the report holds the figures and ``checks`` (all must be True)."""
    if config.replicas < 3:
        raise BenchError("--replicas: at least 3 (one drained, one killed, one left)", "usage")
    names = model_names(config.repository)
    model = config.model or (names[0] if names else None)
    if model is None or model not in names:
        raise BenchError(f"{config.repository}: no model {config.model or ''}".strip(), "data")
    texts, _ = load_pool(SYNTHETIC, progress)
    with tempfile.TemporaryDirectory(prefix="seqserve-replicas-") as scratch:
        repository = Path(scratch) / "repository"
        version = stage_repository(config.repository, model, repository)
        progress(f"starting {config.replicas} replicas of {model} v{version}")
        servers = start_replicas(config, repository)
        try:
            phases = Phases(config, servers, repository, model, version, texts, progress)
            try:
                figures = asyncio.run(_run_phases(phases))
            except ClientError as error:
                raise BenchError(f"a replica failed: {error}", "server") from None
            except TimeoutError as error:
                raise BenchError(f"a phase did not complete: {error}", "server") from None
        finally:
            for server in servers:
                server.stop()
    report = {"model": model, "replicas": config.replicas, "callers": config.callers,
              "max_attempts": config.max_attempts, "cpu_count": os.cpu_count(), **figures}
    report["checks"] = checks(report)
    report["ok"] = all(report["checks"].values())
    return report
