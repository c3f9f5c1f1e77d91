"""The FineTuneJob API: pydantic models, the generated CRD and its schema."""

from __future__ import annotations

import re
from typing import Any, Iterator

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from finetune_operator.api import crd
from finetune_operator.api.types import FineTuneJobSpec, FineTuneJobStatus, parse_spec
from op_testdata import ROOT, SPEC_SCHEMA, apply_schema_defaults, example_documents, minimal_spec

CRD_PATH = ROOT / "crds" / crd.CRD_FILE
SCHEMA = crd.openapi_schema()


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, prop in node.get("properties", {}).items():
        yield from walk(prop, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):  # a map: its values' schema
        yield from walk(node["additionalProperties"], f"{path}{{}}")


# ---- the committed CRD --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", crd.KINDS, ids=lambda k: k.kind)
def test_committed_crds_match_the_models(kind):
    path = ROOT / "crds" / kind.file
    assert path.read_text() == crd.render_crd_yaml(kind), "crds/ is stale: run `make crds`"
    chart_copy = ROOT / "charts" / "finetune-operator" / "crds" / kind.file
    assert chart_copy.read_text() == path.read_text(), "the chart's CRDs are stale: run `make chart-crds`"


def test_tenant_policy_crd_is_cluster_scoped_with_structural_maps_and_lists():
    doc = crd.build_crd(crd.TENANT_POLICY)
    assert doc["metadata"]["name"] == "tenantpolicies.finetune.dev" and doc["spec"]["scope"] == "Cluster"
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    selector = schema["properties"]["namespaceSelector"]
    # a map keeps its value schema (else the API server would prune every label)
    assert selector["properties"]["matchLabels"]["additionalProperties"] == {"type": "string", "maxLength": 63}
    for name, node in walk(schema):
        if node.get("type") == "array":
            assert node["items"].get("type"), f"{name}: list items need a type in a structural schema"
    paths = {p for p, _ in walk(crd.openapi_schema(crd.TENANT_POLICY.model, crd.TENANT_POLICY.kind, ""))}
    for column in crd.TENANT_POLICY_PRINTER_COLUMNS:
        if column["jsonPath"] != ".metadata.creationTimestamp":
            assert column["jsonPath"] in paths, column


def test_api_reference_matches_the_models():
    from finetune_operator.api import docs

    text = (ROOT / "docs" / "api.md").read_text()
    assert text == docs.render(text), "docs/api.md is stale: run `make crds`"


