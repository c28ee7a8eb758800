"""Offline checks of Kubernetes manifests: ``kubectl kustomize``, Kubernetes' own OpenAPI schemas
(``kubernetes-validate``) and the CRD schemas vendored in deploy/kubernetes/crds/.

No cluster is involved. Custom resources are validated as the API server would with kubectl's
default (server-side field validation ``Strict``): JSON Schema from the CRD's
``openAPIV3Schema``, unknown fields rejected wherever the schema does not preserve them, and
``metadata`` checked as a Kubernetes ObjectMeta. CEL rules and admission webhooks are not.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

from harness import REPO_ROOT
from harness.system_tools import require

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
CRDS = KUBERNETES / "crds"
# The oldest Kubernetes the manifests are written for (grpc probes, PDB
# unhealthyPodEvictionPolicy), and the newest schemas kubernetes-validate ships.
OLDEST_KUBERNETES = "1.31"


@functools.cache
def kustomize(directory: Path) -> tuple[dict[str, Any], ...]:
    """Every object ``kubectl kustomize DIRECTORY`` renders, in order."""
    binary = require("kubectl")
    result = subprocess.run([binary, "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def by_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None
        ) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def env_of(container_spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container_spec.get("env", []) if "value" in e}


# --- Kubernetes' own kinds --------------------------------------------------------------------


def kubernetes_versions() -> list[str]:
    return [OLDEST_KUBERNETES, kubernetes_validate.latest_version()]


def validate_builtin(obj: dict[str, Any]) -> None:
    """Raises ``kubernetes_validate.ValidationError`` (or SchemaNotFoundError for a kind
    Kubernetes does not have) against the strict schemas of every version we target."""
    for version in kubernetes_versions():
        kubernetes_validate.validate(obj, version, strict=True)


def validate_object_meta(metadata: dict[str, Any]) -> None:
    version = kubernetes_validate.latest_version()
    directory = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv_utils.schema_contents(f"{directory}/objectmeta-meta-v1.json", version)
    definitions = kv_utils.schema_contents(f"{directory}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema)
                                                       @ Registry())
    jsonschema.Draft202012Validator(schema, registry=registry).validate(metadata)


# --- custom resources -------------------------------------------------------------------------


@functools.cache
def vendored_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """``(apiVersion, kind)`` → the vendored openAPIV3Schema."""
    schemas = {}
    for path in sorted(CRDS.glob("*.json")):
        schema = json.loads(path.read_text())
        crd = schema["x-seqserve-crd"]
        schemas[(f"{crd['group']}/{crd['version']}", crd["kind"])] = schema
    return schemas


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as structural-schema pruning plus Strict field
    validation do: ``additionalProperties: false`` on every object with ``properties``, unless
    it preserves unknown fields or already says what extra properties may be."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if ("properties" in result and "additionalProperties" not in result
            and not result.get("x-kubernetes-preserve-unknown-fields")):
        result["additionalProperties"] = False
    return result


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    schema = copy.deepcopy(vendored_schemas()[(api_version, kind)])
    for key in ("$comment", "x-seqserve-crd"):
        schema.pop(key, None)
    return jsonschema.Draft202012Validator(strict(schema))


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) in vendored_schemas()


def custom_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of a custom resource, as ``path: message``."""
    validator = _validator(obj["apiVersion"], obj["kind"])
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    messages = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in errors]
    try:
        validate_object_meta(obj["metadata"])
    except jsonschema.ValidationError as error:
        messages.append(f"metadata.{'.'.join(map(str, error.absolute_path))}: {error.message}")
    return messages
