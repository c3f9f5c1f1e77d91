"""Generate the CustomResourceDefinitions (FineTuneJob, TenantPolicy) from the pydantic models.

pydantic emits JSON Schema (draft 2020-12); Kubernetes wants a *structural* OpenAPI v3 schema.
The conversion:
* `$ref`s are inlined (siblings of a `$ref`, such as a field's description or default, win);
* `title` and `additionalProperties: false` are dropped (unknown fields are pruned by the server); a
  map's `additionalProperties: {schema}` stays;
* `anyOf: [X, {type: null}]` becomes X, optional (not nullable: a null the user writes is pruned,
  so `has()` in CEL rules sees it as absent);
* `anyOf: [{type: integer}, {type: string, ...}]` becomes `x-kubernetes-int-or-string` with the
  string's pattern hoisted (the form controller-gen emits for resource.Quantity);
* draft-2020 numeric `exclusiveMinimum: n` becomes `minimum: n, exclusiveMinimum: true`;
* `default: null` is dropped; model-level `x-kubernetes-validations` stay where they are.

`python -m finetune_operator.api.crd [folder]` writes one YAML file per kind (`make crds`).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

from pydantic import BaseModel

from finetune_operator.api import tenant
from finetune_operator.api import types as t

CRD_FILE = f"{t.GROUP}_{t.PLURAL}.yaml"
TENANT_POLICY_CRD_FILE = f"{t.GROUP}_{tenant.PLURAL}.yaml"

_DROP = {"title", "$defs", "discriminator"}


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
        if key in _DROP or (key == "additionalProperties" and not isinstance(value, dict)):
            continue
        if key == "default" and value is None:
            continue
        if key == "properties":
            out[key] = {name: _convert(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties"):
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


def openapi_schema(model: type[BaseModel] = t.FineTuneJob, kind: str = t.KIND,
                   description: str = "FineTuneJob is one declarative, sandboxed, distributed LLM fine-tuning run.",
                   ) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a kind (its model has `spec` and `status`)."""
    raw = model.model_json_schema(mode="validation")
    defs = raw.get("$defs", {})
    body = _convert(raw, defs)
    body.pop("description", None)
    status = _strip_defaults(body["properties"]["status"])  # the operator writes all of status
    if "observedGeneration" in status["properties"]:
        # Until the operator's first status write, the API server serves `status: {observedGeneration: 0}`
        # (a default applies when the object is read): kstatus, Helm's --wait and Argo CD then see a
        # status behind metadata.generation (in progress) rather than no status at all (done).
        status["default"] = {"observedGeneration": 0}
    status["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    status["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    return {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": f"APIVersion of the object ({t.API_VERSION})."},
            "kind": {"type": "string", "description": f"Kind of the object ({kind})."},
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
    {"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason",
     "description": "Why the job is (not yet) Ready: Queued, Unschedulable, Training, ProgressStalled, a failure's reason."},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "description": "Fine-tuning method."},
    {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent", "description": "Percent of steps done."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Latest training loss."},
    {"name": "Trials", "type": "string", "jsonPath": ".status.search.progress",
     "description": "Hyperparameter search: finished / planned trials."},
    {"name": "Best", "type": "number", "jsonPath": ".status.search.best.value",
     "description": "Hyperparameter search: the best trial's metric."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1, "description": "Optimizer steps done."},
    {"name": "ETA", "type": "integer", "jsonPath": ".status.progress.etaSeconds", "priority": 1, "description": "Seconds to go."},
    {"name": "Perplexity", "type": "number", "jsonPath": ".status.evaluation.perplexity", "priority": 1,
     "description": "Validation perplexity of the tuned model."},
    {"name": "Task", "type": "string", "jsonPath": ".status.evaluation.headline", "priority": 1,
     "description": "The first evaluation task's headline metric: tuned score (gain over the base)."},
    {"name": "Run", "type": "string", "jsonPath": ".spec.runId", "priority": 1, "description": "Run identifier."},
    {"name": "Objective", "type": "string", "jsonPath": ".spec.objective", "priority": 1, "description": "Training objective."},
    {"name": "Workers", "type": "integer", "jsonPath": ".spec.resources.workers", "priority": 1, "description": "Pods."},
    {"name": "GPUs", "type": "integer", "jsonPath": ".spec.resources.gpusPerWorker", "priority": 1, "description": "GPUs per pod."},
    {"name": "Pool", "type": "string", "jsonPath": ".spec.resources.nodePool", "priority": 1, "description": "Node pool."},
    {"name": "Sandbox", "type": "string", "jsonPath": ".status.sandboxNamespace", "priority": 1, "description": "Sandbox namespace."},
    {"name": "Policy", "type": "string", "jsonPath": ".status.tenantPolicy", "priority": 1, "description": "Governing TenantPolicy."},
    {"name": "Queue", "type": "string", "jsonPath": ".status.queue.clusterQueue", "priority": 1, "description": "Kueue ClusterQueue."},
    {"name": "Kueue", "type": "string", "jsonPath": ".status.queue.reason", "priority": 1, "description": "Kueue's state of the run."},
    {"name": "Preemptions", "type": "integer", "jsonPath": ".status.preemptions", "priority": 1, "description": "Times Kueue preempted the run."},
]


