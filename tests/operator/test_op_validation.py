"""Validators over observed facts: each case names the reason and the field in the message."""

from __future__ import annotations

import pytest

from finetune_operator.config import OperatorConfig
from finetune_operator.validation import Facts, S3Check, s3_uris_to_check, validate
from op_testdata import ROOT, job, minimal_spec

CFG = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml")
GOOD_SECRET = Facts(secret_found=True, secret_keys=frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}))
CPU = {"resources": {"gpusPerWorker": 0, "nodePool": "cpu"}}


def spec(**overrides):
    return job(minimal_spec(**{**CPU, **overrides}))["spec"]


CASES = [
    # name, spec, facts, expected (reason, field) pairs -- empty means valid
    ("valid", spec(), GOOD_SECRET, []),
    ("facts not gathered yet", spec(), Facts(), []),
    ("unknown pool", spec(resources={"nodePool": "h100", "gpusPerWorker": 0}), GOOD_SECRET,
     [("UnknownNodePool", "spec.resources.nodePool")]),
    ("gpus on a cpu pool", spec(resources={"nodePool": "cpu", "gpusPerWorker": 1}), GOOD_SECRET,
     [("GPUsNotAvailable", "spec.resources.gpusPerWorker")]),
    ("more gpus than a node has", spec(resources={"nodePool": "a100", "gpusPerWorker": 16}), GOOD_SECRET,
     [("GPUsNotAvailable", "spec.resources.gpusPerWorker")]),
    ("qlora on cpu", spec(method={"type": "qlora"}), GOOD_SECRET, [("InvalidSpec", "spec.method.type")]),
    ("no datasets, no stages", spec(datasets=[]), GOOD_SECRET, [("InvalidSpec", "spec.datasets")]),
    ("duplicate stages", spec(datasets=[], stages=[{"name": "a", "datasets": [{"uri": "s3://bkt/x.jsonl"}]},
                                                   {"name": "a", "datasets": [{"uri": "s3://bkt/y.jsonl"}]}]),
     GOOD_SECRET, [("InvalidSpec", "spec.stages[1].name")]),
    ("dpo on chat data", spec(objective="dpo"), GOOD_SECRET, [("InvalidSpec", "spec.datasets[0].format")]),
    ("schema violation", spec(resources={"workers": 0, "gpusPerWorker": 0, "nodePool": "cpu"}), GOOD_SECRET,
     [("InvalidSpec", "spec.resources.workers")]),
    ("secret missing", spec(), Facts(secret_found=False), [("SecretNotFound", "spec.credentials.secretName")]),
    ("secret lacks a key", spec(), Facts(secret_found=True, secret_keys=frozenset({"AWS_ACCESS_KEY_ID"})),
     [("SecretKeysMissing", "spec.credentials.secretName")]),
    ("model missing in S3", spec(), Facts(secret_found=True, secret_keys=GOOD_SECRET.secret_keys,
                                          s3={"spec.model.uri": S3Check(False)}),
     [("S3ObjectNotFound", "spec.model.uri")]),
    ("dataset missing in S3", spec(), Facts(secret_found=True, secret_keys=GOOD_SECRET.secret_keys,
                                            s3={"spec.model.uri": S3Check(True), "spec.datasets[0].uri": S3Check(False)}),
     [("S3ObjectNotFound", "spec.datasets[0].uri")]),
    ("S3 access denied", spec(), Facts(secret_found=True, secret_keys=GOOD_SECRET.secret_keys,
                                       s3={"spec.model.uri": S3Check(False, "AccessDenied")}),
     [("S3AccessDenied", "spec.model.uri")]),
    ("S3 unreachable", spec(), Facts(secret_found=True, secret_keys=GOOD_SECRET.secret_keys,
                                     s3={"spec.model.uri": S3Check(None, "connection refused")}),
     [("S3Unreachable", "spec.model.uri")]),
]


@pytest.mark.parametrize("name,raw,facts,expected", CASES, ids=[c[0] for c in CASES])
def test_validate(name, raw, facts, expected):
    _, problems = validate(raw, CFG, facts)
    assert [(p.reason, p.message.split(":")[0]) for p in problems] == expected


def test_messages_explain_the_problem():
    _, problems = validate(spec(resources={"nodePool": "h100", "gpusPerWorker": 0}), CFG, GOOD_SECRET)
    assert "h100" in problems[0].message and "a100, cpu, local" in problems[0].message


def test_s3_inputs_cover_models_datasets_validation_and_stages():
    parsed = validate(spec(validation={"uri": "s3://bkt/val.jsonl"},
                           stages=[{"name": "one", "datasets": [{"uri": "s3://bkt/s.jsonl"}]}]), CFG, GOOD_SECRET)[0]
    assert s3_uris_to_check(parsed) == {
        "spec.model.uri": "s3://models/smollm2-135m/",
        "spec.datasets[0].uri": "s3://team-a/data/support.jsonl",
        "spec.validation.uri": "s3://bkt/val.jsonl",
        "spec.stages[0].datasets[0].uri": "s3://bkt/s.jsonl",
    }


from cel_cases import CEL_CASES  # noqa: E402
from op_testdata import SPEC_SCHEMA, apply_schema_defaults  # noqa: E402

A100 = OperatorConfig.model_validate({**CFG.model_dump(), "defaultNodePool": "a100"})


@pytest.mark.parametrize("name,raw,accepted", CEL_CASES, ids=[c[0] for c in CEL_CASES])
def test_python_validators_agree_with_the_api_server(name, raw, accepted):
    stored = {k: v for k, v in apply_schema_defaults(raw, SPEC_SCHEMA).items()}
    _, problems = validate(stored, A100, GOOD_SECRET)
    assert (not problems) == accepted, problems
