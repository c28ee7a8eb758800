"""A real Prometheus scraping the real server under real load: every recording rule and every
dashboard expression returns series for all three architectures (LSTM, Transformer trained
from scratch, fine-tuned pretrained encoder)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from harness.prometheus import (
    dashboard_expressions,
    recording_rule_names,
    run_prometheus,
)
from harness.server import RunningServer, free_port, server_settings, wait_until
from harness.tiny_models import (
    LSTM_NAME,
    PRETRAINED_NAME,
    TRANSFORMER_NAME,
    copy_version,
    corpus,
)

from service.client import ClientError

pytestmark = [
    pytest.mark.timeout(240),
]
ARCHITECTURES = {"lstm", "transformer", "pretrained"}
MODELS = {LSTM_NAME, TRANSFORMER_NAME, PRETRAINED_NAME}
LOAD_SECONDS = 6.0
# A bound on the loop; the load normally stops at LOAD_SECONDS, so that Prometheus (scraping
# every second) sees the counters move across several scrapes.
MAX_REQUESTS_PER_CALLER = 20_000


def drive_load(server: RunningServer, stop: threading.Event) -> list[str]:
    """Concurrent callers on every model (so batches form), plus a few bad requests each;
    bounded in count and time. Returns unexpected errors."""
    texts = corpus(50, seed=21)
    errors: list[str] = []

    def caller(model: str, offset: int) -> None:
        with server.client(timeout=10) as client:
            for index in range(MAX_REQUESTS_PER_CALLER):
                if stop.is_set():
                    return
                try:
                    client.classify([texts[(index + offset) % len(texts)]], model=model)
                except ClientError as error:
                    errors.append(str(error))

    callers = [threading.Thread(target=caller, args=(model, offset))
               for model in sorted(MODELS) for offset in range(4)]
    for thread in callers:
        thread.start()
    with server.client(timeout=10) as client:
        for model in MODELS:  # rejections by reason, for every model
            for _ in range(3):
                with pytest.raises(ClientError):
                    client.classify(["fine"], model=model, top_k=99)
    stop.wait(LOAD_SECONDS)
    stop.set()
    for thread in callers:
        thread.join(timeout=30)
    return errors


def covers_all(result: list[dict]) -> bool:
    """Non-empty, and where series carry an architecture or model label, all are there."""
    if not result:
        return False
    architectures = {r["metric"]["architecture"] for r in result if "architecture" in r["metric"]}
    models = {r["metric"]["model"] for r in result if "model" in r["metric"]}
    if architectures and not architectures >= ARCHITECTURES:
        return False
    return not (models and "shadow_model" not in result[0]["metric"] and not models >= MODELS)


def test_rules_and_dashboard_over_a_live_server(three_architectures: Path,
                                                tmp_path: Path) -> None:
    repository_copy = three_architectures
    metrics_port = free_port()
    settings = server_settings(
        repository_copy, metrics_port=metrics_port, intra_op_threads=1,
        shadow=[f"{LSTM_NAME}={TRANSFORMER_NAME}:1.0"])
    server = RunningServer(settings).start()
    try:
        # A version that fails verification feeds the load-failure panel and alert.
        copy_version(repository_copy, TRANSFORMER_NAME, 1, 2, corrupt=True)
        server.loop.call_soon_threadsafe(server.server.registry.request_scan)
        with run_prometheus(f"127.0.0.1:{metrics_port}", tmp_path / "prometheus") as prometheus:
            prometheus.wait_for('up{job="seqserve"} == 1', bool, timeout=30)
            stop = threading.Event()
            assert drive_load(server, stop) == []
            with server.client() as client:
                wait_until(lambda: client.get_model(TRANSFORMER_NAME).failed_versions != {},
                           timeout=30)

            missing = []
            for expr in [*recording_rule_names(), *dashboard_expressions()]:
                # Only the transformer had a version fail to load: one model is right there.
                wanted = bool if "load_failures" in expr else covers_all
                try:
                    prometheus.wait_for(expr, wanted, timeout=30)
                except TimeoutError:
                    missing.append(f"{expr} → {prometheus.query(expr)}")
            assert not missing, "\n".join(missing)

            for ratio_rule in ("lstm_over_transformer:seqserve_texts:rate5m_ratio",
                               "pretrained_over_transformer:seqserve_texts:rate5m_ratio"):
                (ratio,) = prometheus.query(ratio_rule)
                assert float(ratio["value"][1]) > 0
            (agreement,) = prometheus.query(
                "model_shadow_model:seqserve_shadow_agreement:ratio_rate5m")
            assert 0.0 <= float(agreement["value"][1]) <= 1.0
    finally:
        server.close()
