"""The whole chain for real: FineTuneJob -> operator (installed by its chart) -> sandbox -> PyTorchJob
-> training-operator -> pods on the real node (containers of the trainer image) -> torchrun ->
trainer -> S3 -> status. Training is real (CPU, gloo)."""

from __future__ import annotations

import copy
import json
import os
import signal
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from e2e.localcluster import s3 as local_s3
from e2e.localcluster.paths import REPO_ROOT
from e2e.tests.test_control_plane import _wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

DEMO = REPO_ROOT / "examples" / "finetunejob-demo.yaml"


def _demo_documents() -> tuple[dict, dict]:
    secret, job = list(yaml.safe_load_all(DEMO.read_text()))
    return secret, job


def small_job(name: str, **spec_changes) -> tuple[dict, dict]:
    """The demo job made small enough for a test: fewer steps, frequent checkpoints."""
    secret, job = _demo_documents()
    job = copy.deepcopy(job)
    job["metadata"]["name"] = name
    spec = job["spec"]
    spec["hyperparameters"].update(maxSteps=12)
    spec["checkpoint"] = {"everySteps": 4, "keep": 2}
    spec["evaluation"] = {"compareToBase": True, "maxSamples": 24}
    # output.uri + runId identify a run (its checkpoints are resumed): every test run gets its own.
    spec["output"] = {"uri": f"s3://team-a/e2e/{name}-{uuid.uuid4().hex[:8]}/", "merge": False}
    for key, value in spec_changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return secret, job


def _status(kube, namespace, name) -> dict:
    return kube.get("finetunejob", name, namespace).get("status") or {}


def _wait_phase(kube, namespace, name, phases=("Succeeded", "Failed"), timeout=420) -> dict:
    return _wait_for(lambda: (s := _status(kube, namespace, name)).get("phase") in phases and s, timeout,
                     f"FineTuneJob {name} in {phases}", interval=2)


def _conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions") or []}


def _explain_failure(local_cluster, status: dict) -> str:
    sandbox = status.get("sandboxNamespace", "")
    logs = []
    if sandbox:
        pods = local_cluster.kubectl("get", "pods", "-n", sandbox, "-o", "name", check=False).stdout.split()
        for pod in pods:
            out = local_cluster.kubectl("logs", "-n", sandbox, pod, "--all-containers", "--tail=60", check=False)
            logs.append(f"--- {pod}\n{(out.stdout + out.stderr)[-2500:]}")
    return json.dumps(status.get("conditions"), indent=1) + "\n" + "\n".join(logs)


def _s3(local_cluster):
    return local_s3.client(local_cluster.s3_endpoint)


