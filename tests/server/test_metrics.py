"""The /metrics endpoint scraped for real, and shadow comparison."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness.metrics import scrape, value
from harness.server import SlowInference, free_port, server_settings, wait_until
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME, corpus

from service.client import ClientError

LSTM = {"model": LSTM_NAME, "version": "1", "architecture": "lstm", "precision": "fp32",
        "device": "cpu"}


def test_counters_and_histograms_move(start_server, tiny_repository: Path) -> None:
    port = free_port()
    running = start_server(server_settings(tiny_repository, metrics_port=port))
    before = scrape(port)
    assert value(before, "seqserve_model_info", **LSTM) == 1
    assert value(before, "seqserve_model_ready", **LSTM) == 1
    assert value(before, "seqserve_model_load_duration_seconds", **LSTM) > 0
    texts = corpus(12, seed=5)
    with running.client(timeout=10) as client:
        pending = [client.classify_async(texts[i:i + 3], model=LSTM_NAME) for i in range(0, 12, 3)]
        answers = [p.result(10) for p in pending]
        with pytest.raises(ClientError):
            client.classify(["ok", " "], model=LSTM_NAME)
        with pytest.raises(ClientError):
            client.classify(["ok"], model="no-such-model")
    after = scrape(port)
    assert value(after, "seqserve_requests_total", **LSTM, code="OK") == 4
    assert value(after, "seqserve_requests_total", **LSTM, code="INVALID_ARGUMENT") == 1
    assert value(after, "seqserve_rejections_total", **LSTM, reason="invalid_argument") == 1
    unresolved = dict.fromkeys(LSTM, "")
    assert value(after, "seqserve_requests_total", **unresolved, code="NOT_FOUND") == 1
    assert value(after, "seqserve_rejections_total", **unresolved, reason="not_found") == 1
    assert value(after, "seqserve_texts_total", **LSTM) == 12
    tokens = sum(r.token_count for a in answers for r in a.results)
    assert value(after, "seqserve_tokens_total", **LSTM) == tokens
    assert value(after, "seqserve_request_duration_seconds_count", **LSTM) == 5
    assert value(after, "seqserve_queue_duration_seconds_count", **LSTM) == 4
    assert value(after, "seqserve_tokenize_duration_seconds_count", **LSTM) == 4
    batches = value(after, "seqserve_batch_size_count", **LSTM)
    assert 1 <= batches <= 4
    assert value(after, "seqserve_batch_size_sum", **LSTM) == 12
    assert value(after, "seqserve_inference_duration_seconds_count", **LSTM) == batches
    assert value(after, "seqserve_batch_padded_tokens_sum", **LSTM) >= tokens
    assert value(after, "seqserve_batch_padding_ratio_count", **LSTM) == batches
    assert value(after, "seqserve_batch_size_bucket", **LSTM, le="+Inf") == batches
    assert value(after, "seqserve_queue_depth", **LSTM) == 0
    assert value(after, "seqserve_inflight_requests", **LSTM) == 0


def test_metrics_port_zero_disables_the_endpoint(start_server, tiny_repository: Path) -> None:
    running = start_server(server_settings(tiny_repository, metrics_port=0))
    assert running.server.metrics._http is None


def test_shadow_agreement_is_recorded_and_primary_unaffected(start_server,
                                                             tiny_repository: Path) -> None:
    rule = f"{LSTM_NAME}={TRANSFORMER_NAME}:0.5"
    running = start_server(server_settings(tiny_repository, shadow=[rule]))
    texts = corpus(20, seed=9)
    with running.client(timeout=10) as client:
        answers = [client.classify(texts[i:i + 2], model=LSTM_NAME) for i in range(0, 20, 2)]
    assert all(a.model == LSTM_NAME for a in answers)
    registry = running.server.metrics.registry
    pair = {"model": LSTM_NAME, "shadow_model": TRANSFORMER_NAME}
    # 10 primary requests at a fraction of 0.5: exactly 5 mirrored.
    wait_until(lambda: registry.get_sample_value(
        "seqserve_shadow_requests_total", {**pair, "outcome": "ok"}) == 5)
    agree = registry.get_sample_value("seqserve_shadow_agreement_total", {**pair, "agree": "true"})
    disagree = registry.get_sample_value("seqserve_shadow_agreement_total",
                                         {**pair, "agree": "false"})
    assert agree + disagree == 10
    assert registry.get_sample_value("seqserve_shadow_duration_seconds_count", pair) == 5
    assert registry.get_sample_value("seqserve_shadow_requests_total",
                                     {**pair, "outcome": "dropped"}) == 0


def test_slow_shadow_is_dropped_and_never_delays_the_primary(start_server,
                                                             tiny_repository: Path) -> None:
    slow = SlowInference(1.0, models=(TRANSFORMER_NAME,))
    running = start_server(server_settings(
        tiny_repository, shadow=[f"{LSTM_NAME}={TRANSFORMER_NAME}:1"], shadow_max_pending=1),
        loader=slow)
    latencies = []
    with running.client(timeout=10) as client:
        for _ in range(5):
            started = time.perf_counter()
            assert client.classify(["good film"], model=LSTM_NAME).model == LSTM_NAME
            latencies.append(time.perf_counter() - started)
    # What the caller sees, not the server's own timing (taken before the shadow is offered):
    # every call returned long before the shadow's 1 s batch could have finished.
    assert max(latencies) < 0.5
    pair = {"model": LSTM_NAME, "shadow_model": TRANSFORMER_NAME}
    registry = running.server.metrics.registry
    assert registry.get_sample_value("seqserve_shadow_requests_total",
                                     {**pair, "outcome": "dropped"}) == 4
    wait_until(lambda: registry.get_sample_value(
        "seqserve_shadow_requests_total", {**pair, "outcome": "ok"}) == 1)
