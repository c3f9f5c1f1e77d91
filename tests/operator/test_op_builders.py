"""Pure builders: golden YAML of whole objects, plus table tests of names and sizing.

Regenerate the golden files with `UPDATE_GOLDEN=1 make test-operator` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from finetune_operator.builders import JobRef, names, run_objects, sandbox_objects, spec_hash
from finetune_operator.quantity import multiply
from finetune_operator.config import OperatorConfig
from finetune_trainer.config import TrainerConfig
from op_testdata import ROOT, job, minimal_spec

GOLDEN = Path(__file__).parent / "golden"
CFG = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml")
SECRET = {"AWS_ACCESS_KEY_ID": "ZmluZXR1bmUtbG9jYWw=", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0", "unrelated": "eA=="}


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # a shared sub-object must show up in full, as the API server sees it
        return True


def _str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(objects) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=120)


CASES = {
    "lora-a100-deepspeed": job(minimal_spec(
        runId="7",
        datasets=[{"uri": "s3://team-a/data/support.jsonl", "format": "chat", "weight": 0.8},
                  {"uri": "s3://team-a/data/faq.jsonl", "format": "instruction", "weight": 0.2}],
        method={"type": "lora", "lora": {"rank": 16, "alpha": 32, "targetModules": ["q_proj", "v_proj"]}},
        resources={"workers": 2, "gpusPerWorker": 8, "nodePool": "a100", "cpu": "8", "memory": "64Gi"},
        distributed={"engine": "deepspeed", "zeroStage": 3, "precision": "bf16"},
        output={"uri": "s3://team-a/models/support-bot/", "merge": True},
        runPolicy={"backoffLimit": 5, "activeDeadlineSeconds": 86400, "queueName": "team-a-gpus",
                   "priorityClassName": "training-low"},
    )),
    "cpu-single-worker": job(minimal_spec(resources={"workers": 1, "gpusPerWorker": 0, "nodePool": "cpu",
                                                     "cpu": "500m", "memory": "2Gi"},
                                          storage={"endpoint": "https://s3.example.com:8443", "region": "eu-west-1"},
                                          image="registry.example.com/trainer:1.2.3"),
                             name="tiny", namespace="team-b"),
    "long-name-suspended": job(minimal_spec(
        method={"type": "qlora"}, resources={"workers": 3, "gpusPerWorker": 4, "nodePool": "a100"},
        runPolicy={"suspend": True}),
        name="a-very-long-fine-tune-job-name-that-does-not-fit-into-a-label", namespace="research-platform-team"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case):
    ref = JobRef.from_body(CASES[case])
    text = render(sandbox_objects(ref, CFG, SECRET) + run_objects(ref, CFG))
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing {path}: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path} differs: rerun with UPDATE_GOLDEN=1 and review the diff"


@pytest.mark.parametrize("case", sorted(CASES))
def test_objects_share_no_mutable_parts(case):
    ref = JobRef.from_body(CASES[case])
    objects = sandbox_objects(ref, CFG, SECRET) + run_objects(ref, CFG)
    seen: dict[int, str] = {}

    def walk(node, path):
        if isinstance(node, (dict, list)):
            assert id(node) not in seen, f"{path} is the same object as {seen.get(id(node))}"
            seen[id(node)] = path
            for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
                walk(value, f"{path}.{key}")

    for i, obj in enumerate(objects):
        walk(obj, f"{obj['kind']}[{i}]")


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_object_lives_in_the_sandbox_and_is_labelled(case):
    ref = JobRef.from_body(CASES[case])
    objects = sandbox_objects(ref, CFG, SECRET) + run_objects(ref, CFG)
    sandbox = objects[0]["metadata"]["name"]
    assert objects[0]["kind"] == "Namespace" and len(sandbox) <= 63
    for obj in objects[1:]:
        assert obj["metadata"]["namespace"] == sandbox
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels[names.LABEL_TENANT] == ref.namespace and labels[names.LABEL_JOB_UID] == ref.uid
        assert all(len(v) <= 63 for v in labels.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_pods_meet_the_restricted_pod_security_standard(case):
    ref = JobRef.from_body(CASES[case])
    ptj = run_objects(ref, CFG)[1]
    for replica in ptj["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            assert c["resources"]["requests"] == c["resources"]["limits"]
        assert not any("hostPath" in v for v in pod["volumes"])


@pytest.mark.parametrize("workers,expected", [(1, {"Master": 1}), (2, {"Master": 1, "Worker": 1}), (8, {"Master": 1, "Worker": 7})])
def test_replicas(workers, expected):
    ref = JobRef.from_body(job(minimal_spec(resources={"workers": workers, "gpusPerWorker": 0})))
    specs = run_objects(ref, CFG)[1]["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == expected


def test_config_map_holds_a_trainer_config_the_trainer_can_read():
    ref = JobRef.from_body(CASES["lora-a100-deepspeed"])
    cm = run_objects(ref, CFG)[0]
    config = TrainerConfig.from_json(cm["data"][names.CONFIG_KEY])
    assert config.job.runId == "7" and config.job.namespace == "team-a"
    assert config.storage.endpoint == CFG.s3Endpoint  # empty in the spec: the operator's default
    assert config.distributed.zeroStage == 3 and len(config.datasets) == 2


def test_secret_copies_only_aws_keys():
    ref = JobRef.from_body(job())
    secret = sandbox_objects(ref, CFG, {**SECRET, "AWS_SESSION_TOKEN": "dA=="})[-1]
    assert sorted(secret["data"]) == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]


UID = "6f1c2a9e-1b7d-4e55-9a4e-0c8d2b7f3a11"


@pytest.mark.parametrize("tenant,name,readable", [
    ("team-a", "support-bot", "ftj-team-a-support-bot-"),
    ("team-a", "v1.2", "ftj-team-a-v1-2-"),
    ("t" * 30, "n" * 40, "ftj-" + "t" * 30 + "-" + "n" * 17 + "-"),
])
def test_sandbox_namespace_name(tenant, name, readable):
    got = names.sandbox_namespace("ftj", tenant, name, UID)
    assert len(got) <= 63 and got == names.dns_label(got) and not got.endswith("-")
    assert got.startswith(readable) and len(got) == len(readable) + names.SANDBOX_ID_LENGTH
    assert got == names.sandbox_namespace("ftj", tenant, name, UID)  # stable


@pytest.mark.parametrize("a, b", [
    (("x-b", "c", "uid-1"), ("x", "b-c", "uid-2")),          # tenant and name join to the same string
    (("team-a", "job", "uid-1"), ("team-a", "job", "uid-2")),  # a job deleted and made again
    (("t" * 40, "n" * 40 + "a", "uid-1"), ("t" * 40, "n" * 40 + "b", "uid-2")),  # cut to the same prefix
])
def test_sandbox_names_are_unique_per_job(a, b):
    assert names.sandbox_namespace("ftj", *a) != names.sandbox_namespace("ftj", *b)


@pytest.mark.parametrize("quantity,factor,expected", [
    ("64Gi", 2, "128Gi"), ("500m", 3, "1500m"), ("1.5", 2, "3"), ("0.25", 3, "0.75"), (8, 4, "32"), ("1e3", 2, "2e3"),
])
def test_quantity_multiply(quantity, factor, expected):
    assert multiply(quantity, factor) == expected


@pytest.mark.parametrize("change,same_run", [
    ({"runPolicy": {"suspend": True}}, True),
    ({"runPolicy": {"ttlSecondsAfterFinished": 60}}, True),
    ({"hyperparameters": {"epochs": 2}}, False),
    ({"runPolicy": {"backoffLimit": 9}}, False),
])
def test_spec_hash_ignores_only_live_fields(change, same_run):
    base = job()["spec"]
    changed = json.loads(json.dumps(base))
    for section, fields in change.items():
        changed[section] = {**changed.get(section, {}), **fields}
    assert (spec_hash(base) == spec_hash(changed)) == same_run


@pytest.mark.parametrize("run_policy,expected", [
    ({}, False),
    ({"suspend": True}, True),
    ({"queueName": "q"}, None),  # left to Kueue, which suspends until admission
    ({"queueName": "q", "suspend": True}, None),  # the user's suspend deactivates the Workload instead
])
def test_suspend_ownership(run_policy, expected):
    ptj = run_objects(JobRef.from_body(job(minimal_spec(runPolicy=run_policy))), CFG)[1]
    assert ptj["spec"]["runPolicy"].get("suspend") == expected


def test_a_queued_run_is_created_suspended_and_its_pods_get_the_grace_period():
    from finetune_operator.builders.run import suspended_for_creation

    ref = JobRef.from_body(job(minimal_spec(runPolicy={"queueName": "q"},
                                            checkpoint={"everySteps": 5, "preemptionGraceSeconds": 300})))
    ptj = run_objects(ref, CFG)[1]
    created = suspended_for_creation(ptj)
    assert created["spec"]["runPolicy"]["suspend"] is True and "suspend" not in ptj["spec"]["runPolicy"]
    pod = ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert pod["terminationGracePeriodSeconds"] == 300 and env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "295"


def test_queue_label_and_priority_class():
    ref = JobRef.from_body(CASES["lora-a100-deepspeed"])
    ptj = run_objects(ref, CFG)[1]
    assert ptj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["priorityClassName"] == "training-low"
    plain = run_objects(JobRef.from_body(job()), CFG)[1]
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


def _made_before_the_annotation(ptj):
    ptj = json.loads(json.dumps(ptj))
    del ptj["metadata"]["annotations"][names.ANNOTATION_RUN_SETTINGS]
    return ptj


def _annotated(value):
    def edit(ptj):
        ptj = json.loads(json.dumps(ptj))
        ptj["metadata"]["annotations"][names.ANNOTATION_RUN_SETTINGS] = value
        return ptj
    return edit


LORA_SETTINGS = {"nodePool": "a100", "priorityClassName": "training-low", "activeDeadlineSeconds": 86400,
                 "queueName": "team-a-gpus"}


@pytest.mark.parametrize("case, edit, settings", [
    ("lora-a100-deepspeed", None, LORA_SETTINGS),
    ("cpu-single-worker", None, {"nodePool": "cpu", "priorityClassName": "", "activeDeadlineSeconds": 0,
                                 "queueName": ""}),
    # made by an operator before the annotation: what the object says (its node pool is not known)
    ("lora-a100-deepspeed", _made_before_the_annotation, {k: v for k, v in LORA_SETTINGS.items() if k != "nodePool"}),
    ("cpu-single-worker", _made_before_the_annotation, {"priorityClassName": "", "activeDeadlineSeconds": 0,
                                                        "queueName": ""}),
    # a setting of the wrong type, or one unknown, is not taken
    ("lora-a100-deepspeed", _annotated('{"nodePool": 3, "queueName": "q", "image": "x"}'), {"queueName": "q"}),
], ids=["annotated", "annotated-no-queue", "older", "older-no-queue", "wrong-types"])
def test_a_run_records_the_settings_its_policy_filled_in(case, edit, settings):
    from finetune_operator.builders.run import recorded_settings

    ptj = run_objects(JobRef.from_body(CASES[case]), CFG)[1]
    assert recorded_settings(edit(ptj) if edit else ptj) == settings


@pytest.mark.parametrize("cidr, excepted", [
    ("0.0.0.0/0", ["169.254.0.0/16", "100.100.100.200/32", "168.63.129.16/32"]),
    ("::/0", ["fd00:ec2::254/128", "fd20:ce::254/128", "fe80::/10"]),
    ("168.0.0.0/8", ["168.63.129.16/32"]),
    ("100.64.0.0/10", ["100.100.100.200/32"]),
    ("10.0.0.0/8", None),
    ("10.244.0.1/32", None),
])
def test_s3_egress_excepts_the_metadata_ranges(cidr, excepted):
    from finetune_operator.builders.sandbox import s3_ip_block

    block = s3_ip_block(cidr)["ipBlock"]
    assert block["cidr"] == cidr and block.get("except") == excepted


@pytest.mark.parametrize("cidr, excepted", [
    ("0.0.0.0/0", ["169.254.0.0/16", "100.100.100.200/32", "168.63.129.16/32", "10.244.0.0/16", "10.96.0.0/12"]),
    ("10.0.0.0/8", ["10.244.0.0/16", "10.96.0.0/12"]),
    ("10.244.0.0/16", None),      # the platform's in-cluster S3, named on purpose
    ("10.244.3.7/32", None),
    ("::/0", ["fd00:ec2::254/128", "fd20:ce::254/128", "fe80::/10"]),
])
def test_s3_egress_excepts_the_cluster_ranges_around_it(cidr, excepted):
    from finetune_operator.builders.sandbox import s3_ip_block

    block = s3_ip_block(cidr, ["10.244.0.0/16", "10.96.0.0/12"])["ipBlock"]
    assert block.get("except") == excepted


def test_s3_egress_excepts_the_api_server_even_with_no_cluster_networks_configured():
    """The chart's defaults (0.0.0.0/0 on 443, clusterNetworks empty): the API server's own addresses,
    read at start, are excepted, so a sandbox cannot reach an API server that listens on 443."""
    import ipaddress

    from finetune_operator import endpoints

    chart_defaults = CFG.model_copy(update={"clusterNetworks": [],
                                            "s3Egress": CFG.s3Egress.model_copy(update={"cidrs": ["0.0.0.0/0", "::/0"]})})
    api_server = (ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("10.96.0.1"), ipaddress.ip_address("2001:db8::5"))
    cfg = endpoints.excepting_cluster(chart_defaults, api_server)
    allow = sandbox_objects(JobRef.from_body(job()), cfg, SECRET)[2]
    s3_rule = next(rule for rule in allow["spec"]["egress"] if any("ipBlock" in peer for peer in rule["to"]))
    excepts = {peer["ipBlock"]["cidr"]: peer["ipBlock"]["except"] for peer in s3_rule["to"]}
    assert {"10.0.0.5/32", "10.96.0.1/32"} <= set(excepts["0.0.0.0/0"]) and "169.254.0.0/16" in excepts["0.0.0.0/0"]
    assert "2001:db8::5/128" in excepts["::/0"]
    # and a wildcard endpoint resolving to the API server is refused with no cluster range configured
    wildcard = cfg.model_copy(update={"allowedS3Endpoints": ["http://*.objects.example.com:9000"]})
    problems = endpoints.check_endpoint("http://x.objects.example.com:9000", wildcard, (ipaddress.ip_address("10.0.0.5"),))
    assert [p.reason for p in problems] == ["EndpointAddressBlocked"]


def test_sandbox_dns_goes_to_the_cluster_dns_only():
    allow = sandbox_objects(JobRef.from_body(job()), CFG, SECRET)[2]
    dns = next(rule for rule in allow["spec"]["egress"] if any(p.get("port") == 53 for p in rule.get("ports", [])))
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
