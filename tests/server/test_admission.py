"""Admission before work: a request the queue cannot take is refused before it is tokenized;
large requests are tokenized off the event loop, and a hot swap during that is handled."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from harness.server import SlowInference, server_settings, wait_until
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME

from service.client import ClientError
from service.server.core import OFF_LOOP_TOKENIZE_CHARS

LSTM = {"model": LSTM_NAME, "version": "1", "architecture": "lstm", "precision": "fp32",
        "device": "cpu"}


def test_a_request_the_queue_cannot_take_is_not_tokenized(start_server,
                                                          tiny_repository: Path) -> None:
    slow = SlowInference(0.5, models=(LSTM_NAME,))
    running = start_server(server_settings(tiny_repository, max_queue_texts=4,
                                           max_texts_per_request=4), loader=slow)
    registry = running.server.metrics.registry

    def tokenized() -> float:
        return registry.get_sample_value("seqserve_tokenize_duration_seconds_count", LSTM) or 0

    with running.client(timeout=10) as client:
        first = client.classify_async(["a"], model=LSTM_NAME)  # runs: the model is busy
        wait_until(lambda: slow.batches_started.get(LSTM_NAME) == 1)
        queued = client.classify_async(["b", "c", "d"], model=LSTM_NAME)
        wait_until(lambda: running.server.registry.get(LSTM_NAME).batcher.depth == 3)
        before = tokenized()
        with pytest.raises(ClientError) as caught:
            client.classify(["e", "f"], model=LSTM_NAME)
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert tokenized() == before  # refused before the tokenizer ran
        assert first.result(10).results and queued.result(10).results
    assert registry.get_sample_value("seqserve_rejections_total",
                                     {**LSTM, "reason": "queue_full"}) == 1


def test_a_large_request_is_tokenized_off_the_loop_and_answered(start_server,
                                                                tiny_repository: Path) -> None:
    running = start_server(server_settings(tiny_repository))
    core = running.server.core
    long_text = "good film " * (OFF_LOOP_TOKENIZE_CHARS // 10 + 1)
    calls: list[int] = []
    original = core._tokenize_pool.submit

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    core._tokenize_pool.submit = counting  # type: ignore[method-assign]
    with running.client(timeout=10) as client:
        small = client.classify(["good film"], model=LSTM_NAME).results[0]
        assert calls == []  # small requests stay on the loop
        large = client.classify([long_text], model=LSTM_NAME).results[0]
    assert calls == [1]
    assert large.truncated and large.token_count == 32  # tiny-lstm's max_length
    assert small.label in ("negative", "positive")


def test_the_server_wide_bound_on_calls_in_flight_answers_resource_exhausted_at_once(
        start_server, tiny_repository: Path) -> None:
    slow = SlowInference(0.5)
    running = start_server(server_settings(tiny_repository, max_inflight_requests=2,
                                           max_batch_delay_ms=0), loader=slow)
    with running.client(timeout=10) as client:
        # Two calls in flight, on two models: the bound is the server's, not a model's.
        held = [client.classify_async(["a"], model=LSTM_NAME),
                client.classify_async(["b"], model=TRANSFORMER_NAME)]
        wait_until(lambda: running.server.lifecycle.inflight == 2)
        with pytest.raises(ClientError) as caught:
            client.classify(["c"], model=LSTM_NAME)
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 calls in flight (limit 2)" in caught.value.details
        assert slow.batches_started == {LSTM_NAME: 1, TRANSFORMER_NAME: 1}  # no work done
        assert all(pending.result(10).results for pending in held)
        assert client.classify(["d"], model=LSTM_NAME).results  # room again
    # Counted under the model it was for, where per-model dashboards and alerts look.
    assert running.server.metrics.registry.get_sample_value(
        "seqserve_rejections_total", {**LSTM, "reason": "overloaded"}) == 1
