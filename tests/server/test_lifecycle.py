"""Loading, draining, SIGTERM, hot reload, corrupt versions, deadlines, cancellation, overload."""

from __future__ import annotations

import re
import shutil
import signal
import threading
from pathlib import Path

import grpc
import pytest
from harness.metrics import scrape, total
from harness.processes import serve_process
from harness.server import SlowInference, free_port, server_settings, wait_until
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME, copy_version

from service.client import Client, ClientError


def test_health_goes_loading_serving_draining(start_server, tiny_repository: Path) -> None:
    release = threading.Event()
    slow = SlowInference(0.5, models=(LSTM_NAME,))

    def gated_loader(model, settings, builder):
        release.wait(10)
        return slow(model, settings, builder)

    running = start_server(server_settings(tiny_repository), wait=False, loader=gated_loader)
    with running.client(timeout=10) as client:
        assert client.health() == "NOT_SERVING"
        with pytest.raises(ClientError) as caught:
            client.classify(["good"], model=LSTM_NAME)
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE
        assert "loading" in caught.value.details

        release.set()
        running.wait_started()
        assert client.health() == "SERVING"
        assert client.health("seqserve.v1.Classifier") == "SERVING"

        in_flight = client.classify_async(["good film"], model=LSTM_NAME)
        wait_until(lambda: running.server.lifecycle.inflight == 1)
        stopping = running.stop_async(grace=10)
        wait_until(lambda: client.health() == "NOT_SERVING")
        assert client.health("inference.GRPCInferenceService") == "NOT_SERVING"
        with pytest.raises(ClientError) as caught:
            client.classify(["good"], model=LSTM_NAME)
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in caught.value.details
        assert in_flight.result(10).results[0].label  # the call in flight still finished
    stopping.result(10)


def test_sighup_rescans_and_sigterm_drains_calls_in_flight(repository_copy: Path) -> None:
    # No polling: only SIGHUP can bring version 2 in. Slow inference (0.2 s a batch) keeps
    # calls in flight when SIGTERM arrives; the metrics say when all 16 have arrived.
    metrics_port = free_port()
    process, target = serve_process(repository_copy, "--metrics-port", str(metrics_port),
                                    "--drain-grace-s", "10", inference_delay_s=0.2)
    try:
        with Client(target, timeout=20) as client:
            copy_version(repository_copy, LSTM_NAME, 1, 2)
            process.send_signal(signal.SIGHUP)
            wait_until(lambda: client.get_model(LSTM_NAME).version == 2)
            pending = [client.classify_async([f"good movie {i}"], model=LSTM_NAME)
                       for i in range(16)]
            wait_until(lambda: total(scrape(metrics_port), "seqserve_inflight_requests") == 16)
            process.send_signal(signal.SIGTERM)
            answers = [p.result(20) for p in pending]
        assert all(a.results[0].label in ("negative", "positive") for a in answers)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    log = process.stderr.read()
    assert "SIGHUP received" in log and "serving tiny-lstm/2" in log
    assert "SIGTERM received: draining" in log and "(clean)" in log
    assert re.search(r"draining: 1[0-6] call\(s\) in flight", log), log
    assert "unloaded tiny-lstm/1" in log


