"""The Prometheus configuration, recording and alerting rules in deploy/, checked by promtool.

``promtool test rules`` runs the unit tests in deploy/prometheus/tests/; the tests here also
make sure every recording rule and every alert has such a test, so a new untested rule fails
the suite. The last two tests start a real Prometheus through tests/prometheus_harness.py:
once scraping itself, once scraping the server's own metric families (service/server/metrics.py) fed
with synthetic traffic, where every recording rule and dashboard query must yield data.
Debian's `prometheus` package provides both binaries; `scripts/install-test-deps` installs it.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.prometheus import (
    ALERTING_RULES,
    DEPLOY,
    PROMETHEUS_DIR,
    RECORDING_RULES,
    SCRAPE_METRICS,
    dashboard_expressions,
    exported_metric_names,
    free_port,
    promql_metric_names,
    recording_rule_names,
    run_prometheus,
)
from harness.system_tools import require

CONFIG = PROMETHEUS_DIR / "prometheus.yml"
KUBERNETES_CONFIG = DEPLOY / "kubernetes" / "prometheus.yml"
UNIT_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
SEVERITIES = {"critical", "warning"}
# level:metric:operations, https://prometheus.io/docs/practices/rules/
RULE_NAME = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*:[a-z0-9_]+$")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120,
        check=False)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"


def alerting_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTING_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def unit_test_cases() -> list[dict[str, Any]]:
    return [case for path in UNIT_TESTS for case in yaml.safe_load(path.read_text())["tests"]]


# --- promtool ---------------------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    assert_ok(promtool("check", "config", CONFIG))
    assert_ok(promtool("check", "config", CONFIG.parent / "local.yml"))  # the no-Docker one


def test_rules_are_valid() -> None:
    assert_ok(promtool("check", "rules", RECORDING_RULES, ALERTING_RULES))


def test_rule_unit_tests_pass() -> None:
    assert UNIT_TESTS, "no promtool unit tests in deploy/prometheus/tests/"
    assert_ok(promtool("test", "rules", *UNIT_TESTS))


def test_kubernetes_prometheus_config_is_valid(tmp_path: Path) -> None:
    """The annotation-based scrape job, with its relabelling checked by promtool.

    Debian builds Prometheus without Kubernetes service discovery, so the discovery block is
    swapped for a static target; everything else (relabel regexes included) is checked as is.
    """
    config = yaml.safe_load(KUBERNETES_CONFIG.read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": ["10.0.0.1:9400"]}]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    assert_ok(promtool("check", "config", checked))


# --- every rule tested, named and labelled as agreed ------------------------------------------


def test_every_recording_rule_has_a_unit_test() -> None:
    tested = " ".join(
        check["expr"] for case in unit_test_cases() for check in case.get("promql_expr_test", [])
    )
    untested = [
        name
        for name in recording_rule_names()
        if not re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", tested)
    ]
    assert not untested, f"recording rules without a promtool test: {untested}"


def test_every_alert_is_tested_firing_and_quiet() -> None:
    checks: dict[str, list[bool]] = {}
    for case in unit_test_cases():
        for check in case.get("alert_rule_test", []):
            checks.setdefault(check["alertname"], []).append(bool(check.get("exp_alerts")))
    for rule in alerting_rules():
        seen = checks.get(rule["alert"], [])
        assert True in seen, f"{rule['alert']}: no test shows it firing"
        assert False in seen, f"{rule['alert']}: no test shows it quiet"


def test_recording_rule_names_follow_the_convention() -> None:
    names = recording_rule_names()
    assert len(names) == len(set(names)), "a recording rule is defined twice"
    bad = [name for name in names if not RULE_NAME.match(name)]
    assert not bad, f"not level:metric:operations: {bad}"


def test_every_alert_has_for_severity_and_annotations() -> None:
    for rule in alerting_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Seqserve[A-Z]\w+", name), name
        assert "for" in rule, f"{name}: no `for:`"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name


def test_rules_use_only_metrics_the_server_exports() -> None:
    known = exported_metric_names() | set(recording_rule_names()) | SCRAPE_METRICS
    for path in (RECORDING_RULES, ALERTING_RULES):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                used = promql_metric_names(rule["expr"])
                name = rule.get("record") or rule.get("alert")
                assert used, f"{name}: no metric found in {rule['expr']!r}"
                assert used <= known, f"{name}: unknown metrics {sorted(used - known)}"


# --- the real-Prometheus harness -----------------------------------------------------------


@pytest.mark.timeout(90)
def test_harness_runs_prometheus_scraping_itself(tmp_path: Path) -> None:
    """Prometheus scrapes its own /metrics; the rules load and every dashboard query runs."""
    port = free_port()
    with run_prometheus(f"127.0.0.1:{port}", tmp_path, port=port) as prometheus:
        up = prometheus.wait_for(
            'up{job="seqserve"}', lambda r: bool(r) and r[0]["value"][1] == "1", timeout=30
        )
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"

        # Without a seqserve target the results are empty, but a syntax error, an unknown
        # function or a bad vector match would be an error here.
        for expr in prometheus.dashboard_expressions():
            prometheus.query(expr)

        expected = set(recording_rule_names()) | {rule["alert"] for rule in alerting_rules()}
        loaded = prometheus.rules()
        assert {rule["name"] for rule in loaded} == expected
        broken = [(r["name"], r.get("lastError")) for r in loaded if r["health"] == "err"]
        assert not broken
    assert prometheus.process.poll() is not None, "prometheus still runs after the block"


@contextmanager
def synthetic_server_metrics() -> Iterator[str]:
    """The server's real metric families on a loopback /metrics, fed with steady traffic.

    Uses service/server/metrics.py exactly as the server does, for an LSTM and a Transformer model
    shadowing each other and a pretrained one, without models or gRPC; yields the
    ``host:port`` to scrape.
    """
    # Imported here, so the promtool checks above still run while service/ is mid-change.
    import grpc

    from service.server.call_counters import channelz_server_ids
    from service.server.metrics import ModelLabels, ServingMetrics, ShadowMetrics

    metrics = ServingMetrics()
    lstm = metrics.model(ModelLabels("sentiment-lstm", "1", "lstm", "fp32", "cpu"))
    transformer = metrics.model(
        ModelLabels("sentiment-transformer", "1", "transformer", "fp32", "cpu")
    )
    pretrained = metrics.model(
        ModelLabels("sentiment-pretrained", "1", "pretrained", "fp32", "cpu")
    )
    shadow = ShadowMetrics(metrics, "sentiment-lstm", "sentiment-transformer")
    metrics.model_load_failures.labels("sentiment-lstm").inc()
    for model in (lstm, transformer, pretrained):
        model.loaded(1.5)
        model.set_ready(True)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.wait(0.05):
            for model, seconds in ((lstm, 0.004), (transformer, 0.009), (pretrained, 0.03)):
                model.tokenized(0.0002)
                model.queued(0.001)
                model.queue_depth(3)
                model.batch(texts=4, real_tokens=100, padded_tokens=128, seconds=seconds)
                model.request_done(grpc.StatusCode.OK, seconds + 0.002)
                model.request_done(grpc.StatusCode.UNAVAILABLE, 0.0005)
                model.reject("queue_full")
            shadow.outcome("ok")
            shadow.compared(agree=3, disagree=1, seconds=0.01)

    # gRPC core's counters come from channelz, so a real gRPC server (with no services: every
    # call is UNIMPLEMENTED) receives a call per tick, which the handled counter also counts.
    before = channelz_server_ids()
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=1))
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    metrics.grpc_calls.attach(before)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    nothing = channel.unary_unary("/seqserve.v1.Classifier/Nothing")

    def calls() -> None:
        while not stop.wait(0.05):
            with contextlib.suppress(grpc.RpcError):
                nothing(b"", timeout=1)
            metrics.grpc_calls.handled.count += 1

    port = free_port()
    metrics.start_http("127.0.0.1", port)
    feeders = [threading.Thread(target=traffic, daemon=True),
               threading.Thread(target=calls, daemon=True)]
    for feeder in feeders:
        feeder.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        for feeder in feeders:
            feeder.join(timeout=5)
        channel.close()
        grpc_server.stop(0)
        metrics.stop_http()


@pytest.mark.timeout(120)
def test_rules_and_dashboard_produce_data_from_the_server_metrics(tmp_path: Path) -> None:
    """Every recording rule and dashboard query yields series from the real exposition.

    This catches what promtool tests cannot: a metric or label name that differs from what
    service/server/metrics.py really exports, or an ``le`` bound the rules do not expect.
    """
    with (
        synthetic_server_metrics() as target,
        run_prometheus(target, tmp_path) as prometheus,
    ):
        for name in recording_rule_names():
            prometheus.wait_for(name, bool, timeout=30)
        for expr in dashboard_expressions():
            prometheus.wait_for(expr, bool, timeout=10)
        (ratio,) = prometheus.query("lstm_over_transformer:seqserve_texts:rate5m_ratio")
        assert ratio["metric"] == {"__name__": "lstm_over_transformer:seqserve_texts:rate5m_ratio"}
        (agreement,) = prometheus.query("model_shadow_model:seqserve_shadow_agreement:ratio_rate5m")
        # 3 of 4 texts agree; a scrape between the two counters' increments may skew it a bit.
        assert float(agreement["value"][1]) == pytest.approx(0.75, abs=0.02)