def test_crd_names_and_subresources():
    doc = yaml.safe_load(CRD_PATH.read_text())
    spec = doc["spec"]
    assert doc["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert spec["group"] == "finetune.dev"
    assert spec["names"]["shortNames"] == ["ftj"]
    assert spec["names"]["categories"] == ["finetune"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["storage"] and version["served"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c.get("priority", 0) for c in version["additionalPrinterColumns"]}
    assert [n for n, p in columns.items() if p == 0] == ["Phase", "Reason", "Method", "Progress", "Loss", "Trials", "Best",
                                                         "Age"]
    assert {"Step", "ETA", "Sandbox", "Objective"} <= {n for n, p in columns.items() if p == 1}


def test_printer_column_paths_exist_in_schema():
    paths = {p for p, _ in walk(SCHEMA)}
    for column in crd.PRINTER_COLUMNS:
        if column["jsonPath"].startswith(".metadata"):
            continue
        # A filter on a list of conditions names the list's path, then a key of its items.
        path = re.sub(r"\[\?\(@\.type==\"\w+\"\)\]", "[]", column["jsonPath"])
        assert path in paths, column


# ---- structural schema rules --------------------------------------------------------------------


@pytest.mark.parametrize("path,node", list(walk(SCHEMA)), ids=lambda v: v if isinstance(v, str) else "")
def test_schema_node_is_structural(path, node):
    assert not {"$ref", "title", "$defs", "nullable", "allOf", "oneOf"} & node.keys()
    if "additionalProperties" in node:  # only a map of typed values, never next to declared properties
        assert isinstance(node["additionalProperties"], dict) and "properties" not in node, path
    if node.get("x-kubernetes-int-or-string"):
        assert "type" not in node and node["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    else:
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        assert "anyOf" not in node


@pytest.mark.parametrize("path,node", [(p, n) for p, n in walk(SCHEMA) if p.startswith((".spec", ".status")) and not p.endswith(("[]", "{}"))],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_field_has_a_description(path, node):
    assert node.get("description"), f"{path} has no description"


@pytest.mark.parametrize("path,node", [(p, n) for p, n in walk(SCHEMA) if p.startswith(".spec")], ids=lambda v: v if isinstance(v, str) else "")
def test_spec_lists_and_strings_are_bounded_for_cel_cost(path, node):
    if node.get("type") == "array":
        assert "maxItems" in node, path
    if node.get("type") == "string" or node.get("x-kubernetes-int-or-string"):
        assert "maxLength" in node or "enum" in node, path


def _guarded_fields() -> list[tuple[str, str]]:
    """Fields named in an 'only with' rule `!has(self.X) || ...`: they must have no schema default."""
    out = []
    for path, node in walk(SCHEMA):
        for rule in node.get("x-kubernetes-validations", []):
            if "only allowed" not in rule["message"]:
                continue
            for field in re.findall(r"^!has\(self\.(\w+)\) \|\|", rule["rule"]):
                out.append((path, field))
    return out


def test_only_with_rules_exist():
    assert {(".spec.method", "lora"), (".spec.method", "virtualTokens"), (".spec.method", "freezeLayers"),
            (".spec.distributed", "zeroStage")} <= set(_guarded_fields())


@pytest.mark.parametrize("path,field", _guarded_fields())
def test_fields_guarded_by_only_with_rules_have_no_default(path, field):
    node = dict(walk(SCHEMA))[path]
    if field in node.get("properties", {}):
        assert "default" not in node["properties"][field], f"{path}.{field}"


def test_status_fields_have_no_defaults_and_conditions_are_a_map():
    status = SCHEMA["properties"]["status"]
    assert all("default" not in n for path, n in walk(status) if path)  # the operator writes every field
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]


# ---- schema defaults == model defaults ----------------------------------------------------------


def test_schema_defaults_equal_the_model_defaults():
    """What the API server stores for a minimal spec is what pydantic fills in: one source of truth."""
    stored = apply_schema_defaults(minimal_spec(), SPEC_SCHEMA)
    assert stored == parse_spec(minimal_spec()).model_dump(mode="json", exclude_none=True)


# ---- schema validation (OpenAPI v3 value validation is draft 4 JSON Schema) ---------------------

VALIDATOR = jsonschema.Draft4Validator(SCHEMA)


def full_object(spec):
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}, "spec": spec}


SCHEMA_CASES = [
    ("minimal", minimal_spec(), True),
    ("quantity strings", minimal_spec(resources={"cpu": "500m", "memory": "64Gi"}), True),
    ("quantity integer", minimal_spec(resources={"cpu": 8}), True),
    ("quantity malformed", minimal_spec(resources={"memory": "64 GB"}), False),
    ("quantity negative", minimal_spec(resources={"cpu": "-1"}), False),
    ("runId not a DNS label", minimal_spec(runId="Run_1"), False),
    ("runId too long", minimal_spec(runId="r" * 21), False),
    ("unknown method", minimal_spec(method={"type": "adapter"}), False),
    ("dataset uri not s3", minimal_spec(datasets=[{"uri": "https://x/y.jsonl"}]), False),
    ("zero workers", minimal_spec(resources={"workers": 0}), False),
    ("weight 0", minimal_spec(datasets=[{"uri": "s3://bucket/a.jsonl", "weight": 0}]), False),
    ("too many datasets", minimal_spec(datasets=[{"uri": "s3://bucket/a.jsonl"}] * 33), False),
    ("missing credentials", {k: v for k, v in minimal_spec().items() if k != "credentials"}, False),
    ("region of a custom S3", minimal_spec(storage={"region": "garage"}), True),
    ("region blank", minimal_spec(storage={"region": " "}), False),
    ("region leading dash", minimal_spec(storage={"region": "-1"}), False),
    ("region with a dot", minimal_spec(storage={"region": "eu.west"}), False),
]


@pytest.mark.parametrize("name,spec,valid", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_schema_validation(name, spec, valid):
    errors = list(VALIDATOR.iter_errors(full_object(apply_schema_defaults(spec, SPEC_SCHEMA))))
    assert (not errors) == valid, [e.message for e in errors]


@pytest.mark.parametrize("name,spec,valid", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_pydantic_agrees_with_schema(name, spec, valid):
    if valid:
        FineTuneJobSpec.model_validate(spec)
    else:
        with pytest.raises(ValidationError):
            FineTuneJobSpec.model_validate(spec)


@pytest.mark.parametrize("source,doc", [d for d in example_documents() if d[1]["kind"] == "FineTuneJob"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_examples_are_valid(source, doc):
    errors = list(VALIDATOR.iter_errors(doc))
    assert not errors, [e.message for e in errors]
    parse_spec(apply_schema_defaults(doc["spec"], SPEC_SCHEMA))


def test_status_round_trips_without_nulls():
    status = FineTuneJobStatus.model_validate({"phase": "Running", "progress": {"step": 3, "totalSteps": 10}})
    dumped = status.model_dump(mode="json", exclude_none=True)
    assert dumped["progress"]["step"] == 3 and "loss" not in dumped["progress"]
    assert not list(VALIDATOR.iter_errors({**full_object(minimal_spec()), "status": dumped}))


def _example_files():
    """The example files that hold FineTuneJobs (not the cluster-wide tenant setup, examples/tenants/platform.yaml)."""
    by_file: dict[str, list] = {}
    for source, doc in example_documents():
        by_file.setdefault(source, []).append(doc)
    return sorted((source, docs) for source, docs in by_file.items() if any(d["kind"] == "FineTuneJob" for d in docs))


def test_the_examples_include_the_tenant_job():
    assert "tenants/team-a-job.yaml" in {source for source, doc in example_documents() if doc["kind"] == "FineTuneJob"}


@pytest.mark.parametrize("source,docs", _example_files(), ids=lambda v: v if isinstance(v, str) else "")
def test_example_files_apply_into_any_namespace(source, docs):
    from finetune_operator.config import OperatorConfig
    from finetune_operator.validation import Facts, validate

    assert all("namespace" not in d["metadata"] for d in docs), "examples must apply into any namespace"
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    jobs = [d for d in docs if d["kind"] == "FineTuneJob"]
    assert jobs
    cfg = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml")
    for job in jobs:
        secret = secrets[job["spec"]["credentials"]["secretName"]]
        assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "finetune-local", "AWS_SECRET_ACCESS_KEY": "finetune-local-secret"}
        assert not job["spec"].get("storage", {}).get("endpoint")
        assert secret["metadata"]["labels"]["finetune.dev/credentials"] == "true"
        facts = Facts(secret_found=True, secret_keys=frozenset(secret["stringData"]), secret_opted_in=True)
        _, problems = validate(apply_schema_defaults(job["spec"], SPEC_SCHEMA), cfg, facts)
        assert not problems, problems


def test_a_job_not_yet_seen_by_the_operator_is_served_with_a_status_behind_its_generation():
    """The API server defaults `status` when it reads the object, so tools see "not yet observed"."""
    assert SCHEMA["properties"]["status"]["default"] == {"observedGeneration": 0}
