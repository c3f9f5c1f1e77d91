"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

pydantic emits JSON Schema (draft 2020-12); Kubernetes wants a *structural* OpenAPI v3 schema.
The conversion:
* `$ref`s are inlined (siblings of a `$ref`, such as a field's description or default, win);
* `title` and `additionalProperties: false` are dropped (unknown fields are pruned by the server);
* `anyOf: [X, {type: null}]` becomes X, optional (not nullable: a null the user writes is pruned,
  so `has()` in CEL rules sees it as absent);
* `anyOf: [{type: integer}, {type: string, ...}]` becomes `x-kubernetes-int-or-string` with the
  string's pattern hoisted (the form controller-gen emits for resource.Quantity);
* draft-2020 numeric `exclusiveMinimum: n` becomes `minimum: n, exclusiveMinimum: true`;
* `default: null` is dropped; model-level `x-kubernetes-validations` stay where they are.

`python -m finetune_operator.api.crd [path]` writes the YAML (`make crds`).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api import types as t

CRD_FILE = f"{t.GROUP}_{t.PLURAL}.yaml"

_DROP = {"title", "additionalProperties", "$defs", "discriminator"}


class SchemaError(ValueError):
    """The models produced something the structural-schema conversion does not handle."""


def _resolve_ref(ref: str, defs: dict[str, Any]) -> dict[str, Any]:
    prefix = "#/$defs/"
    if not ref.startswith(prefix):
        raise SchemaError(f"unsupported $ref {ref}")
    return defs[ref[len(prefix):]]


def _is_null(node: dict[str, Any]) -> bool:
    return node.get("type") == "null"


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if "$ref" in node:
        target = _resolve_ref(node.pop("$ref"), defs)
        node = {**target, **node}
    if "allOf" in node and len(node["allOf"]) == 1:  # older pydantic wraps a described $ref in allOf
        inner = node.pop("allOf")[0]
        node = {**_convert(inner, defs), **node}
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if not _is_null(o)]
        if node.get("default", "x") is None:
            node.pop("default")
        if len(options) == 1:
            node = {**_convert(options[0], defs), **node}
        else:
            node = _int_or_string(node, [_convert(o, defs) for o in options])
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "default" and value is None:
            continue
        if key == "properties":
            out[key] = {name: _convert(prop, defs) for name, prop in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = copy.deepcopy(value)
    if "properties" in out and "type" not in out:
        out["type"] = "object"
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _int_or_string(node: dict[str, Any], options: list[dict[str, Any]]) -> dict[str, Any]:
    types = sorted(o.get("type", "") for o in options)
    if types != ["integer", "string"]:
        raise SchemaError(f"only int-or-string unions are supported, got {types}")
    hoisted: dict[str, Any] = {}
    for option in options:
        for key, value in option.items():
            if key not in ("type",):
                hoisted[key] = value
    return {
        **hoisted,
        **node,
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
    }


def openapi_schema() -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a FineTuneJob."""
    raw = t.FineTuneJob.model_json_schema(mode="validation")
    defs = raw.get("$defs", {})
    body = _convert(raw, defs)
    body.pop("description", None)
    status = _strip_defaults(body["properties"]["status"])  # the operator writes all of status
    status["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    status["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    return {
        "type": "object",
        "description": "FineTuneJob is one declarative, sandboxed, distributed LLM fine-tuning run.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of the object (finetune.dev/v1alpha1)."},
            "kind": {"type": "string", "description": "Kind of the object (FineTuneJob)."},
            "metadata": {"type": "object"},
            "spec": body["properties"]["spec"],
            "status": status,
        },
    }


def _strip_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_strip_defaults(v) for v in node]
    return node


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Summary of the conditions."},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "description": "Fine-tuning method."},
    {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent", "description": "Percent of steps done."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Latest training loss."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1, "description": "Optimizer steps done."},
    {"name": "ETA", "type": "integer", "jsonPath": ".status.progress.etaSeconds", "priority": 1, "description": "Seconds to go."},
    {"name": "Run", "type": "string", "jsonPath": ".spec.runId", "priority": 1, "description": "Run identifier."},
    {"name": "Objective", "type": "string", "jsonPath": ".spec.objective", "priority": 1, "description": "Training objective."},
    {"name": "Workers", "type": "integer", "jsonPath": ".spec.resources.workers", "priority": 1, "description": "Pods."},
    {"name": "GPUs", "type": "integer", "jsonPath": ".spec.resources.gpusPerWorker", "priority": 1, "description": "GPUs per pod."},
    {"name": "Pool", "type": "string", "jsonPath": ".spec.resources.nodePool", "priority": 1, "description": "Node pool."},
    {"name": "Sandbox", "type": "string", "jsonPath": ".status.sandboxNamespace", "priority": 1, "description": "Sandbox namespace."},
]


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{t.PLURAL}.{t.GROUP}",
            "labels": {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/part-of": "finetune-operator"},
        },
        "spec": {
            "group": t.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": t.KIND,
                "listKind": f"{t.KIND}List",
                "plural": t.PLURAL,
                "singular": t.SINGULAR,
                "shortNames": list(t.SHORT_NAMES),
                "categories": list(t.CATEGORIES),
            },
            "versions": [
                {
                    "name": t.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `make crds` from finetune_operator.api.types -- do not edit by hand.\n"


def render_crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path("crds") / CRD_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_crd_yaml())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
