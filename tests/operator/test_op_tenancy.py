"""Tenant policies: which policy governs a namespace, what it allows, when a run may start, the
policy's status and GPU-hour ledger (pure functions of tenancy.py), and validation under a policy."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import yaml

from finetune_operator import tenancy
from finetune_operator.api.tenant import LabelSelector, parse_policy_spec
from finetune_operator.api.types import parse_spec
from finetune_operator.builders.names import CREDENTIALS_OPT_IN_LABEL
from finetune_operator.config import OperatorConfig
from finetune_operator.validation import Facts, validate
from op_testdata import EXAMPLES, ROOT, SPEC_SCHEMA, apply_schema_defaults, minimal_spec

CFG = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml")
NOW = datetime(2026, 3, 18, 12, 0, 0, tzinfo=timezone.utc)  # a Wednesday
SELECT_A = {"matchLabels": {"finetune.dev/tenant": "team-a"}}


def policy(name="team-a", status=None, **spec) -> tenancy.Policy:
    body = {"metadata": {"name": name, "generation": 3, "uid": f"uid-{name}"},
            "spec": {"namespaceSelector": SELECT_A, **spec}, "status": status or {}}
    return tenancy.Policy.from_body(body)


def summary(name, namespace="team-a", created="2026-03-18T10:00:00Z", phase="Pending", started=False,
            finished=False, validated=True, gpus_running=0, gpu_seconds=0.0, run_id="1", slots=1) -> tenancy.JobSummary:
    return tenancy.JobSummary(namespace=namespace, name=name, uid=f"uid-{namespace}-{name}", created=created,
                              phase=phase, run_id=run_id, started=started, finished=finished, validated=validated,
                              gpus_running=gpus_running, gpu_seconds=gpu_seconds, slots=slots)


def snapshot(*policies, jobs=(), labels=None) -> tenancy.Tenancy:
    return tenancy.Tenancy(policies=list(policies), jobs=list(jobs), namespace_labels=labels if labels is not None else {
        "team-a": {"finetune.dev/tenant": "team-a"}, "team-a-dev": {"finetune.dev/tenant": "team-a"},
        "team-b": {"finetune.dev/tenant": "team-b"}, "default": {}})


@pytest.mark.parametrize("selector, labels, matches", [
    ({"matchLabels": {"t": "a"}}, {"t": "a", "x": "y"}, True),
    ({"matchLabels": {"t": "a"}}, {"t": "b"}, False),
    ({"matchExpressions": [{"key": "t", "operator": "In", "values": ["a", "b"]}]}, {"t": "b"}, True),
    ({"matchExpressions": [{"key": "t", "operator": "In", "values": ["a"]}]}, {}, False),
    ({"matchExpressions": [{"key": "t", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "t", "operator": "NotIn", "values": ["a"]}]}, {"t": "a"}, False),
    ({"matchExpressions": [{"key": "t", "operator": "Exists"}]}, {"t": ""}, True),
    ({"matchExpressions": [{"key": "t", "operator": "DoesNotExist"}]}, {"t": ""}, False),
    ({"matchLabels": {"t": "a"}, "matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {"t": "a"}, False),
])
def test_selector(selector, labels, matches):
    assert tenancy.selector_matches(LabelSelector.model_validate(selector), labels) is matches


@pytest.mark.parametrize("namespace, policies, require, governed_by, reason", [
    ("team-a", [policy()], False, "team-a", None),
    ("team-b", [policy()], False, None, None),
    ("team-b", [policy()], True, None, "NoTenantPolicy"),
    ("team-a", [policy(), policy("team-a-too")], False, None, "AmbiguousTenantPolicy"),
    ("unknown-namespace", [policy()], True, None, "NoTenantPolicy"),
])
def test_which_policy_governs_a_namespace(namespace, policies, require, governed_by, reason):
    found, problem = tenancy.policy_of(namespace, snapshot(*policies), require)
    assert (found.name if found else None) == governed_by
    assert (problem.reason if problem else None) == reason
    if reason == "AmbiguousTenantPolicy":
        assert "team-a, team-a-too" in problem.message


def broken(name="bad", selector=SELECT_A) -> tenancy.Policy:
    """A stored TenantPolicy that does not parse (a limit below its minimum)."""
    return tenancy.Policy.from_body({"metadata": {"name": name},
                                     "spec": {"namespaceSelector": selector, "limits": {"maxWorkers": 0}}})


@pytest.mark.parametrize("namespace, policies, require, reason", [
    # a namespace a policy that does not parse selects starts nothing, whatever requireTenantPolicy says
    ("team-a", [broken()], False, "InvalidTenantPolicy"),
    ("team-a", [broken()], True, "InvalidTenantPolicy"),
    ("team-a", [broken(), policy()], False, "InvalidTenantPolicy"),  # which one governs cannot be told
    # other namespaces are not its
    ("team-b", [broken()], False, None),
    ("team-b", [broken()], True, "NoTenantPolicy"),
    ("team-b", [broken(), policy("team-b", namespaceSelector={"matchLabels": {"finetune.dev/tenant": "team-b"}})],
     False, None),
    # a selector that does not parse either may select any namespace
    ("team-b", [broken(selector={"matchLabels": "team-a"})], False, "InvalidTenantPolicy"),
], ids=["selected", "selected-required", "selected-with-a-valid-one", "other", "other-required",
        "other-governed", "unreadable-selector"])
def test_a_policy_that_does_not_parse_stops_the_namespaces_it_selects(namespace, policies, require, reason):
    assert all(p.spec is None and "maxWorkers" in p.error for p in policies if p.name == "bad")
    governing, problem = tenancy.policy_of(namespace, snapshot(*policies), require)
    assert (problem.reason if problem else None) == reason
    if reason == "InvalidTenantPolicy":
        assert governing is None
        assert problem.message.startswith(f"namespace {namespace} is selected by TenantPolicy bad, which does not "
                                          "parse ("), problem.message
        assert "limits.maxWorkers: Input should be greater than or equal to 1" in problem.message


GOVERNING = dict(
    nodePools=["a100", "local"],
    images={"registries": ["registry.team-a.example/"], "requireDigest": True},
    priorityClasses={"allowed": ["training-low", "training-high"], "default": "training-low"},
    storage={"endpoints": ["http://s3.team-a.example:9000"], "modelURIs": ["s3://models/*"],
             "datasetURIs": ["s3://team-a/data/"], "outputURIs": ["s3://team-a/models/*"],
             "checkpointURIs": ["s3://team-a/ckpt/*"]},
    limits={"maxWorkers": 4, "maxGPUsPerWorker": 8, "maxGPUsPerJob": 16, "maxCPUPerWorker": "16",
            "maxMemoryPerWorker": "128Gi", "defaultActiveDeadlineSeconds": 3600, "maxActiveDeadlineSeconds": 86400},
    kueue={"clusterQueues": ["team-a-gpus", "team-a-batch"]},
    maxRunningJobs=3,
)
DIGEST = "@sha256:" + "a" * 64


def searching(parallelism, **resources):
    """A search of `parallelism` trials at once, each with these resources."""
    return {"resources": {"nodePool": "a100", **resources}, "evaluation": {"everySteps": 5},
            "search": {"parameters": {"learningRate": {"values": [1e-4, 3e-4]}}, "trials": 8,
                       "parallelism": parallelism}}


def spec_under_policy(**overrides):
    raw = apply_schema_defaults(minimal_spec(**{"resources": {"nodePool": "a100", "gpusPerWorker": 8}, **overrides}),
                                SPEC_SCHEMA)
    return tenancy.with_policy_defaults(parse_spec(raw), policy(**GOVERNING), CFG)


@pytest.mark.parametrize("overrides, field, limit", [
    ({"resources": {"nodePool": "cpu", "gpusPerWorker": 0}}, "spec.resources.nodePool", "allowed pools: a100, local"),
    ({"image": "docker.io/evil/trainer:1"}, "spec.image", "allowed: registry.team-a.example/"),
    ({"image": "registry.team-a.example/trainer:1"}, "spec.image", "requireDigest: true"),
    ({"runPolicy": {"priorityClassName": "system-cluster-critical"}}, "spec.runPolicy.priorityClassName",
     "allowed: training-low, training-high"),
    ({"model": {"uri": "s3://team-b/models/base/"}}, "spec.model.uri", "storage.modelURIs: s3://models/*"),
    ({"datasets": [{"uri": "s3://team-b/data/x.jsonl", "format": "chat"}]}, "spec.datasets[0].uri",
     "storage.datasetURIs: s3://team-a/data/"),
    ({"output": {"uri": "s3://shared/models/x/"}}, "spec.output.uri", "storage.outputURIs"),
    ({"checkpoint": {"uri": "s3://team-b/ckpt/"}}, "spec.checkpoint.uri", "storage.checkpointURIs"),
    ({"method": {"type": "lora", "adapter": {"uri": "s3://team-b/adapters/x/"}}}, "spec.method.adapter.uri",
     "storage.modelURIs: s3://models/*"),
    ({"datasets": [], "method": {"type": "full"}, "evaluation": {
        "only": True, "candidateModel": {"uri": "s3://team-b/models/merged/"},
        "general": {"uri": "s3://team-a/data/general.jsonl"}}},
     "spec.evaluation.candidateModel.uri", "storage.modelURIs: s3://models/*"),
    ({"output": {"uri": "s3://team-a/models/x/", "combine": {"adapters": [{"uri": "s3://team-b/adapters/y/"}]}}},
     "spec.output.combine.adapters[0].uri", "storage.modelURIs: s3://models/*"),
    ({"preprocessing": {"contentFilters": [{"name": "t", "type": "terms", "termsUri": "s3://team-b/terms.txt"}]}},
     "spec.preprocessing.contentFilters[0].termsUri", "storage.datasetURIs: s3://team-a/data/"),
    ({"preprocessing": {"contentFilters": [{"name": "c", "type": "classifier", "modelUri": "s3://team-b/tox/",
                                            "label": "toxic"}]}},
     "spec.preprocessing.contentFilters[0].modelUri", "storage.modelURIs: s3://models/*"),
    ({"evaluation": {"tasks": [{"name": "qa", "uri": "s3://team-b/eval/qa.jsonl"}]}}, "spec.evaluation.tasks[0].uri",
     "storage.datasetURIs: s3://team-a/data/"),
    ({"evaluation": {"general": {"uri": "s3://team-b/eval/general.jsonl"}}}, "spec.evaluation.general.uri",
     "storage.datasetURIs: s3://team-a/data/"),
    ({"resources": {"nodePool": "a100", "workers": 5, "gpusPerWorker": 1}}, "spec.resources.workers",
     "limits.maxWorkers: 4"),
    ({"resources": {"nodePool": "a100", "workers": 1, "gpusPerWorker": 12}}, "spec.resources.gpusPerWorker",
     "limits.maxGPUsPerWorker: 8"),
    ({"resources": {"nodePool": "a100", "workers": 3, "gpusPerWorker": 8}}, "spec.resources",
     "limits.maxGPUsPerJob: 16"),
    ({"resources": {"nodePool": "a100", "cpu": "32"}}, "spec.resources.cpu", "limits.maxCPUPerWorker: 16"),
    ({"resources": {"nodePool": "a100", "memory": "256Gi"}}, "spec.resources.memory", "limits.maxMemoryPerWorker: 128Gi"),
    ({"runPolicy": {"activeDeadlineSeconds": 172800}}, "spec.runPolicy.activeDeadlineSeconds",
     "limits.maxActiveDeadlineSeconds: 86400"),
    ({"runPolicy": {"queueName": "team-b-gpus"}}, "spec.runPolicy.queueName", "kueue.clusterQueues: team-a-gpus, team-a-batch"),
    # a search runs search.parallelism trials at once: its ceilings are what they use together
    (searching(3, workers=1, gpusPerWorker=8), "spec.search.parallelism",
     "3 trials at once of 8 GPUs each (24 GPUs) is above the limit (TenantPolicy team-a: limits.maxGPUsPerJob: 16)"),
    (searching(3, workers=2, gpusPerWorker=1), "spec.search.parallelism",
     "3 trials at once of 2 pods each (6 pods) is above the limit (TenantPolicy team-a: limits.maxWorkers: 4)"),
    (searching(4, workers=1, gpusPerWorker=2), "spec.search.parallelism",
     "4 trials at once count as 4 running jobs (TenantPolicy team-a: maxRunningJobs: 3)"),
])
def test_each_policy_field_is_enforced_with_field_limit_and_policy_named(overrides, field, limit):
    problems = tenancy.check_policy(spec_under_policy(**overrides), policy(**GOVERNING))
    assert len(problems) == 1, problems
    assert problems[0].reason == "PolicyViolation"
    message = problems[0].message
    assert message.startswith(field + ":") and limit in message and "TenantPolicy team-a" in message, message


def test_a_job_within_the_policy_passes_and_gets_its_defaults():
    spec = spec_under_policy(datasets=[{"uri": "s3://team-a/data/sub/x.jsonl", "format": "chat"}],
                             image="registry.team-a.example/trainer" + DIGEST)
    assert tenancy.check_policy(spec, policy(**GOVERNING)) == []
    assert spec.runPolicy.priorityClassName == "training-low"
    assert spec.runPolicy.activeDeadlineSeconds == 3600
    assert spec.runPolicy.queueName == "team-a-gpus"


def test_a_maximum_deadline_requires_one():
    p = policy(limits={"maxActiveDeadlineSeconds": 600})
    spec = tenancy.with_policy_defaults(parse_spec(apply_schema_defaults(minimal_spec(), SPEC_SCHEMA)), p, CFG)
    [problem] = tenancy.check_policy(spec, p)
    assert "a deadline is required" in problem.message


@pytest.mark.parametrize("pools, job_pool, effective", [
    ([], "", "cpu"),                # the operator's default pool (dev.yaml: cpu)
    (["local", "a100"], "", "local"),  # the operator's default is not allowed: the policy's first pool
    (["a100", "cpu"], "", "cpu"),   # the operator's default is allowed
    (["local"], "cpu", "cpu"),      # named by the job: kept (and refused by check_pool)
])
def test_default_node_pool(pools, job_pool, effective):
    raw = apply_schema_defaults(minimal_spec(resources={"nodePool": job_pool, "gpusPerWorker": 0}), SPEC_SCHEMA)
    spec = tenancy.with_policy_defaults(parse_spec(raw), policy(nodePools=pools), CFG)
    assert spec.resources.nodePool == effective


@pytest.mark.parametrize("operator_wide, policy_requires, effective", [
    (False, False, False),
    (False, True, True),   # a policy can add the requirement
    (True, False, True),   # ... but not lift the operator's
    (True, True, True),
])
def test_a_policy_can_only_tighten_the_image_digest_requirement(operator_wide, policy_requires, effective):
    cfg = CFG.model_copy(update={"requireImageDigest": operator_wide})
    p = policy(images={"registries": ["registry.team-a.example/"], "requireDigest": policy_requires})
    assert tenancy.effective_config(cfg, p).requireImageDigest is effective


@pytest.mark.parametrize("pattern, uri, matches", [
    ("s3://team-a/data/", "s3://team-a/data/a/b.jsonl", True),
    ("s3://team-a/data/", "s3://team-a/database.jsonl", False),
    ("s3://team-a-*/data/*", "s3://team-a-prod/data/x", True),
    ("s3://team-a-*/data/*", "s3://team-a-prod/other/data/x", False),
    ("s3://models/*", "s3://models/smollm2/", True),
    ("s3://models/base.bin", "s3://models/base.bin.evil", False),
])
def test_uri_patterns(pattern, uri, matches):
    assert bool(tenancy.uri_pattern(pattern).match(uri)) is matches


# ---- validation under a policy -------------------------------------------------------------------


def facts_for(p):
    return Facts(secret_found=True, secret_keys=frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}),
                 secret_opted_in=True, policy=p)


@pytest.mark.parametrize("overrides, facts, reasons", [
    ({}, Facts(policy_problem=tenancy.Problem("AmbiguousTenantPolicy", "x")), ["AmbiguousTenantPolicy"]),
    ({"image": "registry.team-a.example/t" + DIGEST}, facts_for(policy(**GOVERNING)), []),
    # the operator-wide lists (empty in dev.yaml) are replaced by the policy's
    ({"image": "registry.team-a.example/t" + DIGEST}, Facts(secret_found=True, secret_opted_in=True,
                                                            secret_keys=frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})),
     ["ImageNotAllowed"]),
    ({"storage": {"endpoint": "http://s3.team-b.example:9000", "region": "us-east-1"}}, facts_for(policy(**GOVERNING)),
     ["PolicyViolation"]),
    ({"runPolicy": {"queueName": "someone-elses"}}, facts_for(None), ["QueueNotAllowed"]),
])
def test_validate_under_a_policy(overrides, facts, reasons):
    raw = apply_schema_defaults(minimal_spec(**{"resources": {"nodePool": "a100", "gpusPerWorker": 8},
                                                "datasets": [{"uri": "s3://team-a/data/x.jsonl", "format": "chat"}],
                                                **overrides}), SPEC_SCHEMA)
    _, problems = validate(raw, CFG, facts)
    assert [p.reason for p in problems] == reasons, problems


def _example(relative):
    return [doc for doc in yaml.safe_load_all((EXAMPLES / relative).read_text()) if doc]


def test_the_example_team_a_job_meets_the_example_team_a_policy():
    """examples/tenants/team-a-job.yaml, in namespace team-a, under the TenantPolicies of
    examples/tenants/platform.yaml: governed by team-a, valid, and given the defaults its comments name."""
    platform = _example("tenants/platform.yaml")
    labels = {d["metadata"]["name"]: d["metadata"].get("labels") or {} for d in platform if d["kind"] == "Namespace"}
    policies = {d["metadata"]["name"]: tenancy.Policy.from_body(d) for d in platform if d["kind"] == "TenantPolicy"}
    assert set(policies) == {"team-a", "team-b"} and all(p.spec for p in policies.values()), policies
    governing, problem = tenancy.policy_of("team-a", tenancy.Tenancy(policies=list(policies.values()),
                                                                     namespace_labels=labels), require=True)
    assert problem is None and governing.name == "team-a"

    example = {d["kind"]: d for d in _example("tenants/team-a-job.yaml")}
    secret = example["Secret"]
    raw = apply_schema_defaults(example["FineTuneJob"]["spec"], SPEC_SCHEMA)

    def facts(p):
        return Facts(secret_found=True, secret_keys=frozenset(secret["stringData"]), policy=p,
                     secret_opted_in=(secret["metadata"].get("labels") or {}).get(CREDENTIALS_OPT_IN_LABEL) == "true")

    spec, problems = validate(raw, CFG, facts(governing))
    assert problems == [], problems
    run = spec.runPolicy
    assert (run.queueName, run.priorityClassName, run.activeDeadlineSeconds) == ("team-a", "training-low", 86400)
    # the same job under team-b's policy is refused: team-a's bucket is not team-b's
    _, elsewhere = validate(raw, CFG, facts(policies["team-b"]))
    assert elsewhere and {p.reason for p in elsewhere} == {"PolicyViolation"}, elsewhere


def test_a_policy_endpoint_is_still_refused_when_it_leads_to_metadata():
    p = policy(storage={"endpoints": ["http://169.254.169.254:9000"]})
    raw = apply_schema_defaults(minimal_spec(storage={"endpoint": "http://169.254.169.254:9000", "region": "us-east-1"},
                                             resources={"nodePool": "a100"}), SPEC_SCHEMA)
    _, problems = validate(raw, CFG, facts_for(p))
    assert problems and all(pr.reason != "PolicyViolation" for pr in problems), problems


# ---- may a run start -----------------------------------------------------------------------------


def test_budget_exhausted_holds_new_runs():
    p = policy(budget={"gpuHours": 10}, status={"usage": {"budgetExhausted": True, "gpuHours": 10.2}})
    hold = tenancy.start_hold(summary("j"), p, snapshot(p))
    assert hold.reason == "BudgetExhausted" and "10.2 of its 10 GPU-hours this month" in hold.message


@pytest.mark.parametrize("others, me, held", [
    ([summary("a", started=True)], summary("new", created="2026-03-18T11:00:00Z"), False),
    ([summary("a", started=True), summary("b", started=True)], summary("new", created="2026-03-18T11:00:00Z"), True),
    ([summary("a", started=True), summary("b", started=True, finished=True)], summary("new"), False),
    # an older waiting job goes first; a newer one waits behind it
    ([summary("a", started=True), summary("old", created="2026-03-18T09:00:00Z")], summary("new"), True),
    ([summary("a", started=True), summary("newer", created="2026-03-18T11:00:00Z")], summary("new"), False),
    # an older job that is not valid holds no slot
    ([summary("a", started=True), summary("old", created="2026-03-18T09:00:00Z", validated=False)], summary("new"), False),
    # jobs of other tenants do not count
    ([summary("x", namespace="team-b", started=True), summary("y", namespace="team-b", started=True)], summary("new"), False),
    # namespaces of the same tenant count together
    ([summary("a", started=True), summary("b", namespace="team-a-dev", started=True)], summary("new"), True),
    # a search counts as the trials it runs at once
    ([summary("s", started=True, slots=2)], summary("new"), True),
    ([], summary("new", slots=2), False),
    ([summary("a", started=True)], summary("new", slots=2), True),
    ([summary("old", created="2026-03-18T09:00:00Z", slots=2)], summary("new"), True),
])
def test_running_job_limit(others, me, held):
    p = policy(maxRunningJobs=2)
    hold = tenancy.start_hold(me, p, snapshot(p, jobs=[*others, me]))
    assert (hold is not None) is held
    if held:
        assert hold.reason == "RunningJobLimit" and "allows 2 running job(s)" in hold.message


# ---- the policy's status and its GPU-hour ledger -------------------------------------------------


def test_status_counts_jobs_gpus_and_usage():
    p = policy(budget={"gpuHours": 1, "period": "Week"})
    jobs = [summary("a", phase="Running", started=True, gpus_running=8, gpu_seconds=1800),
            summary("b", phase="Queued", started=True),  # its run waits in Kueue: a running job, no GPUs
            summary("c", phase="Succeeded", started=True, finished=True, gpu_seconds=1000),
            summary("x", namespace="team-b", phase="Running", started=True, gpus_running=8, gpu_seconds=99999)]
    status, added = tenancy.policy_status(p, snapshot(p, jobs=jobs), NOW)
    assert status["namespaces"] == ["team-a", "team-a-dev"]
    assert status["jobs"]["Running"] == 1 and status["jobs"]["Queued"] == 1 and status["jobs"]["Succeeded"] == 1
    assert status["runningJobs"] == 2 and status["gpusInUse"] == 8
    assert added == 2800 and status["usage"]["gpuSeconds"] == 2800 and status["usage"]["gpuHours"] == 0.778
    assert status["usage"]["periodStart"] == "2026-03-16T00:00:00Z"  # Monday
    assert status["usage"]["budgetExhausted"] is False
    assert status["conditions"][0]["status"] == "True" and status["observedGeneration"] == 3


def test_usage_counts_each_second_once_and_survives_job_deletion():
    p = policy(budget={"gpuHours": 1})
    first, added1 = tenancy.policy_status(p, snapshot(p, jobs=[summary("a", started=True, gpu_seconds=1000)]), NOW)
    p = policy(budget={"gpuHours": 1}, status=first)
    second, added2 = tenancy.policy_status(p, snapshot(p, jobs=[summary("a", started=True, gpu_seconds=3000)]), NOW)
    assert (added1, added2, second["usage"]["gpuSeconds"]) == (1000, 2000, 3000)
    p = policy(budget={"gpuHours": 1}, status=second)
    third, added3 = tenancy.policy_status(p, snapshot(p, jobs=[]), NOW)  # the job was deleted
    assert added3 == 0 and third["usage"]["gpuSeconds"] == 3000 and third["usage"]["accounted"] == []
    assert third["usage"]["budgetExhausted"] is False
    p = policy(budget={"gpuHours": 1}, status=third)
    fourth, _ = tenancy.policy_status(p, snapshot(p, jobs=[summary("b", started=True, gpu_seconds=700)]), NOW)
    assert fourth["usage"]["gpuSeconds"] == 3700 and fourth["usage"]["budgetExhausted"] is True


def test_a_new_run_of_a_job_is_counted_from_zero():
    p = policy(status={"usage": {"periodStart": "2026-03-01T00:00:00Z", "gpuSeconds": 500,
                                 "accounted": [{"uid": "uid-team-a-a", "runId": "1", "gpuSeconds": 500}]}})
    status, added = tenancy.policy_status(p, snapshot(p, jobs=[summary("a", run_id="2", gpu_seconds=100)]), NOW)
    assert added == 100 and status["usage"]["gpuSeconds"] == 600


def test_a_new_period_starts_from_zero_without_recounting():
    p = policy(budget={"gpuHours": 1, "period": "Day"},
               status={"usage": {"periodStart": "2026-03-17T00:00:00Z", "gpuSeconds": 3600, "budgetExhausted": True,
                                 "accounted": [{"uid": "uid-team-a-a", "runId": "1", "gpuSeconds": 3600}]}})
    status, added = tenancy.policy_status(p, snapshot(p, jobs=[summary("a", gpu_seconds=3900)]), NOW)
    assert status["usage"]["periodStart"] == "2026-03-18T00:00:00Z"
    assert added == 300 and status["usage"]["gpuSeconds"] == 300 and status["usage"]["budgetExhausted"] is False


def test_overlapping_policies_are_not_ready():
    a, b = policy("team-a"), policy("team-a-too")
    status, _ = tenancy.policy_status(a, snapshot(a, b), NOW)
    assert status["conditions"][0]["reason"] == "AmbiguousTenantPolicy" and "team-a-too" in status["conditions"][0]["message"]


@pytest.mark.parametrize("period, start, end", [
    ("Day", "2026-03-18", "2026-03-19"), ("Week", "2026-03-16", "2026-03-23"), ("Month", "2026-03-01", "2026-04-01"),
])
def test_periods(period, start, end):
    begin = tenancy.period_start(NOW, period)
    assert begin.date().isoformat() == start and tenancy.period_end(begin, period).date().isoformat() == end


def test_running_jobs_count_a_search_as_its_parallelism():
    p = policy()
    jobs = [summary("a", phase="Running", started=True), summary("s", phase="Running", started=True, slots=4),
            summary("w", slots=4), summary("done", phase="Succeeded", started=True, finished=True, slots=4)]
    status, _ = tenancy.policy_status(p, snapshot(p, jobs=jobs), NOW)
    assert status["runningJobs"] == 5


def test_job_summary_from_a_stored_job():
    body = {"metadata": {"namespace": "team-a", "name": "j", "uid": "u", "creationTimestamp": "t"},
            "spec": {"runId": "2", "resources": {"workers": 2, "gpusPerWorker": 4}},
            "status": {"runId": "2", "phase": "Running", "pytorchJob": "train-2", "gpuSeconds": 12.5,
                       "conditions": [{"type": "Validated", "status": "True"}]}}
    s = tenancy.job_summary(body)
    assert (s.gpus_running, s.started, s.finished, s.validated, s.gpu_seconds, s.active) == (8, True, False, True, 12.5, True)
    assert s.slots == 1
    assert tenancy.job_summary({**body, "spec": {**body["spec"], "search": {"parallelism": 3}}}).slots == 3
    body["spec"]["runId"] = "3"  # a new run: the old run's status does not count
    s = tenancy.job_summary(body)
    assert (s.started, s.gpu_seconds) == (False, 0.0)


def stored(phase, search_trials=None, run_id="2", conditions=()):
    """A stored job of 2 workers x 4 GPUs in this phase; a search of 4 at once with these trial phases."""
    spec = {"runId": "2", "resources": {"workers": 2, "gpusPerWorker": 4}}
    status = {"runId": run_id, "phase": phase, "pytorchJob": "train-2",
              "conditions": [{"type": c, "status": "True"} for c in conditions]}
    if search_trials is not None:
        spec["search"] = {"parallelism": 4}
        status = {**status, "pytorchJob": None, "search": {"trials": [{"number": i, "phase": t}
                                                                      for i, t in enumerate(search_trials)]}}
    return {"metadata": {"namespace": "team-a", "name": "j", "uid": "u"}, "spec": spec, "status": status}


@pytest.mark.parametrize("body, gpus", [
    (stored("Running"), 8),
    (stored("Stalled"), 8),  # its pods still hold their GPUs
    (stored("Queued"), 0),  # waiting in Kueue, or preempted by it
    (stored("Suspended"), 0),
    (stored("Pending"), 0),  # a pod the scheduler cannot place
    (stored("Succeeded", conditions=["Succeeded"]), 0),
    (stored("Running", run_id="1"), 0),  # the status is of another run
    (stored("Running", ["Running", "Running", "Pending", "Succeeded", "Pruned"]), 16),  # a search: its running trials
    (stored("Suspended", ["Running", "Running"]), 0),
], ids=["running", "stalled", "queued", "suspended", "unschedulable", "finished", "old-run", "search",
        "suspended-search"])
def test_gpus_in_use_are_those_of_running_pods(body, gpus):
    assert tenancy.job_summary(body).gpus_running == gpus


def test_policy_spec_rules():
    with pytest.raises(Exception):
        parse_policy_spec({"namespaceSelector": SELECT_A, "kueue": {"clusterQueues": []}})


def test_tenant_metrics_follow_the_policies():
    from finetune_operator.metrics import Metrics

    m = Metrics()
    status = {"jobs": {"Running": 2, "Queued": 1}, "runningJobs": 2, "gpusInUse": 16, "usage": {"gpuSeconds": 7200}}
    m.observe_tenant("team-a", status, 3600, 10)
    m.observe_tenant("team-a", status, 1800, 10)
    m.observe_tenant("team-b", status, 0, None)
    value = m.registry.get_sample_value
    assert value("finetune_tenant_gpu_seconds_total", {"policy": "team-a"}) == 5400
    assert value("finetune_tenant_gpu_hours_used", {"policy": "team-a"}) == 2
    assert value("finetune_tenant_gpu_hours_budget", {"policy": "team-a"}) == 10
    assert value("finetune_tenant_gpu_hours_budget", {"policy": "team-b"}) is None
    assert value("finetune_tenant_jobs", {"policy": "team-a", "phase": "Queued"}) == 1
    assert value("finetune_tenant_gpus_in_use", {"policy": "team-b"}) == 16
    m.retain_tenants({"team-b"})
    assert value("finetune_tenant_gpus_in_use", {"policy": "team-a"}) is None
    assert value("finetune_tenant_jobs", {"policy": "team-a", "phase": "Running"}) is None
    assert value("finetune_tenant_gpus_in_use", {"policy": "team-b"}) == 16


# ---- the operator's defaultLimits: jobs no TenantPolicy governs ---------------------------------------

DEFAULT_LIMITS = CFG.model_copy(update={"defaultLimits": tenancy.PolicyLimits(
    maxWorkers=4, maxGPUsPerJob=8, maxMemoryPerWorker="64Gi", defaultActiveDeadlineSeconds=3600,
    maxActiveDeadlineSeconds=86400)})
CPU_POOL = {"nodePool": "cpu", "gpusPerWorker": 0}


@pytest.mark.parametrize("what, overrides, facts, problems", [
    ("within every limit", {"resources": {**CPU_POOL, "workers": 4}}, None, []),
    ("too many workers", {"resources": {**CPU_POOL, "workers": 5}}, None,
     [("LimitExceeded", "spec.resources.workers: 5 is above the limit (the operator's defaultLimits: limits.maxWorkers: 4)")]),
    ("too many GPUs in all", {"resources": {"nodePool": "a100", "workers": 2, "gpusPerWorker": 8}}, None,
     [("LimitExceeded", "spec.resources: 16 GPUs in all (workers x gpusPerWorker) is above the limit "
                        "(the operator's defaultLimits: limits.maxGPUsPerJob: 8)")]),
    ("too much memory", {"resources": {**CPU_POOL, "memory": "65Gi"}}, None,
     [("LimitExceeded", "spec.resources.memory: 65Gi is above the limit (the operator's defaultLimits: "
                        "limits.maxMemoryPerWorker: 64Gi)")]),
    ("a search using too many GPUs at once", searching(2, workers=1, gpusPerWorker=8), None,
     [("LimitExceeded", "spec.search.parallelism: 2 trials at once of 8 GPUs each (16 GPUs) is above the limit "
                        "(the operator's defaultLimits: limits.maxGPUsPerJob: 8)")]),
    ("a deadline beyond the longest", {"resources": CPU_POOL, "runPolicy": {"activeDeadlineSeconds": 86401}}, None,
     [("LimitExceeded", "spec.runPolicy.activeDeadlineSeconds: 86401 is above the limit (the operator's defaultLimits: "
                        "limits.maxActiveDeadlineSeconds: 86400)")]),
    ("a governed job meets its policy's limits instead", {"resources": {**CPU_POOL, "workers": 5}},
     "policy", []),
])
def test_a_job_no_policy_governs_meets_the_operators_default_limits(what, overrides, facts, problems):
    facts = facts_for(policy(limits={"maxWorkers": 8})) if facts == "policy" else facts_for(None)
    _, found = validate(minimal_spec(**overrides), DEFAULT_LIMITS, facts)
    assert [(p.reason, p.message) for p in found] == problems


def test_a_job_no_policy_governs_gets_the_default_deadline():
    spec, found = validate(minimal_spec(resources=CPU_POOL), DEFAULT_LIMITS, facts_for(None))
    assert not found and spec.runPolicy.activeDeadlineSeconds == 3600
    own, _ = validate(minimal_spec(resources=CPU_POOL, runPolicy={"activeDeadlineSeconds": 60}), DEFAULT_LIMITS,
                      facts_for(None))
    assert own.runPolicy.activeDeadlineSeconds == 60


def test_a_default_deadline_beyond_the_longest_is_a_configuration_error():
    with pytest.raises(ValueError, match="defaultActiveDeadlineSeconds must not exceed"):
        OperatorConfig.model_validate({**CFG.model_dump(), "defaultLimits": {"defaultActiveDeadlineSeconds": 10,
                                                                             "maxActiveDeadlineSeconds": 5}})
