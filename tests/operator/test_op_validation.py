"""Validators over observed facts: each case names the reason and the field in the message."""

from __future__ import annotations

import pytest

from finetune_operator import tenancy
from finetune_operator.config import OperatorConfig
from finetune_operator.validation import Facts, S3Check, s3_uris_to_check, validate
from finetune_operator.problems import image_from
from op_testdata import ROOT, job, minimal_spec

CFG = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml")
KEYS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})


def secret_facts(**facts) -> Facts:
    """A found, opted-in Secret with both keys, and whatever else the case says."""
    return Facts(**{"secret_found": True, "secret_keys": KEYS, "secret_opted_in": True, **facts})


GOOD_SECRET = secret_facts()
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
    ("secret lacks a key", spec(), secret_facts(secret_keys=frozenset({"AWS_ACCESS_KEY_ID"})),
     [("SecretKeysMissing", "spec.credentials.secretName")]),
    ("secret not opted in", spec(), secret_facts(secret_opted_in=False), [("SecretNotOptedIn", "spec.credentials.secretName")]),
    ("secret with an empty key", spec(), secret_facts(secret_blank_keys=frozenset({"AWS_SECRET_ACCESS_KEY"})),
     [("SecretValueEmpty", "spec.credentials.secretName")]),
    ("an image from anywhere", spec(image="evil.example.com/miner:latest"), GOOD_SECRET,
     [("ImageNotAllowed", "spec.image")]),
    ("a priority class of the platform", spec(runPolicy={"priorityClassName": "system-cluster-critical"}), GOOD_SECRET,
     [("PriorityClassNotAllowed", "spec.runPolicy.priorityClassName")]),
    ("zero cpu (no limit)", spec(resources={"nodePool": "cpu", "gpusPerWorker": 0, "cpu": "0"}), GOOD_SECRET,
     [("InvalidSpec", "spec.resources.cpu")]),
    ("zero memory", spec(resources={"nodePool": "cpu", "gpusPerWorker": 0, "memory": 0}), GOOD_SECRET,
     [("InvalidSpec", "spec.resources.memory")]),
    ("shared memory above the limit", spec(resources={"nodePool": "cpu", "gpusPerWorker": 0, "sharedMemory": "65Gi"}),
     GOOD_SECRET, [("LimitExceeded", "spec.resources.sharedMemory")]),
    ("an endpoint the platform did not allow", spec(storage={"endpoint": "http://s3.evil.example.com:9000"}),
     GOOD_SECRET, [("EndpointNotAllowed", "spec.storage.endpoint")]),
    ("the metadata service as endpoint", spec(storage={"endpoint": "http://169.254.169.254"}), GOOD_SECRET,
     [("EndpointPortNotAllowed", "spec.storage.endpoint"), ("EndpointNotAllowed", "spec.storage.endpoint")]),
    ("model missing in S3", spec(), secret_facts(s3={"spec.model.uri": S3Check(False)}),
     [("S3ObjectNotFound", "spec.model.uri")]),
    ("dataset missing in S3", spec(), secret_facts(s3={"spec.model.uri": S3Check(True), "spec.datasets[0].uri": S3Check(False)}),
     [("S3ObjectNotFound", "spec.datasets[0].uri")]),
    ("S3 access denied", spec(), secret_facts(s3={"spec.model.uri": S3Check(False, "AccessDenied")}),
     [("S3AccessDenied", "spec.model.uri")]),
    ("S3 unreachable", spec(), secret_facts(s3={"spec.model.uri": S3Check(None, "connection refused")}),
     [("S3Unreachable", "spec.model.uri")]),
]


@pytest.mark.parametrize("name,raw,facts,expected", CASES, ids=[c[0] for c in CASES])
def test_validate(name, raw, facts, expected):
    _, problems = validate(raw, CFG, facts)
    assert [(p.reason, p.message.split(":")[0]) for p in problems] == expected


IMAGE_CASES = [
    # (allowed prefixes, image, allowed?)
    (["registry.example.com"], "registry.example.com/trainer:1", True),
    (["registry.example.com"], "registry.example.com.evil.io/trainer:1", False),
    (["registry.example.com"], "registry.example.com-mirror/trainer:1", False),
    (["registry.example.com/"], "registry.example.com/", False),
    (["registry.example.com/"], "registry.example.com/team/trainer@sha256:" + "a" * 64, True),
    (["registry.example.com/team"], "registry.example.com/team/trainer:2", True),
    (["registry.example.com/team"], "registry.example.com/team:2", True),
    (["registry.example.com/team"], "registry.example.com/team@sha256:" + "a" * 64, True),
    (["registry.example.com/team"], "registry.example.com/team-b/trainer:2", False),
    (["registry.example.com/team"], "registry.example.com/teamx", False),
    ([""], "anything/at:all", False),
    ([], "registry.example.com/trainer:1", False),
]


@pytest.mark.parametrize("prefixes, image, allowed", IMAGE_CASES, ids=[f"{c[0]}-{c[1]}" for c in IMAGE_CASES])
def test_an_allowed_prefix_matches_at_a_boundary(prefixes, image, allowed):
    assert image_from(image, prefixes) is allowed
    cfg = CFG.model_copy(update={"allowedImages": prefixes})
    _, problems = validate(spec(image=image), cfg, GOOD_SECRET)
    assert ("ImageNotAllowed" in [p.reason for p in problems]) is not allowed


def test_messages_explain_the_problem():
    _, problems = validate(spec(resources={"nodePool": "h100", "gpusPerWorker": 0}), CFG, GOOD_SECRET)
    assert "h100" in problems[0].message and "a100, cpu, local" in problems[0].message


TAGGED, PINNED = "registry.example.com/trainer:1", "registry.example.com/trainer@sha256:" + "a" * 64
DIGEST_CASES = [
    # (operator-wide requireImageDigest, the governing TenantPolicy's images.requireDigest (None: no policy),
    #  image, expected (reason, field) pairs)
    (True, None, TAGGED, [("ImageNotAllowed", "spec.image")]),
    (True, None, PINNED, []),
    (False, None, TAGGED, []),
    (True, False, TAGGED, [("ImageNotAllowed", "spec.image")]),  # a policy that says nothing does not lift it
    (True, False, PINNED, []),
    (False, True, TAGGED, [("PolicyViolation", "spec.image")]),  # a policy can add the requirement
    (False, False, TAGGED, []),
]


@pytest.mark.parametrize("operator_wide, policy_requires, image, expected", DIGEST_CASES,
                         ids=[f"operator-{c[0]}-policy-{c[1]}-{'pinned' if '@' in c[2] else 'tagged'}"
                              for c in DIGEST_CASES])
def test_require_image_digest(operator_wide, policy_requires, image, expected):
    cfg = CFG.model_copy(update={"allowedImages": ["registry.example.com/"], "requireImageDigest": operator_wide})
    policy = None if policy_requires is None else tenancy.Policy.from_body({
        "metadata": {"name": "team-a"},
        "spec": {"namespaceSelector": {}, "images": {"registries": ["registry.example.com/"],
                                                     "requireDigest": policy_requires}}})
    _, problems = validate(spec(image=image), cfg, secret_facts(policy=policy))
    assert [(p.reason, p.message.split(":")[0]) for p in problems] == expected, problems
    if expected and expected[0][0] == "ImageNotAllowed":
        assert "must be pinned by digest" in problems[0].message


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
