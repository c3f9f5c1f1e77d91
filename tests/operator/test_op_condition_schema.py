"""status.conditions in every committed CRD is at least as strict as metav1.Condition
(k8s.io/apimachinery/pkg/apis/meta/v1/types.go), so that a condition the operator writes is one every
Kubernetes tool can read: a good condition is accepted, and each bad one is refused for its one defect.

The schema is read from the generated YAML in crds/ (what the API server gets), not from the models;
test_op_api.py keeps crds/ equal to the models. OpenAPI v3 value validation is draft 4 JSON Schema,
with `format` checked as the API server checks it (date-time), hence the FormatChecker.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
import yaml

from finetune_operator.api import types as t
from op_testdata import ROOT

# metav1.Condition's limits; ours may be stricter (types.MAX_CONDITION_REASON, MAX_CONDITION_MESSAGE).
METAV1_MAX_TYPE = 316
METAV1_MAX_REASON = 1024
METAV1_MAX_MESSAGE = 32768

FORMAT_CHECKER = jsonschema.Draft4Validator.FORMAT_CHECKER


def conditions_schemas() -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, version, schema of status.conditions) of every CRD version in crds/ that has conditions."""
    found = []
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            for version in doc["spec"]["versions"]:
                status = version["schema"]["openAPIV3Schema"].get("properties", {}).get("status", {})
                if "conditions" in status.get("properties", {}):
                    found.append((doc["spec"]["names"]["kind"], version["name"],
                                  status["properties"]["conditions"]))
    return found


CRDS = conditions_schemas()
CRD_IDS = [f"{kind}-{version}" for kind, version, _ in CRDS]

GOOD = {"type": "Ready", "status": "True", "reason": "Succeeded", "message": "The run succeeded",
        "observedGeneration": 3, "lastTransitionTime": "2026-01-01T12:00:00Z"}


