"""Overload: at 3x the measured capacity, the server keeps serving at its pace, sheds the excess
at once, answers every call long before its deadline, and gives its memory back."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
from harness import loadgen
from harness.metrics import Samples, scrape, total
from harness.processes import serve_process
from harness.reliability import rss_mb, scaled
from harness.server import free_port, wait_until
from harness.tiny_models import LSTM_NAME

DEADLINE_S = 5.0
SHED_CODES = ("RESOURCE_EXHAUSTED", "CANCELLED")


def _offer(target: str, metrics_port: int, pid: int, rate: float, seconds: float,
           generators: int = 3) -> tuple[list[loadgen.Call], float, Samples]:
    """``rate`` calls/s from ``generators`` processes for ``seconds``; every call, the server's
    RSS once it has nothing in flight, and its metrics then."""
    running = [loadgen.start(target, LSTM_NAME, rate / generators, seconds, DEADLINE_S)
               for _ in range(generators)]
    calls = [call for generator in running for call in loadgen.collect(generator, 300)]
    wait_until(lambda: total(scrape(metrics_port), "seqserve_inflight_requests") == 0,
               timeout=30)
    return calls, rss_mb(pid), scrape(metrics_port)


def test_three_times_capacity_is_shed_fast(tiny_repository: Path, figures) -> None:
    metrics_port = free_port()
    process, target = serve_process(tiny_repository, "--metrics-port", str(metrics_port),
                                    log_level="WARNING")
    try:
        # Capacity and the unloaded latency at the concurrency the overload will reach.
        warm = loadgen.collect(loadgen.start(target, LSTM_NAME, -32, 2, DEADLINE_S))
        assert {call.code for call in warm} == {"OK"}
        baseline_rss = rss_mb(process.pid)
        closed = loadgen.collect(loadgen.start(target, LSTM_NAME, -32, scaled(4, 20),
                                               DEADLINE_S))
        capacity = len(closed) / scaled(4, 20)
        unloaded_p99 = float(np.percentile([call.latency for call in closed], 99))

        seconds, offered_rate = scaled(6, 30), 3 * capacity
        calls, after_rss, samples = _offer(target, metrics_port, process.pid, offered_rate,
                                           seconds)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)

    codes = Counter(call.code for call in calls)
    ok = [call.latency for call in calls if call.code == "OK"]
    shed = [call.latency for call in calls if call.code in SHED_CODES]
    # Calls gRPC core received and never handed to seqserve: those it shed, CANCELLED.
    unhandled = (total(samples, "seqserve_grpc_calls_started_total")
                 - total(samples, "seqserve_grpc_calls_handled_total"))
    excess = max(1, len(calls) - int(capacity * seconds))
    shed_fast = sum(latency <= 0.05 for latency in shed)
    figures.update({
        "capacity/s": round(capacity), "offered/s": round(offered_rate),
        "codes": dict(codes), "served/s during overload": round(len(ok) / seconds),
        "excess shed within 50 ms": f"{shed_fast / excess:.2f}",
        "shed p90 ms": round(float(np.percentile(shed, 90)) * 1000, 1) if shed else None,
        "accepted p99 ms": round(float(np.percentile(ok, 99)) * 1000, 1),
        "unloaded p99 ms (32 callers)": round(unloaded_p99 * 1000, 1),
        "RSS MB before/after": f"{baseline_rss:.0f}/{after_rss:.0f}",
        "machine": f"{os.cpu_count()} cores shared with 3 load generators",
        "CANCELLED by gRPC core / counted started-handled": f"{codes.get('CANCELLED', 0)}/"
                                                             f"{unhandled:.0f}",
    })
    # Every call is answered, none waits for its deadline, none ends in an undocumented code.
    assert set(codes) <= {"OK", *SHED_CODES}, codes
    # Every call gRPC core shed is counted: none waits in it now, so the two agree exactly.
    assert unhandled == codes.get("CANCELLED", 0)
    # The server keeps serving while it sheds: at least a third of its capacity (the three
    # load generators offering 3x take much of the 2 shared cores: 40-62 % measured here).
    assert len(ok) / seconds >= capacity / 3
    # The excess is shed at once, not parked: 90 % of it within 50 ms.
    assert shed_fast >= 0.9 * excess * 0.9  # the excess itself is an estimate (+-10 %)
    # And the memory comes back.
    assert after_rss <= 1.1 * baseline_rss


# The model is the bottleneck: each batch takes this long whatever its size (a fake cost, no
# CPU, like a GPU's), so its capacity, full batches back to back, is known: 320 texts/s, well
# inside what the event loop takes. Partial batches would waste it.
MODEL_BOUND_BATCH_S = 0.1
MAX_BATCH_TEXTS = 32  # the default --max-batch-texts


def test_three_times_a_model_bound_capacity_keeps_the_accepted_latency(tiny_repository: Path,
                                                                       figures) -> None:
    metrics_port = free_port()
    process, target = serve_process(tiny_repository, "--metrics-port", str(metrics_port),
                                    inference_delay_s=MODEL_BOUND_BATCH_S, log_level="WARNING")
    try:
        warm = loadgen.collect(loadgen.start(target, LSTM_NAME, -32, 2, DEADLINE_S))
        assert {call.code for call in warm} == {"OK"}
        baseline_rss = rss_mb(process.pid)
        # 32 callers in a closed loop: the unloaded latency at the concurrency of a busy model.
        closed = loadgen.collect(loadgen.start(target, LSTM_NAME, -32, scaled(4, 10),
                                               DEADLINE_S))
        assert {call.code for call in closed} == {"OK"}  # steady concurrency is not overload
        capacity = MAX_BATCH_TEXTS / MODEL_BOUND_BATCH_S
        unloaded_p99 = float(np.percentile([call.latency for call in closed], 99))

        seconds = scaled(10, 30)
        calls, after_rss, samples = _offer(target, metrics_port, process.pid, 3 * capacity,
                                           seconds)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)

    codes = Counter(call.code for call in calls)
    ok = [call.latency for call in calls if call.code == "OK"]
    shed = [call.latency for call in calls if call.code == "RESOURCE_EXHAUSTED"]
    excess = max(1, len(calls) - int(capacity * seconds))
    shed_fast = sum(latency <= 0.05 for latency in shed)
    accepted_p99 = float(np.percentile(ok, 99))
    overloaded = total(samples, "seqserve_rejections_total", model=LSTM_NAME,
                       reason="overloaded")
    figures.update({
        "capacity/s": round(capacity), "offered/s": round(3 * capacity),
        "codes": dict(codes), "served/s during overload": round(len(ok) / seconds),
        "excess refused within 50 ms": f"{shed_fast / excess:.2f}",
        "accepted p99 ms": round(accepted_p99 * 1000, 1),
        "unloaded p99 ms (32 callers)": round(unloaded_p99 * 1000, 1),
        "counted overloaded (model's labels)": round(overloaded),
        "RSS MB before/after": f"{baseline_rss:.0f}/{after_rss:.0f}",
    })
    # The excess is refused by the server itself, counted under the model, never CANCELLED.
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert overloaded == codes["RESOURCE_EXHAUSTED"]
    # The model keeps running full batches: nearly its whole capacity is served.
    assert len(ok) / seconds >= 0.9 * capacity
    # Refused at once: 90 % of the excess within 50 ms (served/s is within 10 % of capacity).
    assert shed_fast >= 0.9 * excess * 0.9
    # The accepted keep their promise: no longer than twice the unloaded p99, and by
    # construction at most the batch running, the next one and their own (+ half a batch for
    # the loop and the load generators on 2 shared cores); the in-flight bound alone lets a
    # queue of 128 calls, 0.4 s, build up.
    assert accepted_p99 <= 2 * unloaded_p99
    assert accepted_p99 <= 3.5 * MODEL_BOUND_BATCH_S
    assert after_rss <= 1.1 * baseline_rss
