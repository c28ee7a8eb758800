"""Static checks of deploy/: compose and the Grafana dashboard, and what every deploy file must
agree on (one metrics port).

Nothing here runs Docker or a cluster. The files are parsed, checked against each other (one
metrics port, one drain grace period, one datasource uid) and against the code: every
SEQSERVE_* variable is a real setting, and every dashboard query uses only metrics the server
exports (service/server/metrics.py) or recording rules that exist (deploy/prometheus/rules/).
The images are checked in test_images.py, the Kubernetes and KServe manifests in
test_kubernetes.py, the release pipeline in test_release.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.dockerfiles import parse as parse_dockerfile
from harness.prometheus import (
    DASHBOARD,
    DEPLOY,
    PROMETHEUS_DIR,
    SCRAPE_METRICS,
    dashboard_expressions,
    dashboard_panels,
    exported_metric_names,
    free_port,
    promql_metric_names,
    recording_rule_names,
)

from service.server.settings import ENV_PREFIX, ServeSettings

COMPOSE = DEPLOY / "compose.yaml"
DOCKER = DEPLOY / "docker"
GRAFANA = DEPLOY / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "seqserve.yml"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def seqserve_env(source: dict[str, str]) -> dict[str, str]:
    return {k: str(v) for k, v in source.items() if k.startswith(ENV_PREFIX)}


def duration_s(text: str) -> float:
    """Compose durations as written here: ``30s``, ``1m``, ``1m30s``."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and text, f"unexpected duration {text!r}"
    return int(parts.group(1) or 0) * 60 + int(parts.group(2) or 0)


# --- compose -------------------------------------------------------------------------------


def test_compose_runs_server_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert set(services) == {"seqserve", "prometheus", "grafana"}
    assert services["seqserve"]["build"] == {"context": "..",
                                             "dockerfile": "deploy/docker/cpu.Dockerfile"}
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image"


def test_compose_publishes_ports_on_loopback_only() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is not loopback-only"


def test_compose_mounts_files_that_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                continue  # a named volume
            if source == "../model_repository":
                continue  # written by `seqserve build` before `compose up`
            assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    prometheus_mounts = compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus_mounts
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in prometheus_mounts


def test_compose_gives_the_drain_time_to_finish() -> None:
    server = compose()["services"]["seqserve"]
    drain = float(server["environment"]["SEQSERVE_DRAIN_GRACE_S"])
    assert duration_s(server["stop_grace_period"]) > drain


def test_grafana_allows_anonymous_viewers_only() -> None:
    env = compose()["services"]["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# --- settings and ports agree everywhere -----------------------------------------------------


def test_compose_variables_are_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = seqserve_env(compose()["services"]["seqserve"]["environment"])
    assert env, f"no {ENV_PREFIX}* variables found in compose"
    fields = set(ServeSettings.model_fields)
    unknown = [name for name in env if name[len(ENV_PREFIX) :].lower() not in fields]
    assert not unknown, f"compose: not settings: {unknown}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ServeSettings()  # the values validate too


def test_one_metrics_port_everywhere() -> None:
    compose_port = compose()["services"]["seqserve"]["environment"]["SEQSERVE_METRICS_PORT"]
    scrape = load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]
    target = next(job for job in scrape if job["job_name"] == "seqserve")
    (target_address,) = target["static_configs"][0]["targets"]
    ports = {
        "compose": str(compose_port),
        "prometheus.yml": target_address.rsplit(":", 1)[1],
        "settings default": str(ServeSettings.model_fields["metrics_port"].default),
    }
    for image in ("cpu", "gpu"):
        env = parse_dockerfile(DOCKER / f"{image}.Dockerfile").stages[-1].env()
        ports[f"{image} image"] = env["SEQSERVE_METRICS_PORT"]
    for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml")):
        text = path.read_text()
        for found in re.findall(r'prometheus\.io/port: "(\d+)"', text):
            ports[f"{path.name} annotation"] = found
        for found in re.findall(r'SEQSERVE_METRICS_PORT\s+value: "(\d+)"', text):
            ports[f"{path.name} env"] = found
        for found in re.findall(r"name: metrics\s+containerPort: (\d+)", text):
            ports[f"{path.name} container port"] = found
    assert any("deployment.yaml" in where for where in ports), ports
    assert any("inferenceservice.yaml" in where for where in ports), ports
    assert len(set(ports.values())) == 1, ports


# --- the health check the images run -------------------------------------------------------


def test_docker_healthcheck_follows_the_grpc_health_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    assert spec and spec.loader
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)

    port = free_port()
    monkeypatch.setenv("SEQSERVE_PORT", str(port))
    assert healthcheck.main() == 1, "healthy with no server"
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert healthcheck.main() == 1, "healthy while NOT_SERVING"
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.main() == 0
    finally:
        server.stop(grace=None)


# --- Grafana -------------------------------------------------------------------------------


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    # $__rate_interval is derived from this: it must be the real scrape interval.
    scrape_interval = load_yaml(PROMETHEUS_DIR / "prometheus.yml")["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape_interval
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_dashboard_panels_all_query_the_provisioned_datasource() -> None:
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        for target in targets:
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == datasource["uid"]


def test_dashboard_variables_are_simple_regex_multi_selects() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = dashboard["templating"]["list"]
    assert {v["name"] for v in variables} <= {"model", "architecture"}
    for variable in variables:
        assert variable["multi"] and variable["includeAll"], variable["name"]
        assert variable["allValue"] == ".*", variable["name"]
    raw = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for expr in raw:
        # A multi-select expands to a|b: only a regex matcher can take it.
        for variable in variables:
            for match in re.finditer(rf"(\w+)\s*(=~|!~|=|!=)\s*\"\${variable['name']}\"", expr):
                assert match.group(2) == "=~", f"use =~ for ${variable['name']}: {expr}"


def test_dashboard_uses_only_exported_metrics_and_recording_rules() -> None:
    known = exported_metric_names() | set(recording_rule_names()) | SCRAPE_METRICS
    expressions = dashboard_expressions()
    assert expressions
    for expr in expressions:
        assert "$" not in expr, f"unsubstituted variable or macro: {expr}"
        used = promql_metric_names(expr)
        assert used, f"no metric found in {expr!r}"
        assert used <= known, f"unknown metrics {sorted(used - known)} in {expr!r}"
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        selected = re.fullmatch(r"label_values\((\w+)(?:\{.*\})?,\s*\w+\)", variable["definition"])
        assert selected and selected.group(1) in known, variable["definition"]


def test_dashboard_prefers_recording_rules() -> None:
    """Most panels read precomputed rules; raw histograms only where no rule exists."""
    rules = set(recording_rule_names())
    expressions = dashboard_expressions()
    from_rules = [e for e in expressions if promql_metric_names(e) & rules]
    assert len(from_rules) * 2 > len(expressions)
