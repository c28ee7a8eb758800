"""Admission by queueing delay: the work a model's queue holds, its measured rate, deadlines."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness.held_model import CountingModel, running
from harness.server import server_settings, wait_until
from harness.tiny_models import LSTM_NAME

from service.client import ClientError
from service.server.admission import Demand, QueueAdmission, ServiceRate
from service.server.batching import Batcher
from service.server.errors import ServingError
from service.server.runtime import load_version

ONE_BATCH = QueueAdmission(max_texts=4, max_tokens=100, queue_batches=1,
                           max_queue_delay_s=0.0)
NOW = 100.0


def _measured(tokens_per_second: float) -> ServiceRate:
    rate = ServiceRate()
    rate.observe(int(tokens_per_second), 1.0)
    return rate


def _demand(offered: int, served: int, busy_s: float = 1.0) -> Demand:
    demand = Demand()
    demand.offered(offered, NOW)
    demand.batch_done(served, busy_s, NOW, next_started=busy_s >= 1.0)
    return demand


OVERLOAD = _demand(offered=300, served=100)  # a model busy all along, offered 3x what it serves
STEADY = _demand(offered=100, served=100)  # what a closed loop of callers offers
BURST = _demand(offered=64, served=0, busy_s=0.0)  # 64 calls at once at a resting model


def _refusal(admission: QueueAdmission, texts: int, tokens: int, rate: ServiceRate,
             demand: Demand, deadline_in: float | None = None,
             share: float = 1.0) -> ServingError | None:
    try:
        admission.check("m", texts, tokens, rate, demand, NOW, deadline_in, share)
    except ServingError as error:
        return error
    return None


def test_the_rate_is_unknown_until_measured_then_follows_recent_batches() -> None:
    rate = ServiceRate()
    assert rate.tokens_per_second is None and rate.seconds_for(100) is None
    rate.observe(1000, 1.0)
    assert rate.tokens_per_second == pytest.approx(1000)
    for _ in range(60):  # the model became ten times slower (longer texts, a noisy neighbour)
        rate.observe(100, 1.0)
    assert rate.tokens_per_second == pytest.approx(100, rel=0.05)
    assert rate.seconds_for(50) == pytest.approx(0.5, rel=0.05)


def test_demand_over_capacity_is_a_recent_excess_at_a_busy_model() -> None:
    assert OVERLOAD.exceeds_capacity(NOW)
    assert not STEADY.exceeds_capacity(NOW) and not BURST.exceeds_capacity(NOW)
    # A batch that has run for a while makes the model busy even before it reports.
    hung = Demand()
    hung.offered(50, NOW)
    hung.batch_started(NOW)
    assert hung.utilization(NOW + 0.2) == pytest.approx(0.2)
    assert not hung.exceeds_capacity(NOW + 0.2) and hung.exceeds_capacity(NOW + 0.6)
    # Then the overload ends: as much is offered as served, and the old excess decays away.
    demand = _demand(offered=300, served=100)
    for second in range(1, 6):
        demand.offered(100, NOW + second)
        demand.batch_done(100, 1.0, NOW + second, next_started=True)
    assert not demand.exceeds_capacity(NOW + 5)


def test_while_overloaded_a_full_batch_waiting_refuses_the_next_request() -> None:
    rate = ServiceRate()
    assert _refusal(ONE_BATCH, 0, 0, rate, OVERLOAD) is None  # an idle model takes anything
    assert _refusal(ONE_BATCH, 3, 20, rate, OVERLOAD) is None  # the next batch has room
    by_texts = _refusal(ONE_BATCH, 4, 20, rate, OVERLOAD)
    assert by_texts is not None and by_texts.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert by_texts.reason == "overloaded"
    assert ("model m: overloaded: more is offered than it serves and 4 texts (20 tokens) "
            "already wait") in by_texts.message
    assert "--max-queue-batches" in by_texts.message
    by_tokens = _refusal(ONE_BATCH, 2, 100, _measured(400), OVERLOAD)  # long texts
    assert by_tokens is not None and "~250 ms of work at its measured rate" in by_tokens.message
    # Steady concurrency or a burst is not overload: it queues.
    assert _refusal(ONE_BATCH, 40, 400, rate, STEADY) is None
    assert _refusal(ONE_BATCH, 40, 400, rate, BURST) is None
    # Mirrored traffic may use half the queue.
    assert _refusal(ONE_BATCH, 2, 10, rate, OVERLOAD, share=0.5) is not None
    assert _refusal(ONE_BATCH, 1, 10, rate, OVERLOAD, share=0.5) is None
    unbounded = QueueAdmission(4, 100, queue_batches=0, max_queue_delay_s=0.0)
    assert _refusal(unbounded, 1000, 10_000, rate, OVERLOAD) is None


def test_while_overloaded_a_deadline_nearer_than_the_queued_work_is_refused_at_once() -> None:
    rate = _measured(1000)  # the queue's 60 tokens are 60 ms of work
    assert _refusal(ONE_BATCH, 3, 60, rate, OVERLOAD, deadline_in=0.1) is None
    refused = _refusal(ONE_BATCH, 3, 60, rate, OVERLOAD, deadline_in=0.05)
    assert refused is not None and refused.reason == "overloaded"
    assert "~60 ms of work" in refused.message and "deadline is in 50 ms" in refused.message
    # Not overloaded: the call queues, and expires there if it must (DEADLINE_EXCEEDED).
    assert _refusal(ONE_BATCH, 3, 60, rate, STEADY, deadline_in=0.05) is None
    # Nothing measured yet: no estimate, so no refusal by time.
    assert _refusal(ONE_BATCH, 3, 60, ServiceRate(), OVERLOAD, deadline_in=0.001) is None


def test_a_max_queue_delay_bounds_the_expected_wait_at_any_load() -> None:
    capped = QueueAdmission(4, 100, queue_batches=1, max_queue_delay_s=0.05)
    assert _refusal(capped, 2, 40, _measured(1000), STEADY) is None  # 40 ms
    refused = _refusal(capped, 2, 60, _measured(1000), STEADY)  # 60 ms
    assert refused is not None and "more than the 50 ms --max-queue-delay-ms allows" in \
        refused.message


def test_the_batcher_measures_its_model_and_counts_what_is_offered_and_served() -> None:
    model = CountingModel(hold=True)

    async def scenario() -> None:
        batcher = Batcher("held", model, 2, max_texts=2, max_tokens=1000, max_delay_s=0.0,
                          cost_tokens=64, max_queue=64,
                          admission=QueueAdmission(2, 1000, 1, 0.0))
        batcher.start()
        first = batcher.submit([[1, 2, 3]], None)  # runs at once: not queued
        await running(model)
        waiting = batcher.submit([[1, 2], [3, 4]], None)  # one full batch waits
        burst = batcher.submit([[9]], None)  # a burst at a resting model queues
        # The held batch keeps the model busy: once it has been for half the window, what is
        # offered beyond the next batch is overload.
        await asyncio.to_thread(wait_until, lambda: batcher.demand.exceeds_capacity(
            time.monotonic()), 5)
        with pytest.raises(ServingError) as caught:
            batcher.submit([[5]], None)
        assert caught.value.reason == "overloaded"
        assert "3 texts (5 tokens) already wait" in caught.value.message
        model.release.set()
        await asyncio.gather(first, waiting, burst)
        assert batcher.rate.tokens_per_second is not None  # measured from the two batches
        assert (await batcher.submit([[6]], None)).probabilities.shape == (1, 2)
        await batcher.close(1.0)

    asyncio.run(scenario())


def test_the_server_refuses_by_queued_work_under_the_models_labels(
        start_server, tiny_repository: Path) -> None:
    model = CountingModel(hold=True)

    def held_loader(version: Any, settings: Any, builder: Any) -> Any:
        # The tiny LSTM loaded as usual, its runner replaced by the held stand-in: the test
        # decides when the model finishes, so the queue's content is known when it asks.
        loaded = load_version(version, settings, builder)
        if version.name == LSTM_NAME:
            loaded.session.run = model
        return loaded

    settings = server_settings(tiny_repository, max_batch_texts=2, max_queue_batches=1,
                               max_batch_delay_ms=0, warmup=False)
    started = start_server(settings, loader=held_loader)
    with started.client(timeout=10) as client:
        first = client.classify_async(["a"], model=LSTM_NAME)
        assert model.started.wait(10)
        queued = [client.classify_async([text], model=LSTM_NAME) for text in ("b", "c")]
        served = started.server.registry.get(LSTM_NAME)
        assert served is not None
        wait_until(lambda: served.batcher.depth == 2)
        # The held batch keeps the model busy until what is offered counts as overload.
        wait_until(lambda: served.batcher.demand.exceeds_capacity(time.monotonic()), 5)
        # Answered while the model is still held: refused at once, not parked in the queue.
        with pytest.raises(ClientError) as caught:
            client.classify(["d"], model=LSTM_NAME)
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"model {LSTM_NAME}/1: overloaded: more is offered than it serves and 2 texts" \
            in caught.value.details
        model.release.set()
        assert first.result(10).results and all(call.result(10).results for call in queued)
    labels = {"model": LSTM_NAME, "version": "1", "architecture": "lstm",
              "precision": "fp32", "device": "cpu"}
    assert started.server.metrics.registry.get_sample_value(
        "seqserve_rejections_total", {**labels, "reason": "overloaded"}) == 1