def test_hot_reload_under_load_fails_no_call(start_server, repository_copy: Path) -> None:
    running = start_server(server_settings(repository_copy, poll_interval_s=0.1))
    stop = threading.Event()
    failures: list[str] = []
    versions_seen: list[int] = []

    def caller() -> None:
        with running.client(timeout=10) as client:
            for _ in range(2000):  # bounded: the test stops it far earlier
                if stop.is_set():
                    return
                try:
                    versions_seen.append(client.classify(["good plot"], model=LSTM_NAME).version)
                except ClientError as error:
                    failures.append(str(error))

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(versions_seen) > 20)
        copy_version(repository_copy, LSTM_NAME, 1, 2)
        wait_until(lambda: versions_seen[-1:] == [2] and versions_seen.count(2) > 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert failures == []
    assert versions_seen[0] == 1 and versions_seen[-1] == 2
    with running.client() as client:
        described = client.get_model(LSTM_NAME)
    assert described.version == 2 and described.available_versions == [1, 2]
    # The old version's series are gone once it has drained.
    exposition = running.server.metrics.registry
    wait_until(lambda: exposition.get_sample_value(
        "seqserve_model_ready", _labels(LSTM_NAME, "1")) is None)
    assert exposition.get_sample_value("seqserve_model_ready", _labels(LSTM_NAME, "2")) == 1


def _labels(model: str, version: str) -> dict[str, str]:
    return {"model": model, "version": version, "architecture": "lstm", "precision": "fp32",
            "device": "cpu"}


def test_corrupt_version_is_refused_while_the_old_one_serves(start_server,
                                                             repository_copy: Path) -> None:
    running = start_server(server_settings(repository_copy, poll_interval_s=0.05))
    copy_version(repository_copy, TRANSFORMER_NAME, 1, 2, corrupt=True)
    failures = running.server.metrics.registry

    def scans() -> float:
        return failures.get_sample_value("seqserve_repository_scans_total")

    wait_until(lambda: failures.get_sample_value(
        "seqserve_model_load_failures_total", {"model": TRANSFORMER_NAME}) == 1)
    refused_at = scans()
    wait_until(lambda: scans() >= refused_at + 3)  # polls since: the version is not retried
    assert failures.get_sample_value(
        "seqserve_model_load_failures_total", {"model": TRANSFORMER_NAME}) == 1
    with running.client() as client:
        answer = client.classify(["good"], model=TRANSFORMER_NAME)
        described = client.get_model(TRANSFORMER_NAME)
    assert answer.version == 1
    assert described.version == 1 and described.available_versions == [1, 2]
    assert "sha256" in described.failed_versions[2]
    # Repaired in place: polls still skip it, a forced scan (what SIGHUP does) retries it.
    shutil.copyfile(repository_copy / TRANSFORMER_NAME / "1" / "model.fp32.onnx",
                    repository_copy / TRANSFORMER_NAME / "2" / "model.fp32.onnx")
    repaired_at = scans()
    wait_until(lambda: scans() >= repaired_at + 3)
    assert running.server.registry.get(TRANSFORMER_NAME).version == 1
    running.loop.call_soon_threadsafe(
        lambda: running.server.registry.request_scan(retry_failed=True))
    wait_until(lambda: running.server.registry.get(TRANSFORMER_NAME).version == 2)
    with running.client() as client:
        assert client.get_model(TRANSFORMER_NAME).failed_versions == {}


def test_expired_and_cancelled_requests_are_dropped_before_compute(
        start_server, tiny_repository: Path) -> None:
    slow = SlowInference(0.4, models=(LSTM_NAME,))
    running = start_server(server_settings(tiny_repository, max_batch_delay_ms=0),
                           loader=slow)
    with running.client(timeout=10) as client:
        blocker = client.classify_async(["good"], model=LSTM_NAME)  # occupies the executor
        wait_until(lambda: slow.batches_started.get(LSTM_NAME) == 1)
        late = client.classify_async(["bad", "dull"], model=LSTM_NAME, timeout=0.15)
        cancelled = client.classify_async(["fine", "fun", "sad"], model=LSTM_NAME)
        # Both are queued on the server (2 + 3 texts) before the client cancels one.
        wait_until(lambda: running.server.registry.get(LSTM_NAME).batcher.depth == 5)
        cancelled.cancel()
        with pytest.raises(ClientError) as caught:
            late.result(5)
        assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert blocker.result(5).results
        after = client.classify(["good"], model=LSTM_NAME)  # the queue is healthy again
    assert after.results
    assert slow.texts_computed[LSTM_NAME] == 2  # the blocker and the last call, nothing else
    metrics = running.server.metrics.registry
    assert metrics.get_sample_value("seqserve_rejections_total", {
        **_labels(LSTM_NAME, "1"), "reason": "deadline_exceeded"}) == 1
    wait_until(lambda: metrics.get_sample_value("seqserve_rejections_total", {
        **_labels(LSTM_NAME, "1"), "reason": "cancelled"}) == 1)


def test_full_queue_answers_resource_exhausted(start_server, tiny_repository: Path) -> None:
    slow = SlowInference(0.3, models=(LSTM_NAME,))
    running = start_server(server_settings(tiny_repository, max_queue_texts=4,
                                           max_texts_per_request=4), loader=slow)
    with running.client(timeout=10) as client:
        first = client.classify_async(["a", "b", "c"], model=LSTM_NAME)
        wait_until(lambda: slow.batches_started.get(LSTM_NAME) == 1)
        queued = client.classify_async(["d", "e", "f"], model=LSTM_NAME)  # waits its turn
        wait_until(lambda: running.server.registry.get(LSTM_NAME).batcher.depth == 3)
        with pytest.raises(ClientError) as caught:
            client.classify(["g", "h"], model=LSTM_NAME)
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in caught.value.details
        assert first.result(5).results and queued.result(5).results


def test_start_up_falls_back_to_the_newest_version_that_loads(repository_copy: Path,
                                                              start_server) -> None:
    copy_version(repository_copy, LSTM_NAME, 1, 2, corrupt=True)
    lenient = start_server(server_settings(repository_copy, strict_startup=False))
    with lenient.client() as client:
        model = client.get_model(LSTM_NAME)
        assert model.version == 1 and 2 in model.failed_versions
        assert "sha256" in model.failed_versions[2]
        assert client.classify(["fine"], model=LSTM_NAME).version == 1

    strict = start_server(server_settings(repository_copy), wait=False)
    with pytest.raises(Exception, match="refused"):
        strict.wait_started()