TENANT_POLICY_PRINTER_COLUMNS = [
    {"name": "Namespaces", "type": "string", "jsonPath": ".status.namespaces", "description": "Tenant namespaces governed."},
    {"name": "Running", "type": "integer", "jsonPath": ".status.runningJobs", "description": "Jobs with a run that has not finished (a search as search.parallelism)."},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpusInUse", "description": "GPUs requested by running pods (not queued, preempted or suspended runs)."},
    {"name": "GPU-Hours", "type": "number", "jsonPath": ".status.usage.gpuHours", "description": "GPU-hours used this period."},
    {"name": "Budget", "type": "number", "jsonPath": ".spec.budget.gpuHours", "description": "GPU-hours per period."},
    {"name": "Exhausted", "type": "boolean", "jsonPath": ".status.usage.budgetExhausted", "description": "New runs wait."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Queues", "type": "string", "jsonPath": ".spec.kueue.clusterQueues", "priority": 1, "description": "Kueue ClusterQueues."},
    {"name": "Period", "type": "string", "jsonPath": ".spec.budget.period", "priority": 1, "description": "Budget period."},
]


@dataclasses.dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    scope: str
    model: type[BaseModel]
    description: str
    printer_columns: list[dict[str, Any]]
    file: str


FINETUNE_JOB = Kind(t.KIND, t.PLURAL, t.SINGULAR, tuple(t.SHORT_NAMES), "Namespaced", t.FineTuneJob,
                    "FineTuneJob is one declarative, sandboxed, distributed LLM fine-tuning run.", PRINTER_COLUMNS,
                    CRD_FILE)
TENANT_POLICY = Kind(tenant.KIND, tenant.PLURAL, tenant.SINGULAR, tuple(tenant.SHORT_NAMES), "Cluster",
                     tenant.TenantPolicy,
                     "TenantPolicy is what a platform team allows the FineTuneJobs of the tenant namespaces it "
                     "selects: pools, images, priorities, storage, ceilings, queues and a GPU-hour budget.",
                     TENANT_POLICY_PRINTER_COLUMNS, TENANT_POLICY_CRD_FILE)
KINDS = (FINETUNE_JOB, TENANT_POLICY)


def build_crd(kind: Kind = FINETUNE_JOB) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{t.GROUP}",
            "labels": {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/part-of": "finetune-operator"},
        },
        "spec": {
            "group": t.GROUP,
            "scope": kind.scope,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": list(t.CATEGORIES),
            },
            "versions": [
                {
                    "name": t.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": kind.printer_columns,
                    "schema": {"openAPIV3Schema": openapi_schema(kind.model, kind.kind, kind.description)},
                }
            ],
        },
    }


HEADER = "# Generated by `make crds` from finetune_operator.api.types -- do not edit by hand.\n"


def render_crd_yaml(kind: Kind = FINETUNE_JOB) -> str:
    return HEADER + yaml.safe_dump(build_crd(kind), sort_keys=False, width=120)


def main(argv: list[str]) -> int:
    folder = Path(argv[1]) if len(argv) > 1 else Path("crds")
    folder.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        (folder / kind.file).write_text(render_crd_yaml(kind))
        print(f"wrote {folder / kind.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
