r"""Vendor one CustomResourceDefinition's schema: the openAPIV3Schema of one served version, as
JSON, without the ``description`` texts and the ``status`` subtree (validation of what we write
needs neither), with a ``$comment`` naming where it came from.

It reads a CRD file you fetched from the upstream release; it downloads nothing (CI is
offline). To refresh a schema, fetch the CRD at the new release and run, e.g.:

    python deploy/kubernetes/crds/vendor_schema.py serving.kserve.io_inferenceservices.yaml \
        v1beta1 deploy/kubernetes/crds/inferenceservice.serving.kserve.io.v1beta1.json \
        --source "kserve/kserve v0.20.0 (1fb781055dd1567164358233e1125142ca6ef1fe), \
config/crd/full/serving.kserve.io_inferenceservices.yaml"

and update the table in README.md beside this file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: without_descriptions(value) for key, value in node.items()
                if key != "description"}
    if isinstance(node, list):
        return [without_descriptions(value) for value in node]
    return node


def extract(crd: dict[str, Any], version: str) -> dict[str, Any]:
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    if version not in served:
        raise SystemExit(f"{crd['metadata']['name']}: no served version {version} "
                         f"(served: {sorted(served)})")
    schema = without_descriptions(served[version]["schema"]["openAPIV3Schema"])
    schema.get("properties", {}).pop("status", None)
    return schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("crd", type=Path, help="the upstream CRD YAML file")
    parser.add_argument("version", help="the served version, e.g. v1 or v1beta1")
    parser.add_argument("output", type=Path)
    parser.add_argument("--source", required=True,
                        help="repository, release tag, commit and path of the CRD file")
    args = parser.parse_args()
    raw = args.crd.read_bytes()
    crd = yaml.safe_load(raw)
    schema = extract(crd, args.version)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    document = {
        "$comment": f"{group}/{args.version} {kind}: openAPIV3Schema of {args.source} "
                    f"(sha256 {hashlib.sha256(raw).hexdigest()}), descriptions and status "
                    "removed by deploy/kubernetes/crds/vendor_schema.py",
        "x-seqserve-crd": {"group": group, "version": args.version, "kind": kind},
        **schema,
    }
    args.output.write_text(json.dumps(document, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
