"""The calls gRPC core sheds before Python sees them are counted (channelz), with the handled."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
from harness.metrics import scrape, total
from harness.server import free_port, server_settings, wait_until
from harness.tiny_models import LSTM_NAME

from service.client import ClientError

PENDING_LIMIT = 4
CALLS = 40


def test_calls_shed_by_grpc_core_show_as_started_but_not_handled(
        start_server, tiny_repository: Path) -> None:
    metrics_port = free_port()
    running = start_server(server_settings(tiny_repository, max_pending_rpcs=PENDING_LIMIT,
                                           metrics_port=metrics_port))
    registry = running.server.metrics.registry

    def sample(name: str) -> float:
        value = registry.get_sample_value(name)
        assert value is not None, f"{name} is not exported"
        return value

    with running.client(timeout=30) as client:
        assert client.classify(["a fine film"], model=LSTM_NAME).results
        started_before = sample("seqserve_grpc_calls_started_total")
        handled_before = sample("seqserve_grpc_calls_handled_total")
        assert started_before == handled_before  # nothing shed, nothing waiting

        # The fault: the server's event loop is stalled (until the test releases it), so the
        # calls pile up in gRPC core, which keeps PENDING_LIMIT and sheds the rest.
        release = threading.Event()
        running.loop.call_soon_threadsafe(release.wait, 30)
        pending = [client.classify_async([f"text {i}"], model=LSTM_NAME) for i in range(CALLS)]
        wait_until(lambda: sample("seqserve_grpc_calls_started_total")
                   >= started_before + CALLS, timeout=30)
        release.set()
        codes: dict[str, int] = {}
        for call in pending:
            try:
                call.result(30)
                code = "OK"
            except ClientError as error:
                code = error.code.name
            codes[code] = codes.get(code, 0) + 1

    shed = codes.get("CANCELLED", 0)
    assert shed > 0 and set(codes) <= {"OK", "CANCELLED"}, codes
    assert codes.get("OK", 0) >= PENDING_LIMIT
    # Every call the client saw cancelled is one core received and seqserve never handled,
    # and seqserve's own request metrics never saw it.
    unhandled = (sample("seqserve_grpc_calls_started_total") - started_before) - (
        sample("seqserve_grpc_calls_handled_total") - handled_before)
    assert unhandled == shed
    assert sample("seqserve_grpc_calls_succeeded_total") >= codes.get("OK", 0) + 1
    scraped = scrape(metrics_port)  # and the real /metrics serves them
    assert total(scraped, "seqserve_grpc_calls_started_total") >= started_before + CALLS
    assert total(scraped, "seqserve_requests_total", code="OK") == codes.get("OK", 0) + 1
    assert grpc.StatusCode.CANCELLED.name not in {
        dict(series).get("code") for (name, series), _ in scraped.items()
        if name == "seqserve_requests_total"}