def good(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


def without(field: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != field}


ACCEPTED = [
    ("the good one", GOOD),
    ("observedGeneration omitted", without("observedGeneration")),
    ("observedGeneration 0", good(observedGeneration=0)),
    ("status False", good(status="False")),
    ("status Unknown", good(status="Unknown")),
    ("message empty", good(message="")),
    ("type with a DNS prefix", good(type="finetune.dev/Ready")),
    ("type with - _ . inside", good(type="Sandbox-Ready_v1.2")),
    ("type of metav1's maximum length", good(type="a" * METAV1_MAX_TYPE)),
    ("reason one letter", good(reason="A")),
    ("reason with _ , : inside", good(reason="Pod:Evicted,OOM_Killed")),
    ("reason ends with _", good(reason="Backoff_")),
    ("reason of our maximum length", good(reason="R" * t.MAX_CONDITION_REASON)),
    ("message of our maximum length", good(message="m" * t.MAX_CONDITION_MESSAGE)),
    ("time with fraction and offset", good(lastTransitionTime="2026-01-01T12:00:00.123456+02:00")),
]

# (name, condition, the (keyword, field) pairs it must fail on: one defect each)
REJECTED = [
    # type
    ("type missing", without("type"), {("required", "type")}),
    ("type empty", good(type=""), {("pattern", "type")}),
    ("type with a space", good(type="Sandbox Ready"), {("pattern", "type")}),
    ("type starts with -", good(type="-Ready"), {("pattern", "type")}),
    ("type ends with .", good(type="Ready."), {("pattern", "type")}),
    ("type with an upper-case prefix", good(type="Finetune.dev/Ready"), {("pattern", "type")}),
    ("type with an empty name", good(type="finetune.dev/"), {("pattern", "type")}),
    ("type longer than metav1's 316", good(type="a" * (METAV1_MAX_TYPE + 1)), {("maxLength", "type")}),
    ("type not a string", good(type=1), {("type", "type")}),
    # status
    ("status missing", without("status"), {("required", "status")}),
    ("status lower-case", good(status="true"), {("enum", "status")}),
    ("status Yes", good(status="Yes"), {("enum", "status")}),
    ("status empty", good(status=""), {("enum", "status")}),
    ("status a boolean", good(status=True), {("type", "status"), ("enum", "status")}),
    # reason
    ("reason missing", without("reason"), {("required", "reason")}),
    ("reason empty", good(reason=""), {("minLength", "reason"), ("pattern", "reason")}),
    ("reason starts with a digit", good(reason="1Failed"), {("pattern", "reason")}),
    ("reason starts with _", good(reason="_Failed"), {("pattern", "reason")}),
    ("reason with -", good(reason="Not-Ready"), {("pattern", "reason")}),
    ("reason with a space", good(reason="Not Ready"), {("pattern", "reason")}),
    ("reason ends with ,", good(reason="Failed,"), {("pattern", "reason")}),
    ("reason ends with :", good(reason="Failed:"), {("pattern", "reason")}),
    ("reason longer than metav1's 1024", good(reason="R" * (METAV1_MAX_REASON + 1)), {("maxLength", "reason")}),
    ("reason longer than ours", good(reason="R" * (t.MAX_CONDITION_REASON + 1)), {("maxLength", "reason")}),
    # message
    ("message missing", without("message"), {("required", "message")}),
    ("message longer than metav1's 32768", good(message="m" * (METAV1_MAX_MESSAGE + 1)), {("maxLength", "message")}),
    ("message longer than ours", good(message="m" * (t.MAX_CONDITION_MESSAGE + 1)), {("maxLength", "message")}),
    ("message not a string", good(message=None), {("type", "message")}),
    # lastTransitionTime
    ("lastTransitionTime missing", without("lastTransitionTime"), {("required", "lastTransitionTime")}),
    ("lastTransitionTime yesterday", good(lastTransitionTime="yesterday"), {("format", "lastTransitionTime")}),
    ("lastTransitionTime a date only", good(lastTransitionTime="2026-01-01"), {("format", "lastTransitionTime")}),
    ("lastTransitionTime month 13", good(lastTransitionTime="2026-13-01T12:00:00Z"),
     {("format", "lastTransitionTime")}),
    ("lastTransitionTime epoch seconds", good(lastTransitionTime="1767268800"), {("format", "lastTransitionTime")}),
    ("lastTransitionTime a number", good(lastTransitionTime=1767268800), {("type", "lastTransitionTime")}),
    # observedGeneration
    ("observedGeneration negative", good(observedGeneration=-1), {("minimum", "observedGeneration")}),
    ("observedGeneration fractional", good(observedGeneration=1.5), {("type", "observedGeneration")}),
    ("observedGeneration a string", good(observedGeneration="3"), {("type", "observedGeneration")}),
]


def failures(schema: dict[str, Any], condition: dict[str, Any]) -> set[tuple[str, str]]:
    """(keyword, field) of each error of a one-condition list; a missing field is named by `required`."""
    validator = jsonschema.Draft4Validator(schema, format_checker=FORMAT_CHECKER)
    found = set()
    for error in validator.iter_errors([condition]):
        path = list(error.absolute_path)
        if error.validator == "required":
            field = re.match(r"'(\w+)' is a required property", error.message).group(1)
        else:
            assert path[:1] == [0] and len(path) == 2, (path, error.message)
            field = path[1]
        found.add((error.validator, field))
    return found


def test_every_crd_with_conditions_is_checked():
    assert {"FineTuneJob", "TenantPolicy"} <= {kind for kind, _, _ in CRDS}


def test_the_format_checker_checks_date_time():
    """Without rfc3339-validator, jsonschema passes every date-time: the cases below would prove nothing."""
    assert FORMAT_CHECKER.conforms("2026-01-01T12:00:00Z", "date-time")
    assert not FORMAT_CHECKER.conforms("yesterday", "date-time")


@pytest.mark.parametrize("kind,version,schema", CRDS, ids=CRD_IDS)
@pytest.mark.parametrize("name,condition", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_condition_accepted(kind, version, schema, name, condition):
    assert failures(schema, condition) == set()


@pytest.mark.parametrize("kind,version,schema", CRDS, ids=CRD_IDS)
@pytest.mark.parametrize("name,condition,expected", REJECTED, ids=[c[0] for c in REJECTED])
def test_condition_rejected_for_its_one_defect(kind, version, schema, name, condition, expected):
    assert failures(schema, condition) == expected


@pytest.mark.parametrize("kind,version,schema", [c for c in CRDS if c[0] != t.KIND],
                         ids=[i for c, i in zip(CRDS, CRD_IDS) if c[0] != t.KIND])
def test_conditions_are_a_map_keyed_by_type(kind, version, schema):
    # FineTuneJob's is checked by test_op_api.py (test_status_fields_have_no_defaults_and_conditions_are_a_map).
    assert schema["x-kubernetes-list-type"] == "map"
    assert schema["x-kubernetes-list-map-keys"] == ["type"]
    assert schema["items"]["properties"]["type"]["type"] == "string"
    assert "type" in schema["items"]["required"]  # a list-map key must be required (or defaulted)
