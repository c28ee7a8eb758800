"""Faults while serving: broken versions published under load, the repository disappearing, an
inference error, and masses of cancelled and expired calls."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import loadgen
from harness.metrics import scrape, total
from harness.processes import serve_process
from harness.reliability import rss_mb, scaled
from harness.server import free_port, server_settings, wait_until
from harness.tiny_models import LSTM_NAME, copy_version

from service.client import Client, ClientError
from service.repo.layout import MANIFEST_FILE


def publish_truncated(repository: Path, name: str, source: int, target: int) -> None:
    """Publish ``source`` again as ``target`` with its fp32 ONNX cut in half and the manifest's
    sha256 and size rewritten to match: it passes the integrity check and fails to load."""
    staging = repository / name / f".tmp-truncated-{target}"
    shutil.copytree(repository / name / str(source), staging)
    artifact = staging / "model.fp32.onnx"
    payload = artifact.read_bytes()[: artifact.stat().st_size // 2]
    artifact.write_bytes(payload)
    manifest = json.loads((staging / MANIFEST_FILE).read_text())
    manifest["version"] = target
    for entry in manifest["artifacts"]:
        if entry["file"] == artifact.name:
            entry["sha256"], entry["bytes"] = hashlib.sha256(payload).hexdigest(), len(payload)
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    staging.rename(repository / name / str(target))


def test_broken_versions_published_under_load_are_refused_while_the_old_serves(
        start_server, repository_copy: Path, figures) -> None:
    running = start_server(server_settings(repository_copy, poll_interval_s=0.05))
    metrics = running.server.metrics.registry
    generator = loadgen.start(running.target, LSTM_NAME, -8, scaled(6, 30), 10)
    copy_version(repository_copy, LSTM_NAME, 1, 2, corrupt=True)  # sha256 mismatch
    wait_until(lambda: metrics.get_sample_value("seqserve_model_load_failures_total",
                                                {"model": LSTM_NAME}) == 1, timeout=20)
    publish_truncated(repository_copy, LSTM_NAME, 1, 3)  # loads no further than ORT's parser
    wait_until(lambda: metrics.get_sample_value("seqserve_model_load_failures_total",
                                                {"model": LSTM_NAME}) == 2, timeout=20)
    calls = loadgen.collect(generator)
    with running.client() as client:
        described = client.get_model(LSTM_NAME)
    figures.update({"calls while broken versions arrived": len(calls),
                    "failed": sum(call.code != "OK" for call in calls)})
    assert calls and {call.code for call in calls} == {"OK"}
    assert described.version == 1 and described.available_versions == [1, 2, 3]
    assert "sha256" in described.failed_versions[2]
    assert described.failed_versions[3] and "sha256" not in described.failed_versions[3]


def test_the_repository_vanishing_leaves_the_loaded_models_serving(
        start_server, repository_copy: Path, tmp_path: Path, caplog) -> None:
    running = start_server(server_settings(repository_copy, poll_interval_s=0.05))
    metrics = running.server.metrics.registry

    def scans_after(count: float) -> bool:
        return metrics.get_sample_value("seqserve_repository_scans_total") >= count

    aside = tmp_path / "unmounted"
    with caplog.at_level(logging.INFO, logger="service.server.registry"):
        repository_copy.rename(aside)
        gone_at = metrics.get_sample_value("seqserve_repository_scans_total")
        wait_until(lambda: scans_after(gone_at + 5))
        with running.client(timeout=10) as client:
            assert client.classify(["a warm film"], model=LSTM_NAME).version == 1
            assert client.health() == "SERVING"
            aside.rename(repository_copy)
            copy_version(repository_copy, LSTM_NAME, 1, 2)
            wait_until(lambda: client.get_model(LSTM_NAME).version == 2)
            assert client.classify(["a warm film"], model=LSTM_NAME).version == 2
    messages = [record.getMessage() for record in caplog.records]
    assert sum("is gone" in message for message in messages) == 1  # said once, not per poll
    assert sum("is back" in message for message in messages) == 1


class FailingBatch:
    """A loader whose model runs its first batch slowly (so the next calls queue up behind it
    as one batch) and fails its second."""

    def __init__(self) -> None:
        self.batches = 0
        self._lock = threading.Lock()

    def __call__(self, model: Any, settings: Any, builder: Any) -> Any:
        from service.server.runtime import load_version

        loaded = load_version(model, settings, builder)
        run = loaded.session.run

        def faulty_run(input_ids: Any, attention_mask: Any) -> Any:
            with self._lock:
                self.batches += 1
                batch = self.batches
            if batch == 1:
                threading.Event().wait(0.3)  # a slow batch, not synchronisation
            if batch == 2:
                raise RuntimeError("device lost")  # what a failing execution provider raises
            return run(input_ids, attention_mask)

        if model.name == LSTM_NAME:
            loaded.session.run = faulty_run
        return loaded


def test_an_inference_error_fails_only_its_own_batch(start_server, tiny_repository: Path) -> None:
    faulty = FailingBatch()
    # A batch waits up to 100 ms for company, so the two doomed calls share one.
    running = start_server(server_settings(tiny_repository, max_batch_delay_ms=100),
                           loader=faulty)
    with running.client(timeout=10) as client:
        first = client.classify_async(["good"], model=LSTM_NAME)
        wait_until(lambda: faulty.batches == 1)
        doomed = [client.classify_async([text], model=LSTM_NAME) for text in ("dull", "flat")]
        wait_until(lambda: running.server.registry.get(LSTM_NAME).batcher.depth == 2)
        assert first.result(10).results[0].label  # the batch before is unharmed
        for pending in doomed:
            with pytest.raises(ClientError) as caught:
                pending.result(10)
            assert caught.value.code is grpc.StatusCode.INTERNAL
            assert "inference failed: device lost" in caught.value.details
        after = client.classify(["a fine film"], model=LSTM_NAME)  # and the one after
    assert after.results[0].label and faulty.batches == 3
    rejected = running.server.metrics.registry.get_sample_value(
        "seqserve_rejections_total", {"model": LSTM_NAME, "version": "1",
                                      "architecture": "lstm", "precision": "fp32",
                                      "device": "cpu", "reason": "internal"})
    assert rejected == 2


def test_masses_of_cancelled_and_expired_calls_leave_nothing_behind(tiny_repository: Path,
                                                                     figures) -> None:
    metrics_port = free_port()
    # 20 ms a batch, so calls are queued and computing when they expire or are cancelled. The
    # burst of 400 can outrun the event loop; gRPC core would shed the overflow beyond the
    # pending-call limit as CANCELLED (another guarantee, tested in test_overload), so the
    # limit is raised here to keep this test about expiry and cancellation alone.
    process, target = serve_process(tiny_repository, "--metrics-port", str(metrics_port),
                                    "--max-pending-rpcs", "100000",
                                    inference_delay_s=0.02, log_level="WARNING")
    rounds, seconds = int(scaled(3, 10)), 2
    rss: list[float] = []
    codes: dict[str, int] = {}
    try:
        with Client(target, timeout=10) as client:
            for _ in range(rounds):
                expiring = loadgen.start(target, LSTM_NAME, 800, seconds, 0.01)
                pending = [client.classify_async([f"text {i}"], model=LSTM_NAME)
                           for i in range(400)]
                for call in pending:
                    call.cancel()
                for call in loadgen.collect(expiring):
                    codes[call.code] = codes.get(call.code, 0) + 1
                wait_until(lambda: total(scrape(metrics_port), "seqserve_inflight_requests") == 0
                           and total(scrape(metrics_port), "seqserve_queue_depth") == 0,
                           timeout=30)
                rss.append(rss_mb(process.pid))
            assert client.classify(["a fine film"], model=LSTM_NAME).results[0].label
        samples = scrape(metrics_port)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    cancelled = total(samples, "seqserve_rejections_total", reason="cancelled")
    expired = total(samples, "seqserve_rejections_total", reason="deadline_exceeded")
    figures.update({"rounds": rounds, "client codes": codes,
                    "server counted cancelled/deadline_exceeded/overloaded":
                        f"{cancelled:.0f}/{expired:.0f}/"
                        f"{total(samples, 'seqserve_rejections_total', reason='overloaded'):.0f}",
                    "RSS MB per round": "/".join(f"{value:.0f}" for value in rss)})
    assert codes.get("DEADLINE_EXCEEDED", 0) > 0 and cancelled > 0
    # Calls no 20 ms batch can serve within 10 ms, offered faster than any are served: the
    # server is overloaded and refuses some at once (RESOURCE_EXHAUSTED, counted) instead of
    # letting them expire in its queue.
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, codes
    # Every one counted (the server also counts some of the test's own 400 cancelled calls,
    # refused before their cancellation arrived).
    overloaded = total(samples, "seqserve_rejections_total", reason="overloaded")
    assert overloaded >= codes.get("RESOURCE_EXHAUSTED", 0)
    # No growth beyond the allocator's own saw-tooth: over 30 such rounds the RSS rose from 116
    # to 119-128 MB and stayed there, trimmed back every few rounds. A leak of ~3 KB a call
    # (~2,000 calls a round) would exceed 10 % within 3 rounds; the long mode's 10 catch less.
    assert rss[-1] <= 1.10 * rss[0]
