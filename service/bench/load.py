"""Load generation: closed loop (N callers) and open loop (Poisson arrivals), and cell statistics.

Closed loop answers "how fast can N callers go"; it hides queueing, because a slow answer
delays the caller's next request. Open loop answers "what does a caller see at R requests/s":
arrivals are scheduled in advance and each latency is measured from the *intended* send time,
so a generator that falls behind (or a server that stalls) shows up as latency instead of as
silently missing requests (coordinated omission, as in wrk2 and HdrHistogram).

The generators only call ``send(index)``; they know nothing of gRPC, so they are tested with
fake calls. Every loop is bounded by a request count and a duration.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.client import ClassifyResult, ClientError

Send = Callable[[int], Awaitable[ClassifyResult]]
OnDone = Callable[[], None]


@dataclass(frozen=True)
class CellPlan:
    model: str
    length: int  # tokens per text asked for
    texts_per_request: int
    concurrency: int | None  # closed loop
    rate: float | None  # open loop, requests per second
    requests: int  # measured requests at most
    duration_s: float  # measured phase at most (plus in-flight requests' completion)
    warmup: int  # requests sent first and not measured

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"


@dataclass
class Outcome:
    """One measured request."""

    latency_s: float
    result: ClassifyResult | None = None
    error: str | None = None  # gRPC status code name
    send_lag_s: float = 0.0  # open loop: how late the generator sent it


@dataclass
class LoadRun:
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = 0.0  # perf_counter: first (intended) send
    finished: float = 0.0  # perf_counter: last completion

    @property
    def wall_s(self) -> float:
        return max(self.finished - self.started, 1e-9)


async def _timed(send: Send, index: int, since: float, lag: float = 0.0) -> Outcome:
    try:
        result = await send(index)
    except ClientError as error:
        return Outcome(time.perf_counter() - since, error=error.code.name, send_lag_s=lag)
    return Outcome(time.perf_counter() - since, result=result, send_lag_s=lag)


async def closed_loop(send: Send, *, concurrency: int, requests: int, duration_s: float,
                      on_done: OnDone | None = None) -> LoadRun:
    """``concurrency`` callers, each sending its next request when the last one returns."""
    run = LoadRun(started=time.perf_counter())
    stop_at = run.started + duration_s
    issued = 0

    async def caller() -> None:
        nonlocal issued
        # Both bounds are checked before each send; `issued` is shared, and asyncio runs one
        # caller at a time between awaits, so no lock is needed.
        while issued < requests and time.perf_counter() < stop_at:
            index = issued
            issued += 1
            run.outcomes.append(await _timed(send, index, time.perf_counter()))
            if on_done is not None:
                on_done()

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    run.finished = time.perf_counter()
    return run


async def open_loop(send: Send, *, rate: float, requests: int, duration_s: float,
                    seed: int = 0, on_done: OnDone | None = None) -> LoadRun:
    """Poisson arrivals at ``rate``/s; latency counts from each request's intended send time."""
    rng = random.Random(seed)
    run = LoadRun(started=time.perf_counter())
    tasks: list[asyncio.Task[Outcome]] = []
    intended = run.started

    async def one(index: int, at: float) -> Outcome:
        outcome = await _timed(send, index, at, lag=time.perf_counter() - at)
        if on_done is not None:
            on_done()
        return outcome

    for index in range(requests):
        if index:
            intended += rng.expovariate(rate)
        if intended - run.started > duration_s:
            break
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, intended)))
    # Each call carries a deadline, so this wait is bounded too.
    run.outcomes = list(await asyncio.gather(*tasks))
    run.finished = time.perf_counter()
    return run


def percentiles_ms(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {key: None for key in ("p50", "p95", "p99", "mean", "min", "max")}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(ms.mean()),
            "min": float(ms.min()), "max": float(ms.max())}


def summarize(plan: CellPlan, run: LoadRun, *, server_cpu_s: float | None,
              client_cpu_s: float) -> dict[str, Any]:
    """One cell's figures, as stored in bench.json (times in ms, rates per second)."""
    ok = [o for o in run.outcomes if o.result is not None]
    errors: dict[str, int] = {}
    for outcome in run.outcomes:
        if outcome.error is not None:
            errors[outcome.error] = errors.get(outcome.error, 0) + 1
    texts = sum(len(o.result.results) for o in ok if o.result is not None)
    results = [o.result for o in ok if o.result is not None]
    token_counts = [r.token_count for result in results for r in result.results]
    truncated = [r.truncated for result in results if result.timing is not None
                 for r in result.results]
    # Server-side timings and token counts exist only where the protocol reports them.
    timings = [result.timing for result in results if result.timing is not None]
    token_counts = [count for count in token_counts if count > 0]
    sizes = [timing.batch_size for timing in timings if timing.batch_size > 0]

    def median_ms(values_us: list[int]) -> float | None:
        return float(np.median(values_us)) / 1000.0 if values_us else None

    server = {
        "queue_ms_p50": median_ms([t.queue_us for t in timings]),
        "tokenize_ms_p50": median_ms([t.tokenize_us for t in timings]),
        "inference_ms_p50": median_ms([t.inference_us for t in timings]),
        "total_ms_p50": median_ms([t.total_us for t in timings]),
        # The batch a request's texts rode in, averaged over requests...
        "batch_size_mean": float(np.mean(sizes)) if sizes else None,
        # ...and over executed batches: a batch of b texts is reported by b one-text requests,
        # so n / sum(1/b) counts each batch once (exact for one text per request).
        "batch_size_per_batch": (len(sizes) / float(np.sum(1.0 / np.asarray(sizes)))
                                 if sizes else None),
    }
    lags = [o.send_lag_s for o in run.outcomes]
    return {
        "model": plan.model,
        "mode": plan.mode,
        "concurrency": plan.concurrency,
        "rate": plan.rate,
        "length": plan.length,
        "texts_per_request": plan.texts_per_request,
        "planned_requests": plan.requests,
        "warmup_requests": plan.warmup,
        "requests": len(run.outcomes),
        "ok": len(ok),
        "errors": errors,
        "duration_s": run.wall_s,
        "latency_ms": percentiles_ms([o.latency_s for o in ok]),
        "requests_per_s": len(ok) / run.wall_s,
        "texts_per_s": texts / run.wall_s,
        "texts": texts,
        "tokens_mean": float(np.mean(token_counts)) if token_counts else None,
        "truncated_fraction": float(np.mean(truncated)) if truncated else None,
        "server": server,
        "server_cpu_s": server_cpu_s,
        "client_cpu_s": client_cpu_s,
        "texts_per_server_cpu_s": (texts / server_cpu_s if server_cpu_s else None),
        "send_lag_ms_p99": (float(np.percentile(lags, 99)) * 1000.0
                            if plan.mode == "open" and lags else None),
    }