def _keys(local_cluster, uri: str) -> list[str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = _s3(local_cluster).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _download(local_cluster, uri: str, target: Path) -> Path:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    for key in _keys(local_cluster, uri):
        path = target / key[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        _s3(local_cluster).download_file(bucket, key, str(path))
    return target


def _prometheus(local_cluster, query: str) -> list[dict]:
    url = f"{local_cluster.prometheus_url}/api/v1/query?query={urllib.parse.quote(query)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]["result"]


def _pids_of_pod(local_cluster, namespace: str, pod: str) -> list[int]:
    """Host PIDs of the main processes of the pod's running containers on the real node."""
    return local_cluster.node_runtime.container_pids(namespace, pod)


HARDENING_PROBE = """
import json, os
report = {"uid": os.getuid(), "gid": os.getgid()}
try:
    open("/probe", "w")
    report["rootfs"] = "writable"
except OSError as exc:
    report["rootfs"] = exc.strerror
report["token"] = os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount")
shm = os.statvfs("/dev/shm")
report["shm"] = shm.f_blocks * shm.f_frsize
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
report.update({key: status[key].strip() for key in ("CapEff", "CapPrm", "NoNewPrivs", "Seccomp")})
print(json.dumps(report))
"""


def _assert_the_training_container_is_hardened(kube, operator, sandbox: str, pod: str, shared_memory: int) -> None:
    """What the kubelet made of the pod's security context, seen from inside the container."""
    out = kube.run("exec", "-n", sandbox, pod, "-c", "pytorch", "--", "python", "-c", HARDENING_PROBE).stdout
    report = json.loads(out)
    from finetune_operator.config import OperatorConfig

    run_as = OperatorConfig.model_validate(operator.config()).runAsUser
    assert (report["uid"], report["gid"]) == (run_as, run_as), report
    assert report["rootfs"] == "Read-only file system", report
    assert report["token"] is False, "a service-account token is mounted"
    assert report["shm"] == shared_memory, report
    assert report["CapEff"] == report["CapPrm"] == "0000000000000000", report
    assert report["NoNewPrivs"] == "1" and report["Seccomp"] == "2", report


def test_the_demo_job_trains_for_real_and_succeeds(kube, local_cluster, operator, namespace):
    secret, job = _demo_documents()
    job["spec"]["output"]["uri"] = f"s3://team-a/e2e/demo-{namespace}/"
    kube.apply(secret, job, namespace=namespace)
    name = job["metadata"]["name"]
    steps_seen: set[int] = set()
    prometheus_steps: set[float] = set()
    trainer_steps: set[float] = set()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = _status(kube, namespace, name)
        steps_seen.add((status.get("progress") or {}).get("step", 0))
        for sample in _prometheus(local_cluster, f'finetune_job_step{{namespace="{namespace}"}}'):
            prometheus_steps.add(float(sample["value"][1]))
        # The trainer's own metrics, scraped from rank 0 through the chart's PodMonitor, labelled like the job's.
        for sample in _prometheus(local_cluster, f'finetune_trainer_step{{namespace="{namespace}", name="{name}"}}'):
            trainer_steps.add(float(sample["value"][1]))
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(2)
    assert status.get("phase") == "Succeeded", _explain_failure(local_cluster, status)
    assert len(steps_seen - {0}) >= 2, f"progress did not advance in status: {steps_seen}"
    assert len(prometheus_steps - {0.0}) >= 1, f"no progress in Prometheus: {prometheus_steps}"
    assert len(trainer_steps - {0.0}) >= 2, f"the trainer's metrics did not advance in Prometheus: {trainer_steps}"
    for condition in ("Succeeded", "Ready"):
        wait = kube.run("wait", "-n", namespace, f"--for=condition={condition}", f"finetunejob/{name}", "--timeout=10s")
        assert "condition met" in wait.stdout

    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == job["spec"]["hyperparameters"]["maxSteps"]
    checkpoints = status["checkpoints"]
    assert [c["step"] for c in checkpoints] == [20, 40]
    for checkpoint in checkpoints:
        keys = _keys(local_cluster, checkpoint["uri"])
        assert any(k.endswith("manifest.json") for k in keys), keys
    evaluation = status["evaluation"]
    assert evaluation["perplexity"] < evaluation["basePerplexity"]
    # the task the demo declares, base against tuned; the forgetting check; the report next to the model
    [task] = evaluation["tasks"]
    assert (task["name"], task["metric"]) == ("helpdesk", "rougeL") and 0 <= task["base"] <= 1 and 0 <= task["tuned"] <= 1
    assert task["tuned"] > task["base"], task  # the tuned model answers the held-out help-desk questions better
    assert evaluation["headline"].startswith("helpdesk rougeL ")
    assert evaluation["generalBasePerplexity"] > 0 and evaluation["generalPerplexity"] > 0
    report_files = {k.rsplit("/", 1)[-1] for k in _keys(local_cluster, evaluation["reportUri"])}
    assert {"report.md", "report.html", "loss.png", "learning-rate.png"} <= report_files, report_files
    wide = kube.run("get", "finetunejob", name, "-n", namespace, "-o", "wide").stdout
    assert "helpdesk rougeL" in wide, wide
    # The data report: what curation did to each dataset, in the status and in `kubectl describe`.
    [stage] = status["data"]["stages"]
    datasets = stage["datasets"]
    assert [d["uri"] for d in datasets] == [d["uri"] for d in job["spec"]["datasets"]], datasets
    assert sum(d["rowsRead"] for d in datasets) == stage["rowsRead"] > 0, stage
    assert all(0 < d["rowsKept"] <= d["rowsRead"] for d in datasets), datasets
    assert sum(d["validationRows"] for d in datasets) > 0, datasets
    assert stage["validationOverlap"]["rowsChecked"] >= stage["validationSequences"] > 0, stage
    assert stage["trainTokens"] >= stage["targetTokens"] > 0, stage
    described = kube.run("describe", "finetunejob", name, "-n", namespace).stdout
    assert "Rows Read:" in described and "Validation Overlap:" in described, described
    query = f'finetune_job_task_score{{namespace="{namespace}", task="helpdesk"}}'
    _wait_for(lambda: {s["metric"]["model"] for s in _prometheus(local_cluster, query)} == {"base", "tuned"}, 90,
              "the task's base and tuned scores in Prometheus", interval=3)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base = _download(local_cluster, job["spec"]["model"]["uri"], Path(tmp, "base"))
        adapter = _download(local_cluster, status["output"]["adapterUri"], Path(tmp, "adapter"))
        merged = _download(local_cluster, status["output"]["mergedUri"], Path(tmp, "merged"))
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        merged_model = AutoModelForCausalLM.from_pretrained(merged)
        tokenizer = AutoTokenizer.from_pretrained(merged)
        import torch

        ids = tokenizer("Bucket acme-logs-1 returns error 404. Why?", return_tensors="pt").input_ids
        with torch.no_grad():
            a = tuned(ids).logits
            b = merged_model(ids).logits
        assert torch.allclose(a, b, atol=1e-3), "the merged model differs from base + adapter"


def test_a_killed_worker_restarts_and_the_trainer_resumes_from_its_checkpoint(kube, local_cluster, operator, namespace):
    secret, job = small_job("resume", hyperparameters={**_demo_documents()[1]["spec"]["hyperparameters"], "maxSteps": 40},
                            checkpoint={"everySteps": 5, "keep": 2})
    kube.apply(secret, job, namespace=namespace)
    status = _wait_for(lambda: (s := _status(kube, namespace, "resume")).get("latestCheckpoint") and s, 300,
                       "a first checkpoint", interval=1)
    sandbox = status["sandboxNamespace"]
    worker = next(p["metadata"]["name"] for p in kube.get("pods", namespace=sandbox)["items"]
                  if "worker" in p["metadata"]["name"])
    pids = _pids_of_pod(local_cluster, sandbox, worker)
    assert pids, "the worker's processes were not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    final = _wait_phase(kube, namespace, "resume", timeout=600)
    assert final["phase"] == "Succeeded", _explain_failure(local_cluster, final)
    assert final["resumedFromStep"] > 0
    assert final["restarts"] >= 1
    assert final["progress"]["step"] == 40
    events = json.loads(kube.run("get", "events", "-n", sandbox, "-o", "json").stdout)["items"]
    exits = [e["message"] for e in events if e["reason"] == "ExitedWithCode"]
    assert any(f"{worker} exited with code 137" in m for m in exits), exits


def test_deleting_a_job_mid_run_stops_training_and_removes_the_sandbox(kube, local_cluster, operator, namespace):
    demo = _demo_documents()[1]["spec"]
    # A /dev/shm size other than the API's default (2Gi), so the container shows the job's own.
    secret, job = small_job("deleted", hyperparameters={**demo["hyperparameters"], "maxSteps": 400},
                            resources={**demo["resources"], "sharedMemory": "768Mi"})
    kube.apply(secret, job, namespace=namespace)
    status = _wait_for(lambda: ((s := _status(kube, namespace, "deleted")).get("progress") or {}).get("step", 0) > 0
                       and s, 300, "training under way", interval=1)
    sandbox = status["sandboxNamespace"]
    pods = [p["metadata"]["name"] for p in kube.get("pods", namespace=sandbox)["items"]]
    assert any(_pids_of_pod(local_cluster, sandbox, pod) for pod in pods)
    _assert_the_training_container_is_hardened(kube, operator, sandbox, "train-1-master-0", 768 * 1024**2)
    kube.run("delete", "finetunejob", "deleted", "-n", namespace, "--wait=true", "--timeout=180s")
    assert kube.run("get", "finetunejob", "deleted", "-n", namespace, check=False).returncode != 0
    _wait_for(lambda: kube.run("get", "namespace", sandbox, check=False).returncode != 0, 180, "sandbox deleted")
    _wait_for(lambda: not any(_pids_of_pod(local_cluster, sandbox, pod) for pod in pods), 60, "training processes gone")


VARIANTS = {
    "deepspeed-zero2": dict(distributed={"engine": "deepspeed", "zeroStage": 2, "precision": "fp32"}),
    "prefix-tuning": dict(method={"type": "prefix", "virtualTokens": 8}),
    "dpo": dict(objective="dpo", datasets=[{"uri": "s3://team-a/data/preferences.jsonl", "format": "preference"}]),
    "interleaved-multi-task": dict(preprocessing={"maxSeqLength": 128, "multiTask": {"strategy": "interleave",
                                                                                     "temperature": 2.0}}),
    "kto-feedback": dict(objective="kto", datasets=[{"uri": "s3://team-a/data/feedback.jsonl", "format": "feedback"}],
                         preprocessing={"maxSeqLength": 128, "contentFilters": [
                             # a term file in S3, read by the trainer: "access key" is in the 403 answers
                             {"name": "term-file", "type": "terms", "termsUri": "s3://team-a/filters/blocked-terms.txt",
                              "fields": "both", "action": "flag"},
                             {"name": "no-errors", "type": "regex", "patterns": [r"(?i)\berror 4\d\d\b"], "fields": "both"},
                             {"name": "plans", "type": "terms", "terms": ["plan"], "fields": "answer", "action": "flag"}]}),
    "two-stage": dict(datasets=None, stages=[
        {"name": "domain", "objective": "causal-lm",
         "datasets": [{"uri": "s3://team-a/data/corpus/", "format": "text"}]},
        {"name": "helpdesk", "objective": "sft",
         "datasets": [{"uri": "s3://team-a/data/support.jsonl", "format": "chat"}]},
    ]),
}
GATED = {
    "task-gated": dict(evaluation={"compareToBase": True, "maxSamples": 24, "tasks": [
        {"name": "helpdesk", "uri": "s3://team-a/data/eval/helpdesk-questions.jsonl", "maxSamples": 8,
         "maxNewTokens": 16, "gate": {"metric": "exactMatch", "minScore": 1.0}}]}),
    "gated": dict(evaluation={"compareToBase": True, "maxSamples": 24, "maxPerplexityRatio": 0.01}),
}


TWO_WORKERS = {"deepspeed-zero2", "gated"}


@pytest.fixture(scope="module")
def side_by_side(kube, local_cluster, operator):
    """The variants and the gated jobs, applied at once into one namespace and left to run side by side: a
    job's pods are limited to their CPU request, here 450m each, so that the 2-CPU node runs four pods at a
    time (beside CoreDNS and the operator, 120m) and the scheduler queues the rest. Two workers where the variant is
    about ranks (ZeRO-2 partitions, a gate failed on every rank), one elsewhere (the demo trains on two): each
    process starts torch and reads the model, a cost that would not test anything more. Returns namespace, the
    jobs and their settled statuses (a job that did not settle in time has its last status, which its test
    reports)."""
    from e2e.conftest import make_namespace

    namespace = make_namespace(kube, "side-by-side")
    resources = {**_demo_documents()[1]["spec"]["resources"], "cpu": "450m"}
    jobs = {name: small_job(name, resources={**resources, "workers": 2 if name in TWO_WORKERS else 1}, **changes)[1]
            for name, changes in {**VARIANTS, **GATED}.items()}
    kube.apply(small_job("secret-only")[0], *jobs.values(), namespace=namespace)
    statuses: dict[str, dict] = {}
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and len(statuses) < len(jobs):
        for name in set(jobs) - set(statuses):
            status = _status(kube, namespace, name)
            if status.get("phase") in ("Succeeded", "Failed"):
                statuses[name] = status
        time.sleep(2)
    for name in set(jobs) - set(statuses):
        statuses[name] = _status(kube, namespace, name)
    yield namespace, jobs, statuses
    kube.run("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_train_for_real_and_succeed(local_cluster, side_by_side, variant):
    _, jobs, statuses = side_by_side
    job, status = jobs[variant], statuses[variant]
    assert status.get("phase") == "Succeeded", _explain_failure(local_cluster, status)
    assert status["output"]["adapterUri"]
    assert _keys(local_cluster, status["output"]["adapterUri"])
    if variant == "two-stage":
        assert _keys(local_cluster, job["spec"]["output"]["uri"] + "stages/domain/")
    if variant == "interleaved-multi-task":  # each task's own training loss, for the user to watch each learn
        losses = status["progress"]["datasetLosses"]
        assert [d["uri"] for d in losses] == [d["uri"] for d in job["spec"]["datasets"]], losses
        assert all(d["steps"] > 0 and d["loss"] > 0 for d in losses), losses
    if variant == "kto-feedback":  # what each content filter did is in the status, nothing dropped silently
        stage = status["data"]["stages"][0]
        filters = {f["name"]: (f["rowsDropped"], f["rowsFlagged"]) for f in stage["contentFilters"]}
        assert filters["no-errors"][0] > 0 and filters["no-errors"][1] == 0, filters
        assert filters["plans"][0] == 0 and filters["plans"][1] > 0, filters
        assert filters["term-file"][0] == 0 and filters["term-file"][1] > 0, filters
        assert stage["datasets"][0]["droppedByContentFilters"] == filters["no-errors"][0]


def test_an_unreachable_task_gate_fails_the_job_naming_the_metric_and_keeps_the_outputs(local_cluster, side_by_side):
    _, jobs, statuses = side_by_side
    status = statuses["task-gated"]
    assert status.get("phase") == "Failed", _explain_failure(local_cluster, status)
    failed = _conditions(status)["Failed"]
    assert "EvaluationGateFailed" in failed["reason"] + failed["message"], failed
    assert "task helpdesk: exactMatch" in failed["message"] and "below the minimum 1.000" in failed["message"], failed
    assert status["evaluation"]["tasks"][0]["metric"] == "exactMatch"
    assert _keys(local_cluster, jobs["task-gated"]["spec"]["output"]["uri"] + "adapter/"), \
        "a rejected model's outputs are kept"


def test_a_failed_evaluation_gate_fails_the_job_with_the_reason(local_cluster, side_by_side):
    _, _, statuses = side_by_side
    status = statuses["gated"]
    assert status.get("phase") == "Failed", _explain_failure(local_cluster, status)
    failed = _conditions(status)["Failed"]
    assert failed["status"] == "True"
    assert "EvaluationGateFailed" in failed["reason"] + failed["message"], failed
    assert "perplexity" in failed["message"].lower(), failed
