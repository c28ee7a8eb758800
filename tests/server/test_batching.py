"""The batching scheduler on its own, with a stand-in model: grouping, budgets, drops, limits."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from harness.held_model import CountingModel, running

from service.server.batching import Batcher, BatchOutcome, Item, select_batch
from service.server.errors import ServingError


def _items(lengths: list[int]) -> list[Item]:
    return [Item(None, i, [1] * n) for i, n in enumerate(lengths)]  # type: ignore[arg-type]


def test_texts_are_grouped_by_length_from_the_oldest() -> None:
    pending = _items([10, 50, 11, 52, 9, 12])
    batch, rest = select_batch(pending, max_texts=8, max_tokens=10_000, cost_tokens=8)
    assert [i.length for i in batch] == [10, 11, 9, 12]
    assert [i.length for i in rest] == [50, 52]  # in arrival order, for the next batch


def test_budgets_bound_texts_and_padded_tokens() -> None:
    batch, rest = select_batch(_items([8] * 10), max_texts=4, max_tokens=10_000, cost_tokens=0)
    assert len(batch) == 4 and len(rest) == 6
    batch, _ = select_batch(_items([8] * 10), max_texts=32, max_tokens=40, cost_tokens=0)
    assert len(batch) == 5  # 5 x 8 = 40 padded tokens
    batch, rest = select_batch(_items([100, 4]), max_texts=32, max_tokens=50, cost_tokens=500)
    assert [i.length for i in batch] == [100]  # the oldest goes even when alone over budget


def test_a_long_text_joins_a_batch_only_when_padding_is_cheap() -> None:
    # Adding a 20-token text to four 10-token texts pads those four by 10 each (40 tokens).
    assert len(select_batch(_items([10] * 4 + [20]), 32, 10_000, cost_tokens=39)[0]) == 4
    assert len(select_batch(_items([10] * 4 + [20]), 32, 10_000, cost_tokens=40)[0]) == 5


def _batcher(model: CountingModel, **overrides) -> Batcher:
    settings = dict(max_texts=8, max_tokens=1000, max_delay_s=0.01, cost_tokens=64,
                    max_queue=64)
    return Batcher("test", model, 2, **(settings | overrides))


def _expected(ids: list[int]) -> np.ndarray:
    total = float(sum(ids)) / 10
    logits = np.array([total, -total])
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def test_requests_share_batches_and_get_their_own_rows() -> None:
    model = CountingModel()

    async def scenario() -> list[BatchOutcome]:
        batcher = _batcher(model)
        batcher.start()
        pending = [batcher.submit([[i + 1] * (i + 1), [20 + i] * 3], None) for i in range(6)]
        outcomes = await asyncio.gather(*pending)
        await batcher.close(1.0)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert max(model.batches) > 1 and sum(model.batches) == 12
    for i, outcome in enumerate(outcomes):
        assert np.allclose(outcome.probabilities[0], _expected([i + 1] * (i + 1)), atol=1e-6)
        assert np.allclose(outcome.probabilities[1], _expected([20 + i] * 3), atol=1e-6)
        # Row sums identify the texts ((i+1)^2 and 3 * (20+i) never collide), so the batches
        # that held this request's texts are known, and its outcome must report exactly them.
        mine = [rows for rows in model.batch_rows if {(i + 1) ** 2, 3 * (20 + i)} & set(rows)]
        assert outcome.batches == len(mine)
        assert outcome.batch_size == max(len(rows) for rows in mine)
        assert outcome.inference_s > 0 and outcome.queue_s >= 0


def test_a_full_queue_refuses_the_whole_request_and_running_texts_do_not_count() -> None:
    model = CountingModel(hold=True)

    async def scenario() -> None:
        batcher = _batcher(model, max_queue=3, max_texts=2)
        batcher.start()
        running_request = batcher.submit([[1], [2]], None)  # runs at once: not queued
        await running(model)
        queued = batcher.submit([[1], [2], [3]], None)  # 3 waiting: the queue is full
        assert batcher.depth == 3
        with pytest.raises(ServingError) as caught:
            batcher.submit([[4]], None)
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.reason == "queue_full" and batcher.depth == 3
        model.release.set()
        await asyncio.gather(running_request, queued)
        assert batcher.depth == 0
        await batcher.close(1.0)

    asyncio.run(scenario())


def test_expired_and_cancelled_work_never_reaches_the_model() -> None:
    model = CountingModel(hold=True)

    async def scenario() -> None:
        batcher = _batcher(model, max_delay_s=0.0)
        batcher.start()
        first = batcher.submit([[1]], None)
        await running(model)  # the first batch occupies the model
        expired = batcher.submit([[7]], deadline=time.monotonic() - 0.001)  # already passed
        cancelled = batcher.submit([[9]], None)
        cancelled.cancel()
        model.release.set()
        await first
        with pytest.raises(ServingError) as caught:
            await expired
        assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        await batcher.close(1.0)
        assert batcher.depth == 0

    asyncio.run(scenario())
    assert model.rows_seen == [1]


def test_a_caller_that_leaves_while_its_batch_waits_is_dropped_by_the_model_thread() -> None:
    """The prepared batch waits while another runs; a caller gone by then is not computed,
    and the others in that batch still get their answers."""
    model = CountingModel(hold=True)

    async def scenario() -> None:
        batcher = _batcher(model, max_delay_s=0.0, cost_tokens=0)
        batcher.start()
        first = batcher.submit([[1]], None)
        await running(model)
        leaving = batcher.submit([[5]], None)  # prepared behind the running batch
        staying = batcher.submit([[6]], None)
        for _ in range(100):  # let the scheduler prepare that batch (white box: it is queued)
            if len(batcher._in_thread) == 2:
                break
            await asyncio.sleep(0)
        assert len(batcher._in_thread) == 2
        leaving.cancel()
        model.release.set()
        await first
        outcome = await staying
        assert np.allclose(outcome.probabilities[0], _expected([6]), atol=1e-6)
        await batcher.close(1.0)

    asyncio.run(scenario())
    assert 5 not in model.rows_seen and 6 in model.rows_seen


def test_close_finishes_queued_work_then_refuses() -> None:
    model = CountingModel(delay=0.05)

    async def scenario() -> None:
        batcher = _batcher(model, max_texts=1)
        batcher.start()
        pending = [batcher.submit([[i + 1]], None) for i in range(3)]
        await batcher.close(5.0)
        assert all(p.done() and p.exception() is None for p in pending)
        with pytest.raises(ServingError) as caught:
            batcher.submit([[1]], None)
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())
    assert sorted(model.rows_seen) == [1, 2, 3]


def test_close_after_its_timeout_fails_what_is_left_instead_of_hanging() -> None:
    model = CountingModel(hold=True)

    async def scenario() -> None:
        batcher = _batcher(model, max_texts=1)
        batcher.start()
        pending = [batcher.submit([[1]], None) for _ in range(3)]
        await running(model)  # held: nothing can finish before close() gives up
        await batcher.close(0.1)
        model.release.set()
        assert all(p.done() for p in pending)
        assert {p.exception().code for p in pending} == {grpc.StatusCode.UNAVAILABLE}

    asyncio.run(scenario())


def test_a_model_output_of_the_wrong_shape_fails_its_requests_with_internal() -> None:
    def three_labels(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return np.zeros((len(input_ids), 3), dtype=np.float32)  # the batcher expects 2

    async def scenario() -> ServingError:
        batcher = Batcher("test", three_labels, 2, max_texts=8, max_tokens=1000,
                          max_delay_s=0.01, cost_tokens=64, max_queue=64)
        batcher.start()
        pending = batcher.submit([[1, 2, 3]], deadline=None)
        with pytest.raises(ServingError) as caught:
            await asyncio.wait_for(pending, 5)  # must not hang
        assert batcher.depth == 0
        after = batcher.submit([[1]], deadline=None)  # and the model keeps serving
        with pytest.raises(ServingError):
            await asyncio.wait_for(after, 5)
        await batcher.close(1.0)
        return caught.value

    error = asyncio.run(scenario())
    assert error.code is grpc.StatusCode.INTERNAL and "shape" in str(error)


def test_work_queued_behind_a_busy_model_starts_when_it_frees_not_after_the_delay() -> None:
    model = CountingModel(hold=True)

    async def scenario() -> float:
        batcher = _batcher(model, max_delay_s=2.0)
        batcher.start()
        first = batcher.submit([[1]], deadline=None)
        await running(model)  # the first batch is running
        started = time.monotonic()
        second = batcher.submit([[2]], deadline=None)
        model.release.set()
        await asyncio.gather(first, second)
        elapsed = time.monotonic() - started
        await batcher.close(1.0)
        return elapsed

    # Without the wake-up the second request would wait out the 2 s delay.
    assert asyncio.run(scenario()) < 1.0
