"""The images in deploy/docker/ and the compose files, checked against the code without Docker.

Nothing here builds an image (no engine or registry on these machines; the release pipeline
builds and smoke-tests them). What a renamed flag, port, path, setting or extra would break is
checked statically: the entry point and its subcommand exist, ports and paths agree with the
settings' defaults and with each other, every SEQSERVE_* name is a real setting whose value
validates, every COPY source exists and gets through the build-context filter, the GPU image
installs an extra pyproject.toml really has, and the CPU and GPU images differ only where they
should.
"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import REPO_ROOT
from harness.dockerfiles import Dockerfile, allowed_by, parse
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from service.cli.main import build_parser
from service.server.settings import ENV_PREFIX, ServeSettings

DOCKER = REPO_ROOT / "deploy" / "docker"
SERVER_IMAGES = {"cpu": DOCKER / "cpu.Dockerfile", "gpu": DOCKER / "gpu.Dockerfile"}
MODELS_IMAGE = DOCKER / "models.Dockerfile"
ALL_IMAGES = [*SERVER_IMAGES.values(), MODELS_IMAGE]
COMPOSE = REPO_ROOT / "deploy" / "compose.yaml"
COMPOSE_GPU = REPO_ROOT / "deploy" / "compose.gpu.yaml"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
USER = "10001:10001"


def server(variant: str) -> Dockerfile:
    return parse(SERVER_IMAGES[variant])


def seqserve_env(env: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in env.items() if k.startswith(ENV_PREFIX)}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServeSettings:
    unknown = [n for n in env if n[len(ENV_PREFIX):].lower() not in ServeSettings.model_fields]
    assert not unknown, f"not settings: {unknown}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return ServeSettings()


def parse_seqserve(command: str) -> None:
    """A `seqserve ...` command line, parsed by the real parser (SystemExit on a bad flag)."""
    argv = shlex.split(command)
    assert argv[0] == "seqserve"
    build_parser().parse_args(argv[1:])


# --- every Dockerfile --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_IMAGES, ids=lambda p: p.name)
def test_dockerfile_basics(path: Path) -> None:
    dockerfile = parse(path)
    assert dockerfile.syntax == "docker/dockerfile:1", "BuildKit syntax (heredocs, --mount)"
    for stage in dockerfile.stages:
        base = dockerfile.resolve(stage.base)
        if base == "scratch" or base in {s.name for s in dockerfile.stages}:
            continue
        assert ":" in base and not base.endswith(":latest"), f"{path.name}: pin {base}"
    python = re.fullmatch(r"python:(\d+\.\d+)-slim", dockerfile.global_args["PYTHON_IMAGE"])
    assert python, "a slim Python base"
    assert python.group(1) in SpecifierSet(PYPROJECT["project"]["requires-python"])
    final = dockerfile.stages[-1]
    assert final.last("USER") is not None and final.last("USER").arguments == USER
    # Every `seqserve` command a RUN calls exists with those flags.
    for stage in dockerfile.stages:
        for run in stage.all("RUN"):
            for command in re.findall(r"(?:^|&&\s*)(seqserve [^&|;]+)", run.arguments):
                parse_seqserve(command.strip())


@pytest.mark.parametrize("path", ALL_IMAGES, ids=lambda p: p.name)
def test_the_build_context_holds_what_copy_needs_and_no_models(path: Path) -> None:
    dockerfile = parse(path)
    ignore = dockerfile.ignore_file()
    assert ignore.is_file(), f"no {ignore.name}: the whole tree would be the build context"
    assert ignore.read_text() == (DOCKER / "cpu.Dockerfile.dockerignore").read_text()
    for stage in dockerfile.stages:
        for source in stage.copy_sources():
            assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert allowed_by(ignore, source), f"COPY {source}: filtered out by {ignore.name}"
    for excluded in ("model_repository", "runs", ".git", "tests", "deploy/kubernetes"):
        assert not allowed_by(ignore, excluded), f"{excluded} would be in the build context"


# --- the server images -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_server_image_runs_seqserve_serve_as_configured(
        variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dockerfile = server(variant)
    final = dockerfile.stages[-1]
    assert final.name == "server", "the default target (the last stage) is the server"
    # The entry point is the package's console script, and it resolves.
    assert final.last("ENTRYPOINT").exec_form() == ["seqserve"], "exec form, so SIGTERM drains"
    module, _, function = PYPROJECT["project"]["scripts"]["seqserve"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    command = final.last("CMD").exec_form()
    assert command == ["serve"]
    build_parser().parse_args(command)
    settings = settings_from(seqserve_env(final.env()), monkeypatch)
    assert settings.host == settings.metrics_host == "0.0.0.0"
    exposed = {int(p) for e in final.all("EXPOSE") for p in e.arguments.split()}
    assert exposed == {settings.port, settings.metrics_port}
    assert (settings.port, settings.metrics_port) == (
        ServeSettings.model_fields["port"].default,
        ServeSettings.model_fields["metrics_port"].default), "the image moves no port"
    assert str(settings.repository) == "/models"
    assert settings.device == ("cuda" if variant == "gpu" else "cpu")
    # The health check is the copied grpc.health.v1 probe.
    health = final.last("HEALTHCHECK").exec_form()
    assert health is not None and health[0] == "python"
    copied = {dest: src for c in final.all("COPY") if "from" not in c.flags()
              for *sources, dest in [shlex.split(c.arguments)] for src in sources}
    assert copied[health[1]] == "deploy/healthcheck.py"
    text = SERVER_IMAGES[variant].read_text()
    assert "torch" not in re.sub(r"#.*", "", text) and "[train" not in text


def test_the_gpu_image_installs_the_gpu_extra_and_the_cpu_image_none() -> None:
    extras = PYPROJECT["project"].get("optional-dependencies", {})
    assert "gpu" in extras, "the gpu extra is missing from pyproject.toml"
    assert any(Requirement(r).name == "onnxruntime-gpu" for r in extras["gpu"])
    installs = {variant: " ".join(r.arguments for r in server(variant).stage("server").all("RUN")
                                  if "pip install" in r.arguments)
                for variant in SERVER_IMAGES}
    assert re.search(r"pip install \"\$\(ls /wheels/seqserve-\*\.whl\)\[gpu\]\"", installs["gpu"])
    assert re.search(r"pip install /wheels/\*\.whl$", installs["cpu"]), "CPU: no extra"
    # CUDA's libraries from NVIDIA's wheels are registered with the loader and checked.
    assert "ldconfig" in installs["gpu"] or "ldconfig" in SERVER_IMAGES["gpu"].read_text()
    assert "libonnxruntime_providers_cuda.so" in SERVER_IMAGES["gpu"].read_text()


def test_cpu_and_gpu_images_differ_only_where_they_should() -> None:
    cpu, gpu = server("cpu"), server("gpu")
    assert cpu.global_args == gpu.global_args
    assert cpu.stage("wheel").instructions == gpu.stage("wheel").instructions
    for keyword in ("USER", "WORKDIR", "EXPOSE", "ENTRYPOINT", "CMD"):
        assert cpu.stages[-1].all(keyword) == gpu.stages[-1].all(keyword), keyword
    differing = {k for k in cpu.stages[-1].env().keys() | gpu.stages[-1].env().keys()
                 if cpu.stages[-1].env().get(k) != gpu.stages[-1].env().get(k)}
    assert differing == {"SEQSERVE_DEVICE", "NVIDIA_VISIBLE_DEVICES",
                         "NVIDIA_DRIVER_CAPABILITIES"}


# --- the models image --------------------------------------------------------------------------


def test_the_models_image_bakes_a_repository_from_seqserve_build_or_a_given_one() -> None:
    dockerfile = parse(MODELS_IMAGE)
    names = [s.name for s in dockerfile.stages]
    # The release pipeline hands a gated repository in under this stage's name.
    assert "model_repository" in names and names[-1] == "models"
    workflow = (REPO_ROOT / ".github" / "workflows" / "release.yml").read_text()
    assert "build-contexts: model_repository=" in workflow
    trainer = dockerfile.stage("trainer")
    (build,) = [r for r in trainer.all("RUN") if "seqserve build" in r.arguments]
    assert "--allow-fp16-failure" not in build.arguments, "the gates must hold"
    repository = re.search(r"--repository (\S+)", build.arguments).group(1)
    source = dockerfile.stage("model_repository").last("COPY").arguments.split()
    assert source[0] == "--from=trainer" and source[1].rstrip("/") == repository
    final = dockerfile.stages[-1]
    assert final.last("COPY").arguments.split() == ["--from=model_repository", "/", "/models/"]
    assert final.last("CMD").exec_form() == ["cp", "-R", "/models/.", "/model-repository/"]


# --- compose -----------------------------------------------------------------------------------


def test_compose_builds_the_images_that_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    base = yaml.safe_load(COMPOSE.read_text())["services"]["seqserve"]
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]["seqserve"]
    assert base["build"] == {"context": "..", "dockerfile": "deploy/docker/cpu.Dockerfile"}
    assert gpu["build"] == {"context": "..", "dockerfile": "deploy/docker/gpu.Dockerfile"}
    for service in (base, gpu):
        assert (COMPOSE.parent / service["build"]["context"] / service["build"][
            "dockerfile"]).is_file()
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    merged_env = {**base["environment"], **gpu.get("environment", {})}
    for env in (base["environment"], merged_env):
        settings = settings_from(seqserve_env(env), monkeypatch)
        published = {int(p.rsplit(":", 1)[1]) for p in base["ports"]}
        assert published == {settings.port, settings.metrics_port}
        (models,) = [v for v in base["volumes"] if v.startswith("../model_repository:")]
        assert models == f"../model_repository:{settings.repository}:ro"
    assert settings.device == "cuda"


def test_compose_env_matches_the_image_defaults() -> None:
    """Compose restates the image's defaults on purpose (visible in one file); they must agree."""
    image = seqserve_env(server("cpu").stages[-1].env())
    compose = seqserve_env(yaml.safe_load(COMPOSE.read_text())["services"]["seqserve"][
        "environment"])
    shared = image.keys() & compose.keys()
    assert shared >= {"SEQSERVE_PORT", "SEQSERVE_METRICS_PORT", "SEQSERVE_REPOSITORY"}
    assert {k: image[k] for k in shared} == {k: compose[k] for k in shared}
