"""Write the openAPIV3Schema of a CustomResourceDefinition as a strict JSON schema.

Usage: python extract_crd_schema.py CRD.yaml OUT.json [--version v1] [--release "argo-rollouts v1.9.1"]

Descriptions are dropped (they are most of the bytes) and every object that declares
`properties` rejects unknown fields, like `kubectl apply --validate=strict` does.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strict_schema(node: Any) -> Any:
    """Copy of an OpenAPI v3 schema without descriptions and with closed objects."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items() if key != "description"}
    declares_fields = "properties" in out and "additionalProperties" not in out
    if declares_fields and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_json_schema(crd: dict[str, Any], version: str, release: str | None = None) -> dict[str, Any]:
    served = {entry["name"]: entry for entry in crd["spec"]["versions"]}
    if version not in served:
        raise SystemExit(f"{crd['metadata']['name']} has no version {version!r}; it has {sorted(served)}")
    schema = strict_schema(served[version]["schema"]["openAPIV3Schema"])
    if release is None:
        # prometheus-operator stamps its version into its CRDs; other projects' CRDs do not say it.
        operator_version = (
            crd["metadata"].get("annotations", {}).get("operator.prometheus.io/version", "unknown")
        )
        release = f"prometheus-operator {operator_version}"
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{crd['spec']['names']['kind']} {crd['spec']['group']}/{version} ({release})",
        **schema,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="CustomResourceDefinition YAML file")
    parser.add_argument("out", type=Path, help="JSON schema file to write")
    parser.add_argument("--version", default="v1", help="served API version to extract (default v1)")
    parser.add_argument(
        "--release",
        help="the project release the CRD comes from, for the title (default: the prometheus-operator version"
        " the CRD is annotated with)",
    )
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    schema = crd_json_schema(crd, args.version, args.release)
    args.out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
