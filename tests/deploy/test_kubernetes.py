"""deploy/kubernetes/, offline: every overlay renders with ``kubectl kustomize``, every object is
valid against Kubernetes' OpenAPI schemas or its CRD's vendored schema, and the manifests agree
with the code and with each other (ports, probes, settings, drain times, labels, the autoscaler's
metric, the rules Prometheus runs). No cluster: what needs one is named in deploy/README.md.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import kubernetes as k8s
from harness.prometheus import PROMETHEUS_DIR, exported_metric_names, promql_metric_names
from harness.system_tools import require

from service.server.settings import ENV_PREFIX, ServeSettings

KUBERNETES = k8s.KUBERNETES
OVERLAYS = {"cpu": KUBERNETES / "overlays" / "cpu", "gpu": KUBERNETES / "overlays" / "gpu"}
KSERVE = KUBERNETES / "kserve"
SHARED_REPOSITORY = KUBERNETES / "components" / "shared-repository"
ADAPTER = KUBERNETES / "prometheus-adapter"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
# Environment a container may carry that is not a seqserve setting, and who reads it.
FOREIGN_ENV = {"STORAGE_URI": "KServe's storage initializer", "PROTOCOL": "KServe"}


@pytest.fixture(scope="module")
def shared_repository_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway overlay: the CPU overlay with the shared-repository component."""
    root = tmp_path_factory.mktemp("overlay")
    # kustomize refuses absolute paths: climb from the kustomization to / and back down.
    up = Path(*[".."] * len(root.parts[1:]))
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [str(up / OVERLAYS["cpu"].relative_to("/"))],
        "components": [str(up / SHARED_REPOSITORY.relative_to("/"))]}))
    return root


def builds(shared_repository_build: Path) -> dict[str, tuple[dict[str, Any], ...]]:
    return {"cpu": k8s.kustomize(OVERLAYS["cpu"]), "gpu": k8s.kustomize(OVERLAYS["gpu"]),
            "kserve": k8s.kustomize(KSERVE),
            "shared-repository": k8s.kustomize(shared_repository_build)}


def server_pod(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return k8s.one(objects, "Deployment", "seqserve")["spec"]["template"]


# --- every object valid ------------------------------------------------------------------------


def test_every_overlay_renders_only_valid_objects(shared_repository_build: Path) -> None:
    problems = []
    for name, objects in builds(shared_repository_build).items():
        assert objects, f"{name}: nothing rendered"
        for obj in objects:
            where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
            if k8s.is_custom(obj):
                problems += [f"{where}: {error}" for error in k8s.custom_errors(obj)]
                continue
            try:
                k8s.validate_builtin(obj)
            except Exception as error:  # ValidationError, or a kind Kubernetes does not have
                problems.append(f"{where}: {getattr(error, 'message', error)}")
    assert not problems, "\n".join(problems)


def test_the_validators_refuse_what_the_api_server_would() -> None:
    """The checks above can fail: an unknown field and a wrong type in each kind of object."""
    objects = k8s.kustomize(KSERVE)
    service = k8s.one(objects, "InferenceService")
    broken = yaml.safe_load(yaml.safe_dump(service))
    broken["spec"]["predictor"]["containers"][0]["portz"] = []
    broken["spec"]["predictor"]["minReplicas"] = "two"
    errors = k8s.custom_errors(broken)
    assert any("portz" in e for e in errors) and any("minReplicas" in e for e in errors)
    monitor = yaml.safe_load(yaml.safe_dump(k8s.one(objects, "PodMonitor")))
    monitor["spec"]["podMetricsEndpoint"] = monitor["spec"].pop("podMetricsEndpoints")
    assert k8s.custom_errors(monitor)
    deployment = yaml.safe_load(yaml.safe_dump(k8s.one(k8s.kustomize(OVERLAYS["cpu"]),
                                                       "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {}
    with pytest.raises(Exception, match="grcp"):
        k8s.validate_builtin(deployment)


def test_vendored_schemas_say_where_they_come_from() -> None:
    readme = (k8s.CRDS / "README.md").read_text()
    for path in sorted(k8s.CRDS.glob("*.json")):
        assert path.name in readme, f"{path.name}: not in crds/README.md"
        comment = path.read_text()[:600]
        assert re.search(r"v\d+\.\d+\.\d+ \([0-9a-f]{40}\)", comment), path.name
        assert re.search(r"sha256 [0-9a-f]{64}", comment), path.name
    kinds = {kind for _, kind in k8s.vendored_schemas()}
    assert kinds == {"InferenceService", "PodMonitor", "PrometheusRule"}


# --- the server container agrees with the code ------------------------------------------------


@pytest.mark.parametrize("variant", ["cpu", "gpu", "kserve"])
def test_settings_ports_and_probes_agree_with_the_code(
        variant: str, monkeypatch: pytest.MonkeyPatch,
        shared_repository_build: Path) -> None:
    objects = builds(shared_repository_build)[variant]
    if variant == "kserve":
        pod = k8s.one(objects, "InferenceService")["spec"]["predictor"]
        server = k8s.container(pod, "kserve-container")
        grpc_port_name = "h2c"  # KServe's name for a gRPC port
    else:
        pod = server_pod(objects)["spec"]
        server = k8s.container(pod, "seqserve")
        grpc_port_name = "grpc"
    env = k8s.env_of(server)
    unknown = [name for name in env if name not in FOREIGN_ENV and (
        not name.startswith(ENV_PREFIX)
        or name[len(ENV_PREFIX):].lower() not in ServeSettings.model_fields)]
    assert not unknown, f"not settings: {unknown}"
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, value)
    settings = ServeSettings()  # the values validate too
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {grpc_port_name: settings.port, "metrics": settings.metrics_port}
    assert settings.host == settings.metrics_host == "0.0.0.0"
    assert settings.max_connection_age_s > 0, "long-lived clients would never rebalance"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] == {"port": settings.port}, probe
    # Shutdown: preStop, then the drain, then exit, all inside the grace period; liveness never
    # restarts a pod that is only draining.
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + settings.drain_grace_s
    liveness = server["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > settings.drain_grace_s
    assert server["resources"]["requests"]["cpu"] and server["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert settings.device == ("cuda" if variant == "gpu" else "cpu")
    if variant == "kserve":
        # KServe's storage initializer downloads STORAGE_URI into /mnt/models.
        assert str(settings.repository) == "/mnt/models" and env["STORAGE_URI"]
        assert env["PROTOCOL"] == "v2"
    else:
        mount = next(m for m in server["volumeMounts"] if m["name"] == "model-repository")
        assert mount["mountPath"] == str(settings.repository) and mount["readOnly"]


def test_the_gpu_overlay_asks_for_a_gpu_node_and_the_cpu_one_does_not(
        shared_repository_build: Path) -> None:
    gpu = server_pod(k8s.kustomize(OVERLAYS["gpu"]))
    server = k8s.container(gpu["spec"], "seqserve")
    resources = server["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["spec"]["nodeSelector"] and gpu["spec"]["tolerations"]
    assert server["image"].endswith("-gpu")
    cpu = server_pod(k8s.kustomize(OVERLAYS["cpu"]))
    assert "nvidia" not in yaml.safe_dump(cpu)
    assert not k8s.container(cpu["spec"], "seqserve")["image"].endswith("-gpu")


def test_the_init_container_fills_the_volume_the_server_reads() -> None:
    pod = server_pod(k8s.kustomize(OVERLAYS["cpu"]))["spec"]
    (init,) = pod["initContainers"]
    volume = next(v for v in pod["volumes"] if v["name"] == "model-repository")
    assert "emptyDir" in volume
    target = next(m for m in init["volumeMounts"] if m["name"] == "model-repository")
    # cp -R /models/. TARGET/: the models image's repository into the mounted volume.
    assert init["command"][:3] == ["cp", "-R", "/models/."]
    assert init["command"][3].rstrip("/") == target["mountPath"]
    # The models image's own default command is the same copy (for `docker run` users).
    models_dockerfile = (k8s.REPO_ROOT / "deploy" / "docker" / "models.Dockerfile").read_text()
    (cmd,) = re.findall(r"^CMD (\[.*\])$", models_dockerfile, re.MULTILINE)
    assert json.loads(cmd) == init["command"]
    assert init["image"].startswith("seqserve-models:")


def test_services_pdb_and_autoscaler_select_the_server_pods() -> None:
    objects = k8s.kustomize(OVERLAYS["cpu"])
    deployment = k8s.one(objects, "Deployment", "seqserve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    port_names = {p["name"] for p in k8s.container(deployment["spec"]["template"]["spec"],
                                                   "seqserve")["ports"]}
    services = {s["metadata"]["name"]: s for s in k8s.by_kind(objects, "Service")}
    assert services["seqserve-headless"]["spec"]["clusterIP"] == "None"
    assert services["seqserve"]["spec"]["type"] == "ClusterIP"
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["appProtocol"] == "kubernetes.io/h2c"
    pdb = k8s.one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = k8s.one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "seqserve"}
    # The budget always leaves a replica serving.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


# --- monitoring: scrape, rules, autoscaler metric ----------------------------------------------


def test_the_podmonitor_scrapes_both_deployments_as_job_seqserve() -> None:
    monitor_objects = k8s.kustomize(OVERLAYS["cpu"])
    monitor = k8s.one(monitor_objects, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    deployment_pod = server_pod(monitor_objects)
    predictor = k8s.one(k8s.kustomize(KSERVE), "InferenceService")["spec"]["predictor"]
    for labels, pod in ((deployment_pod["metadata"]["labels"], deployment_pod["spec"]),
                        (predictor["labels"], predictor)):
        assert selector.items() <= labels.items()
        # The alerts say up{job="seqserve"}: the job comes from this pod label.
        assert labels[monitor["spec"]["jobLabel"]] == "seqserve"
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert any(p["name"] == endpoint["port"] for c in pod["containers"] for p in c["ports"])
    alerts = (PROMETHEUS_DIR / "rules" / "alerts.yml").read_text()
    assert 'up{job="seqserve"}' in alerts
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["global"]
    assert endpoint["interval"] == scrape["scrape_interval"]
    assert endpoint["path"] == "/metrics"


def _rule_groups_text(path: Path) -> str:
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip() == "groups:")
    return "".join(lines[start:])


def test_the_prometheusrules_carry_exactly_the_tested_rule_files() -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_prometheusrule", KUBERNETES / "generate_prometheusrule.py")
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generated = generator.OUTPUT.read_text()
    assert generated == generator.render(), (
        "monitoring/prometheusrule.yaml is stale: run deploy/kubernetes/generate_prometheusrule.py")
    # Byte for byte: each object's groups text, shifted back, is its rule file's.
    documents = re.split(r"^---\n", generated, flags=re.MULTILINE)[1:]
    assert len(documents) == len(RULE_FILES) >= 2
    for document, path in zip(documents, RULE_FILES, strict=True):
        body = document.split("\nspec:\n", 1)[1]
        unshifted = "".join(line.removeprefix("  ") for line in body.splitlines(keepends=True))
        assert unshifted == _rule_groups_text(path), path.name
    # And what kustomize hands the cluster parses to the same groups.
    rendered = {r["metadata"]["annotations"]["seqserve/rules-source"]: r["spec"]["groups"]
                for r in k8s.by_kind(k8s.kustomize(OVERLAYS["cpu"]), "PrometheusRule")}
    assert rendered == {f"deploy/prometheus/rules/{p.name}": yaml.safe_load(p.read_text())[
        "groups"] for p in RULE_FILES}


def test_the_autoscaler_metric_is_served_by_the_adapter_rule() -> None:
    config = yaml.safe_load((ADAPTER / "config.yaml").read_text())
    values = yaml.safe_load((ADAPTER / "values.yaml").read_text())
    assert values["rules"]["custom"] == config["rules"], "values.yaml and config.yaml differ"
    (rule,) = config["rules"]
    hpa = k8s.one(k8s.kustomize(OVERLAYS["cpu"]), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    series = promql_metric_names(rule["seriesQuery"])
    assert series and series <= exported_metric_names(), series
    assert re.fullmatch(rule["name"]["matches"], next(iter(series)))
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


def test_the_adapter_query_is_valid_promql(tmp_path: Path) -> None:
    (rule,) = yaml.safe_load((ADAPTER / "config.yaml").read_text())["rules"]
    expr = (rule["metricsQuery"].replace("<<.Series>>", "seqserve_queue_depth")
            .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"seqserve-.*"')
            .replace("<<.GroupBy>>", "pod"))
    rules = tmp_path / "adapter.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "pod:seqserve_queue_depth:avg1m", "expr": expr}]}]}))
    result = subprocess.run([require("promtool"), "check", "rules", str(rules)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- hot reload through a shared repository ---------------------------------------------------


def test_the_shared_repository_replaces_the_copy(shared_repository_build: Path) -> None:
    objects = k8s.kustomize(shared_repository_build)
    pod = server_pod(objects)["spec"]
    assert not pod.get("initContainers")
    volume = next(v for v in pod["volumes"] if v["name"] == "model-repository")
    assert volume == {"name": "model-repository", "persistentVolumeClaim": {
        "claimName": "seqserve-model-repository", "readOnly": True}}
    claim = k8s.one(objects, "PersistentVolumeClaim", "seqserve-model-repository")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    cron = k8s.one(objects, "CronJob", "seqserve-publish-models")
    assert cron["spec"]["suspend"] is True


def test_the_publish_script_adds_versions_atomically_and_keeps_existing_ones(
        tmp_path: Path, shared_repository_build: Path) -> None:
    """The CronJob's shell script, run for real on two directories standing for the image's
    /models and the shared volume."""
    cron = k8s.one(k8s.kustomize(shared_repository_build), "CronJob")
    (publisher,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    shell, flags, script = publisher["command"]
    source, volume = tmp_path / "image-models", tmp_path / "volume"
    for version in ("m/1", "m/2", "other/1"):
        (source / version).mkdir(parents=True)
        (source / version / "manifest.json").write_text(version)
    (source / "m" / "not-a-version").mkdir()
    (volume / "m" / "1").mkdir(parents=True)
    (volume / "m" / "1" / "manifest.json").write_text("served, untouched")
    script = script.replace("/model-repository", str(volume)).replace("/models", str(source))
    for _ in range(2):  # idempotent
        result = subprocess.run([shell, flags, script], capture_output=True, text=True,
                                timeout=30, check=False)
        assert result.returncode == 0, result.stderr
    assert (volume / "m" / "1" / "manifest.json").read_text() == "served, untouched"
    assert (volume / "m" / "2" / "manifest.json").read_text() == "m/2"
    assert (volume / "other" / "1" / "manifest.json").read_text() == "other/1"
    assert not (volume / "m" / "not-a-version").exists()
    assert not [p for p in volume.rglob(".tmp-*")], "a staging directory was left behind"
    assert "published m/2" in result.stdout or "kept      m/2" in result.stdout
