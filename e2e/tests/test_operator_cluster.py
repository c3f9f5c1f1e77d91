"""The operator against the real local control plane (tier 2): FineTuneJobs -> sandbox -> PyTorchJob
-> training-operator -> KWOK-simulated pods on the pools `a100` and `cpu` -> status.

No training runs here (that is test_end_to_end.py, on the `local` pool): KWOK pods run 5 s and
succeed. A test steers them the way a harness would, with annotations on the PyTorchJob's replica
pod templates (`sim.finetune.dev/run-duration`, `sim.finetune.dev/exit-code`, see
e2e/localcluster/kwok/stages.yaml), applied server-side under its own field manager: the FineTuneJob
API has no pod annotations, and the operator's own server-side applies leave fields it does not own
alone. To annotate before any pod exists, such a job starts with `runPolicy.suspend: true`.

Every job gets its own output URI: `output.uri + runId` is a run's identity in S3.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml

from e2e.localcluster import s3 as local_s3
from e2e.localcluster.nodes import POOL_LABEL
from e2e.localcluster.paths import REPO_ROOT
from e2e.tests.test_control_plane import _wait_for
from finetune_operator.builders import names as n
from finetune_operator.builders.run import run_objects
from finetune_operator.builders.sandbox import sandbox_objects
from finetune_operator.config import OperatorConfig
from finetune_trainer.config import TrainerConfig

pytestmark = pytest.mark.cluster

EXAMPLES = REPO_ROOT / "examples"
# Real training on the `local` pool: covered by test_end_to_end.py, not by the KWOK tier.
REAL_TRAINING_EXAMPLES = {"finetunejob-demo.yaml", "finetunejob-search.yaml"}
KWOK_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name not in REAL_TRAINING_EXAMPLES)

HARNESS = "e2e-harness"  # field manager of what the tests add to operator-made objects
SIM_DURATION = "sim.finetune.dev/run-duration"
SIM_EXIT_CODE = "sim.finetune.dev/exit-code"
MODEL = "s3://models/tiny-llama/"
DATA = "s3://team-a/data"


# ---- objects -------------------------------------------------------------------------------------


def credentials(name: str = "s3-credentials", opted_in: bool = True, **extra: str) -> dict:
    """The local S3's credentials as a Secret its owner opted in for FineTuneJobs."""
    data = {"AWS_ACCESS_KEY_ID": local_s3.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": local_s3.SECRET_KEY, **extra}
    labels = {n.CREDENTIALS_OPT_IN_LABEL: "true"} if opted_in else {}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": labels}, "type": "Opaque",
            "stringData": data}


def ftj(name: str, **spec_changes) -> dict:
    """A small valid FineTuneJob on the `cpu` pool; keyword arguments replace (None: drop) spec fields."""
    spec = {
        "model": {"uri": MODEL},
        "datasets": [{"uri": f"{DATA}/support.jsonl", "format": "chat"}],
        "method": {"type": "lora", "lora": {"rank": 4}},
        "hyperparameters": {"maxSteps": 10},
        "resources": {"workers": 1, "gpusPerWorker": 0, "nodePool": "cpu", "cpu": "1", "memory": "1Gi"},
        # output.uri + runId identify a run: every job of every test run gets its own.
        "output": {"uri": f"s3://team-a/e2e-kwok/{name}-{uuid.uuid4().hex[:8]}/"},
        "credentials": {"secretName": "s3-credentials"},
    }
    for key, value in spec_changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def run_policy(**fields) -> dict:
    return {"backoffLimit": 0, **fields}


# ---- reading and waiting -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg(operator) -> OperatorConfig:
    """The configuration the running operator was started with."""
    return OperatorConfig.model_validate(yaml.safe_load(operator.config_file.read_text()))


def printed_columns(kube, namespace: str, name: str, wide: bool = False) -> dict[str, str]:
    """`kubectl get ftj NAME`'s columns (the CRD's printer columns; with `wide` those of priority 1 too),
    header -> value ("" where the job has none): read by where each header starts, as columns are aligned."""
    header, row = kube.run("get", "ftj", name, "-n", namespace, *(["-o", "wide"] if wide else [])).stdout.splitlines()
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
    return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, [*starts[1:], None])}


def sandbox_of(kube, cfg: OperatorConfig, namespace: str, name: str) -> str:
    """The sandbox of an existing FineTuneJob (its name carries the job's uid)."""
    return n.sandbox_namespace(cfg.sandboxPrefix, namespace, name, job_uid(kube, namespace, name))


def get_or_none(kube, kind: str, name: str, namespace: str | None = None) -> dict | None:
    args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
    result = kube.run(*args, check=False)
    if result.returncode == 0:
        return json.loads(result.stdout)
    assert "NotFound" in result.stderr, result.stderr
    return None


def items(kube, kind: str, namespace: str | None = None, selector: str | None = None) -> list[dict]:
    if namespace is None:
        args = ["get", kind, "-A", "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(kube.run(*args).stdout)["items"]
    return kube.get(kind, namespace=namespace, selector=selector)["items"]


def status_of(kube, namespace: str, name: str) -> dict:
    return (get_or_none(kube, "finetunejob", name, namespace) or {}).get("status") or {}


def conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions") or []}


def is_true(status: dict, ctype: str) -> bool:
    return conditions(status).get(ctype, {}).get("status") == "True"


def wait_status(kube, namespace: str, name: str, check, what: str, timeout: float = 90) -> dict:
    return _wait_for(lambda: (s := status_of(kube, namespace, name)) and check(s) and s, timeout,
                     f"FineTuneJob {namespace}/{name}: {what}", interval=1)


def wait_phase(kube, namespace: str, name: str, phase: str, timeout: float = 90) -> dict:
    return wait_status(kube, namespace, name, lambda s: s.get("phase") == phase, f"phase {phase}", timeout)


def wait_gone(kube, kind: str, name: str, namespace: str | None = None, timeout: float = 90) -> None:
    _wait_for(lambda: get_or_none(kube, kind, name, namespace) is None, timeout, f"{kind} {name} to be gone", interval=1)


def job_uid(kube, namespace: str, name: str) -> str:
    return kube.get("finetunejob", name, namespace)["metadata"]["uid"]


def owned_namespaces(kube, uid: str) -> list[str]:
    return [ns["metadata"]["name"] for ns in items(kube, "namespaces", selector=f"{n.LABEL_JOB_UID}={uid}")]


def owned_pytorchjobs(kube, uid: str) -> list[str]:
    return [f"{j['metadata']['namespace']}/{j['metadata']['name']}"
            for j in items(kube, "pytorchjobs", selector=f"{n.LABEL_JOB_UID}={uid}")]


def annotate_replicas(kube, sandbox: str, pytorchjob: str, annotations: dict[str, dict[str, str]]) -> None:
    """Set pod annotations of replica templates ({replica: annotations}) of an operator-made
    PyTorchJob: server-side apply with the harness's own field manager, so the operator's applies
    keep them. One apply names all of them: what the manager applied before and leaves out is removed."""
    patch = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": pytorchjob, "namespace": sandbox},
             "spec": {"pytorchReplicaSpecs": {r: {"template": {"metadata": {"annotations": a}}}
                                              for r, a in annotations.items()}}}
    kube.run("apply", "--server-side", f"--field-manager={HARNESS}", "-f", "-", input=yaml.safe_dump(patch))


def annotate_run(kube, cfg, namespace: str, name: str, annotations: dict[str, dict[str, str]],
                 run_id: str = "1") -> str:
    """Wait for the PyTorchJob of FineTuneJob `name` and annotate its replicas ({replica: annotations}).
    Returns the sandbox namespace."""
    sandbox = sandbox_of(kube, cfg, namespace, name)
    ptj_name = n.pytorchjob_name(run_id)
    _wait_for(lambda: get_or_none(kube, "pytorchjob", ptj_name, sandbox), 60, f"PyTorchJob {sandbox}/{ptj_name}")
    annotate_replicas(kube, sandbox, ptj_name, annotations)
    return sandbox


def start_suspended_and_annotate(kube, cfg, namespace: str, job: dict, annotations: dict[str, dict[str, str]]) -> str:
    """Create `job` suspended, annotate its PyTorchJob's replicas ({replica: annotations}), resume it.
    Returns the sandbox namespace. Not for a queued job: it gets no PyTorchJob while suspended."""
    job["spec"].setdefault("runPolicy", {})["suspend"] = True
    kube.apply(credentials(), job, namespace=namespace)
    sandbox = annotate_run(kube, cfg, namespace, job["metadata"]["name"], annotations, job["spec"].get("runId", "1"))
    job["spec"]["runPolicy"]["suspend"] = False
    kube.apply(job, namespace=namespace)
    return sandbox


def pods_of(kube, sandbox: str) -> list[dict]:
    return items(kube, "pods", namespace=sandbox)


def kube_calls(local_cluster, calls):
    """Run `calls(k8s.Kube)` with the operator's own client against the real API server."""
    from lightkube import AsyncClient, KubeConfig

    from finetune_operator import k8s

    async def run():
        client = AsyncClient(KubeConfig.from_file(str(local_cluster.kubeconfig)), field_manager=n.MANAGER)
        try:
            return await calls(k8s.Kube(client))
        finally:
            await client.close()
    return asyncio.run(run())


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ---- the examples --------------------------------------------------------------------------------


def test_every_example_but_the_real_training_demo_runs_on_kwok_pools():
    assert len(KWOK_EXAMPLES) >= 5, KWOK_EXAMPLES
    for name in KWOK_EXAMPLES:
        job = [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d["kind"] == "FineTuneJob"][0]
        assert job["spec"]["resources"]["nodePool"] in ("a100", "cpu"), name


@pytest.fixture(scope="module")
def applied_examples(kube, operator):
    """Every KWOK example applied as it is into one namespace at once (their Secrets are the same), each waited
    for to succeed: namespace and example -> job name."""
    from e2e.conftest import make_namespace

    namespace = make_namespace(kube, "examples")
    names = {}
    for example in KWOK_EXAMPLES:
        path = EXAMPLES / example
        names[example] = [d for d in yaml.safe_load_all(path.read_text())
                          if d["kind"] == "FineTuneJob"][0]["metadata"]["name"]
        kube.run("apply", "-n", namespace, "-f", str(path))
    yield namespace, names
    kube.run("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.mark.parametrize("example", KWOK_EXAMPLES)
def test_an_example_applies_as_it_is_succeeds_and_shows_no_diff(kube, applied_examples, example):
    namespace, names = applied_examples
    path, name = EXAMPLES / example, names[example]
    wait = kube.run("wait", "-n", namespace, "--for=condition=Succeeded", f"finetunejob/{name}", "--timeout=180s",
                    timeout=210)
    assert "condition met" in wait.stdout
    status = status_of(kube, namespace, name)
    assert status["phase"] == "Succeeded"
    assert {t: is_true(status, t) for t in ("Validated", "SandboxReady", "Succeeded", "Failed")} == \
        {"Validated": True, "SandboxReady": True, "Succeeded": True, "Failed": False}
    # Defaults live in the schema and the operator never writes spec: the manifest has no drift.
    diff = kube.run("diff", "-n", namespace, "-f", str(path), check=False)
    assert diff.returncode == 0, f"kubectl diff exit {diff.returncode}:\n{diff.stdout}\n{diff.stderr}"


# ---- the sandbox ---------------------------------------------------------------------------------

POOL_CASES = [
    # pool, workers, gpusPerWorker, the pods' nodeSelector, their tolerations
    pytest.param("a100", 2, 8, {POOL_LABEL: "a100"},
                 [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}], id="a100-2x8gpu"),
    pytest.param("cpu", 3, 0, {POOL_LABEL: "cpu"}, None, id="cpu-3-workers"),
]


@pytest.mark.parametrize("pool, workers, gpus, node_selector, tolerations", POOL_CASES)
def test_the_sandbox_holds_exactly_the_objects_of_the_job(kube, operator, cfg, local_cluster, namespace,
                                                          pool, workers, gpus, node_selector, tolerations):
    job = ftj("sandboxed", resources={"workers": workers, "gpusPerWorker": gpus, "nodePool": pool,
                                      "cpu": "2", "memory": "3Gi"})
    # A key the sandbox must not get: only the AWS_* credentials are copied.
    kube.apply(credentials(EXTRA_TOKEN="not-for-the-sandbox"), job, namespace=namespace)
    status = wait_phase(kube, namespace, "sandboxed", "Succeeded")
    uid = job_uid(kube, namespace, "sandboxed")
    sandbox = sandbox_of(kube, cfg, namespace, "sandboxed")
    assert status["sandboxNamespace"] == sandbox
    assert status["pytorchJob"] == "train-1"
    assert owned_namespaces(kube, uid) == [sandbox]

    ns = kube.get("namespace", sandbox)
    labels = ns["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    assert labels[n.LABEL_TENANT] == namespace and labels[n.LABEL_JOB_UID] == uid
    assert labels[n.LABEL_JOB_NAME] == "sandboxed"

    policies = {p["metadata"]["name"]: p["spec"] for p in items(kube, "networkpolicies", sandbox)}
    assert set(policies) == {"default-deny", "allow-training"}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    allow = policies["allow-training"]
    egress_ports = {(p["protocol"], p["port"]) for rule in allow["egress"] for p in rule.get("ports", [])}
    s3_port = local_cluster.state.ports["s3"]
    assert {("UDP", 53), ("TCP", 53), ("TCP", s3_port)} <= egress_ports
    assert {"podSelector": {}} in allow["egress"][0]["to"] and {"podSelector": {}} in allow["ingress"][0]["from"]
    assert allow["ingress"][1]["ports"] == [{"protocol": "TCP", "port": cfg.trainerMetricsPort}]

    hard = kube.get("resourcequota", "finetune-quota", sandbox)["spec"]["hard"]
    assert hard == {"pods": str(2 * workers), "requests.cpu": str(2 * workers), "limits.cpu": str(2 * workers),
                    "requests.memory": f"{3 * workers}Gi", "limits.memory": f"{3 * workers}Gi",
                    "requests.nvidia.com/gpu": str(gpus * workers)}
    limits = kube.get("limitrange", "finetune-limits", sandbox)["spec"]["limits"]
    assert limits == [{"type": "Container", "max": {"cpu": "2", "memory": "3Gi"}, "default": {"cpu": "2", "memory": "3Gi"},
                       "defaultRequest": {"cpu": "2", "memory": "3Gi"}}]

    assert kube.get("serviceaccount", "trainer", sandbox)["automountServiceAccountToken"] is False
    secret = kube.get("secret", "s3-credentials", sandbox)
    assert secret["data"] == {"AWS_ACCESS_KEY_ID": b64(local_s3.ACCESS_KEY),
                              "AWS_SECRET_ACCESS_KEY": b64(local_s3.SECRET_KEY)}

    config = TrainerConfig.from_json(kube.get("configmap", "trainer-config-1", sandbox)["data"]["trainer-config.json"])
    assert (config.job.namespace, config.job.name, config.job.uid, config.job.runId) == (namespace, "sandboxed", uid, "1")
    assert config.model.uri == MODEL and [d.uri for d in config.datasets] == [f"{DATA}/support.jsonl"]
    assert config.output.uri == job["spec"]["output"]["uri"]
    assert config.storage.endpoint == local_cluster.s3_endpoint

    ptj = kube.get("pytorchjob", "train-1", sandbox)
    replicas = ptj["spec"]["pytorchReplicaSpecs"]
    expected_replicas = {"Master": 1, **({"Worker": workers - 1} if workers > 1 else {})}
    assert {r: spec["replicas"] for r, spec in replicas.items()} == expected_replicas
    for spec in replicas.values():
        assert spec["restartPolicy"] == "ExitCode"
        pod = spec["template"]["spec"]
        assert pod["nodeSelector"] == node_selector
        assert pod.get("tolerations") == tolerations
        assert pod["serviceAccountName"] == "trainer" and pod["automountServiceAccountToken"] is False
        container = pod["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        assert container["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)

    # The pods ran on the pool's nodes (restricted Pod Security admitted them, Workers included).
    pods = pods_of(kube, sandbox)
    assert len(pods) == workers, [p["metadata"]["name"] for p in pods]
    nodes = {node["metadata"]["name"]: node["metadata"]["labels"][POOL_LABEL] for node in items(kube, "nodes")}
    assert {nodes[p["spec"]["nodeName"]] for p in pods} == {pool}
    assert {p["status"]["phase"] for p in pods} == {"Succeeded"}

    # Applied server-side, reconciled: still no difference to the manifest.
    diff = kube.run("diff", "--server-side", "--field-manager=e2e-tests", "-n", namespace, "-f", "-",
                    input=yaml.safe_dump(job), check=False)
    assert diff.returncode == 0, f"kubectl diff exit {diff.returncode}:\n{diff.stdout}\n{diff.stderr}"


# ---- failures ------------------------------------------------------------------------------------

FAILURE_CASES = [
    # pool, workers, gpusPerWorker, the replica that fails, its exit code, annotations of the other replica
    pytest.param("cpu", 1, 0, "Master", 3, {}, id="master-exits-3-on-cpu"),
    pytest.param("a100", 2, 1, "Worker", 2, {"Master": {SIM_DURATION: "60s"}}, id="worker-exits-2-on-a100"),
]


@pytest.mark.parametrize("pool, workers, gpus, failing, code, others", FAILURE_CASES)
def test_a_failing_pod_fails_the_job_with_the_reason(kube, operator, cfg, namespace, pool, workers, gpus, failing,
                                                     code, others):
    job = ftj("failing", resources={"workers": workers, "gpusPerWorker": gpus, "nodePool": pool, "cpu": "1",
                                    "memory": "1Gi"}, runPolicy=run_policy(backoffLimit=2))
    start_suspended_and_annotate(kube, cfg, namespace, job,
                                 {failing: {SIM_EXIT_CODE: str(code), SIM_DURATION: "1s"}, **others})
    status = wait_phase(kube, namespace, "failing", "Failed")
    failed = conditions(status)["Failed"]
    assert failed["status"] == "True"
    assert f"trainer exit code {code}, not retryable" in failed["message"], failed
    assert failing in failed["message"], failed  # the training-operator's word: which replica failed
    assert conditions(status)["Succeeded"]["status"] == "False"
    assert conditions(status)["Running"]["reason"] == "Finished"
    assert "completionTime" in status
    events = items(kube, "events", namespace)
    assert any(e["type"] == "Warning" and e["involvedObject"]["name"] == "failing" and f"exit code {code}" in e["message"]
               for e in events), [(e["reason"], e["message"]) for e in events]


# ---- suspend, runId, TTL, deletion ---------------------------------------------------------------


def test_suspend_stops_the_run_and_resume_continues_it(kube, operator, cfg, namespace):
    job = ftj("pausable", runPolicy=run_policy())
    sandbox = start_suspended_and_annotate(kube, cfg, namespace, copy.deepcopy(job), {"Master": {SIM_DURATION: "60s"}})
    wait_status(kube, namespace, "pausable", lambda s: is_true(s, "Running"), "Running")
    assert [p["status"]["phase"] for p in pods_of(kube, sandbox)] == ["Running"]

    job["spec"]["runPolicy"]["suspend"] = True
    kube.apply(job, namespace=namespace)
    status = wait_phase(kube, namespace, "pausable", "Suspended")
    assert conditions(status)["Suspended"]["reason"] == "SuspendedByUser"
    assert not is_true(status, "Running")
    assert kube.get("pytorchjob", "train-1", sandbox)["spec"]["runPolicy"]["suspend"] is True
    _wait_for(lambda: not pods_of(kube, sandbox), 60, "the suspended run's pods to be removed")

    # Resume; the new pods run briefly.
    annotate_replicas(kube, sandbox, "train-1", {"Master": {SIM_DURATION: "2s"}})
    job["spec"]["runPolicy"]["suspend"] = False
    kube.apply(job, namespace=namespace)
    status = wait_phase(kube, namespace, "pausable", "Succeeded")
    assert conditions(status)["Suspended"]["status"] == "False"
    assert kube.get("pytorchjob", "train-1", sandbox)["spec"]["runPolicy"]["suspend"] is False
    assert owned_pytorchjobs(kube, job_uid(kube, namespace, "pausable")) == [f"{sandbox}/train-1"]


@pytest.mark.parametrize("first_run_finished", [pytest.param(False, id="while-running"),
                                                pytest.param(True, id="after-success")])
def test_a_new_run_id_replaces_the_old_runs_objects(kube, operator, cfg, namespace, first_run_finished):
    job = ftj("rerun", runId="1", runPolicy=run_policy())
    duration = "2s" if first_run_finished else "120s"
    sandbox = start_suspended_and_annotate(kube, cfg, namespace, copy.deepcopy(job), {"Master": {SIM_DURATION: duration}})
    if first_run_finished:
        wait_phase(kube, namespace, "rerun", "Succeeded")
    else:
        wait_status(kube, namespace, "rerun", lambda s: is_true(s, "Running"), "run 1 Running")
    uid = job_uid(kube, namespace, "rerun")

    job["spec"]["runId"] = "2"
    kube.apply(job, namespace=namespace)
    status = wait_status(kube, namespace, "rerun", lambda s: s.get("runId") == "2" and s.get("phase") == "Succeeded",
                         "run 2 Succeeded")
    assert status["pytorchJob"] == "train-2"
    assert owned_pytorchjobs(kube, uid) == [f"{sandbox}/train-2"]
    assert get_or_none(kube, "configmap", "trainer-config-1", sandbox) is None
    assert kube.get("configmap", "trainer-config-2", sandbox)
    assert {p["metadata"]["labels"][n.LABEL_RUN_ID] for p in pods_of(kube, sandbox)} == {"2"}
    assert owned_namespaces(kube, uid) == [sandbox]


def test_ttl_after_finished_removes_the_sandbox_and_keeps_the_job(kube, operator, cfg, namespace):
    job = ftj("short-lived", runPolicy=run_policy(ttlSecondsAfterFinished=3))
    kube.apply(credentials(), job, namespace=namespace)
    wait_status(kube, namespace, "short-lived", lambda s: is_true(s, "Succeeded"), "Succeeded")
    sandbox = sandbox_of(kube, cfg, namespace, "short-lived")
    wait_gone(kube, "namespace", sandbox, timeout=90)
    status = wait_status(kube, namespace, "short-lived",
                         lambda s: conditions(s).get("SandboxReady", {}).get("reason") == "DeletedAfterTTL",
                         "SandboxReady False (DeletedAfterTTL)")
    assert status["phase"] == "Succeeded" and conditions(status)["SandboxReady"]["status"] == "False"
    # The finished run is not brought back by the next reconcile.
    time.sleep(cfg.reconcileIntervalSeconds + 2)
    assert get_or_none(kube, "namespace", sandbox) is None
    assert status_of(kube, namespace, "short-lived")["phase"] == "Succeeded"


@pytest.mark.parametrize("while_running", [pytest.param(True, id="while-running"),
                                           pytest.param(False, id="after-success")])
def test_deleting_the_job_removes_its_sandbox(kube, operator, cfg, namespace, while_running):
    job = ftj("doomed", runPolicy=run_policy())
    if while_running:
        start_suspended_and_annotate(kube, cfg, namespace, job, {"Master": {SIM_DURATION: "300s"}})
        wait_status(kube, namespace, "doomed", lambda s: is_true(s, "Running"), "Running")
    else:
        kube.apply(credentials(), job, namespace=namespace)
        wait_phase(kube, namespace, "doomed", "Succeeded")
    uid = job_uid(kube, namespace, "doomed")
    sandbox = sandbox_of(kube, cfg, namespace, "doomed")
    assert owned_namespaces(kube, uid) == [sandbox]
    kube.run("delete", "finetunejob", "doomed", "-n", namespace, "--timeout=120s", timeout=150)
    assert get_or_none(kube, "finetunejob", "doomed", namespace) is None
    # The finalizer waits for the namespace controller: the sandbox is gone, not just terminating.
    assert get_or_none(kube, "namespace", sandbox) is None
    assert owned_pytorchjobs(kube, uid) == []


def reconcile_passes(operator) -> float:
    text = urllib.request.urlopen(operator.metrics_url(), timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("finetune_reconcile_total{"))


def test_passes_over_a_job_that_did_not_change_write_nothing(kube, operator, cfg, namespace):
    # A suspended job is active (its timer passes every tick, its run objects are desired) and steady.
    job = ftj("settled", runPolicy=run_policy(suspend=True))
    kube.apply(credentials(), job, namespace=namespace)
    wait_phase(kube, namespace, "settled", "Suspended")
    sandbox = sandbox_of(kube, cfg, namespace, "settled")
    time.sleep(cfg.reconcileIntervalSeconds + 2)  # let the pass after the last change happen

    def versions() -> dict[str, str]:
        objects = [kube.get("finetunejob", "settled", namespace), kube.get("namespace", sandbox)]
        for kind in ("networkpolicies", "resourcequotas", "limitranges", "serviceaccounts", "secrets", "configmaps",
                     "pytorchjobs"):
            objects += kube.get(kind, namespace=sandbox, selector=n.LABEL_JOB_NAME)["items"]
        return {f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"] for o in objects}

    before, passes_before = versions(), reconcile_passes(operator)
    assert "PyTorchJob/train-1" in before and "ConfigMap/trainer-config-1" in before
    time.sleep(2 * cfg.reconcileIntervalSeconds + 3)
    assert reconcile_passes(operator) >= passes_before + 2  # the timer did run over it
    assert versions() == before


def events_with_reason(kube, namespace: str, reason: str) -> list[dict]:
    return [e for e in kube.get("events", namespace=namespace)["items"] if e.get("reason") == reason]


def test_a_spec_change_during_a_run_is_reported_and_not_applied(kube, operator, cfg, namespace):
    job = ftj("steady", runPolicy=run_policy(), hyperparameters={"maxSteps": 10, "learningRate": 1e-4})
    sandbox = start_suspended_and_annotate(kube, cfg, namespace, copy.deepcopy(job), {"Master": {SIM_DURATION: "300s"}})
    wait_status(kube, namespace, "steady", lambda s: is_true(s, "Running"), "Running")
    config_before = kube.get("configmap", "trainer-config-1", sandbox)["data"]
    ptj_generation = kube.get("pytorchjob", "train-1", sandbox)["metadata"]["generation"]

    job["spec"]["hyperparameters"]["learningRate"] = 5e-4
    kube.apply(job, namespace=namespace)
    generation = kube.get("finetunejob", "steady", namespace)["metadata"]["generation"]
    status = wait_status(kube, namespace, "steady",
                         lambda s: conditions(s).get("UpToDate", {}).get("reason") == "SpecChangedDuringRun",
                         "UpToDate False (SpecChangedDuringRun)")
    up_to_date = conditions(status)["UpToDate"]
    assert up_to_date["status"] == "False" and "spec.runId" in up_to_date["message"]
    assert up_to_date["observedGeneration"] == generation
    assert is_true(status, "Running")  # the run goes on as it was created
    assert kube.get("configmap", "trainer-config-1", sandbox)["data"] == config_before
    assert kube.get("pytorchjob", "train-1", sandbox)["metadata"]["generation"] == ptj_generation
    _wait_for(lambda: events_with_reason(kube, namespace, "SpecChangedDuringRun"), 30, "a SpecChangedDuringRun event")

    # A new runId applies the new spec in a new run.
    job["spec"]["runId"] = "2"
    kube.apply(job, namespace=namespace)
    status = wait_status(kube, namespace, "steady",
                         lambda s: s.get("runId") == "2" and s.get("phase") == "Succeeded", "run 2 Succeeded")
    assert conditions(status)["UpToDate"]["status"] == "True"
    trainer_config = TrainerConfig.from_json(kube.get("configmap", "trainer-config-2", sandbox)["data"][n.CONFIG_KEY])
    assert trainer_config.hyperparameters.learningRate == 5e-4


def test_a_stuck_sandbox_is_reported_and_the_finalizer_still_goes(kube, operator, cfg, namespace):
    job = ftj("stuck", runPolicy=run_policy())
    kube.apply(credentials(), job, namespace=namespace)
    wait_phase(kube, namespace, "stuck", "Succeeded")
    sandbox = sandbox_of(kube, cfg, namespace, "stuck")
    # An object whose finalizer nobody removes keeps its namespace Terminating forever.
    holder = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "held", "finalizers": ["e2e.finetune.dev/hold"]}, "data": {}}
    kube.apply(holder, namespace=sandbox)
    try:
        started = time.monotonic()
        kube.run("delete", "finetunejob", "stuck", "-n", namespace, "--wait=false")
        wait_gone(kube, "finetunejob", "stuck", namespace, timeout=cfg.deletionTimeoutSeconds + 90)
        waited = time.monotonic() - started
        assert waited >= cfg.deletionTimeoutSeconds - 5, f"released after {waited:.0f}s, before the bound"
        ns = kube.get("namespace", sandbox)
        assert ns["status"]["phase"] == "Terminating"
        (event,) = events_with_reason(kube, namespace, "SandboxDeletionTimedOut")
        assert event["type"] == "Warning" and sandbox in event["message"]
        assert event["involvedObject"]["name"] == "stuck"
    finally:
        kube.run("patch", "configmap", "held", "-n", sandbox, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                 check=False)
    wait_gone(kube, "namespace", sandbox, timeout=90)


# ---- bad manifests -------------------------------------------------------------------------------

API_REJECTED = [
    # (id, spec changes, a fragment of the API server's message)
    ("method-type-enum", {"method": {"type": "adapter"}}, "spec.method.type"),
    ("workers-zero", {"resources": {"workers": 0, "gpusPerWorker": 0, "nodePool": "cpu"}}, "spec.resources.workers"),
    ("gpus-over-16", {"resources": {"workers": 1, "gpusPerWorker": 17, "nodePool": "a100"}}, "spec.resources.gpusPerWorker"),
    ("model-not-s3", {"model": {"uri": "https://huggingface.co/x"}}, "spec.model.uri"),
    ("no-output", {"output": None}, "spec.output"),
    ("no-credentials", {"credentials": None}, "spec.credentials"),
    ("run-id-uppercase", {"runId": "Run_1"}, "spec.runId"),
    ("split-ratio-too-big", {"validation": {"splitRatio": 0.9}}, "spec.validation.splitRatio"),
    ("bad-memory-quantity", {"resources": {"workers": 1, "gpusPerWorker": 0, "memory": "64 GB"}}, "spec.resources.memory"),
    ("unknown-field", {"epochs": 3}, 'unknown field "spec.epochs"'),
    ("lora-with-full", {"method": {"type": "full", "lora": {"rank": 4}}}, "method.lora is only allowed"),
    ("virtual-tokens-with-lora", {"method": {"type": "lora", "virtualTokens": 5}}, "method.virtualTokens"),
    ("zero-stage-with-ddp", {"distributed": {"engine": "ddp", "zeroStage": 2}}, "distributed.zeroStage"),
    ("qlora-without-gpus", {"method": {"type": "qlora"}}, "qlora needs spec.resources.gpusPerWorker"),
    ("no-datasets-no-stages", {"datasets": []}, "set datasets or stages"),
    ("duplicate-stage-names", {"datasets": [], "stages": [
        {"name": "a", "datasets": [{"uri": f"{DATA}/faq.jsonl"}]},
        {"name": "a", "datasets": [{"uri": f"{DATA}/support.jsonl"}]}]}, "stage names must be unique"),
    ("dpo-with-chat-data", {"objective": "dpo"}, "objective dpo needs"),
    ("dpo-with-packing", {"objective": "dpo", "datasets": [{"uri": f"{DATA}/preferences.jsonl", "format": "preference"}],
                          "preprocessing": {"packing": True}}, "packing is not allowed"),
    ("ratio-without-compare", {"evaluation": {"compareToBase": False, "maxPerplexityRatio": 1.0}}, "maxPerplexityRatio"),
    ("validation-uri-and-ratio", {"validation": {"uri": f"{DATA}/faq.jsonl", "splitRatio": 0.1}}, "either uri or splitRatio"),
]


@pytest.mark.parametrize("changes, message", [pytest.param(c, m, id=i) for i, c, m in API_REJECTED])
def test_a_bad_manifest_is_rejected_by_the_api_server(kube, operator, cfg, namespace, changes, message):
    job = ftj("bad", **changes)
    result = kube.run("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(job), check=False)
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr
    assert get_or_none(kube, "finetunejob", "bad", namespace) is None
    assert items(kube, "namespaces", selector=f"{n.LABEL_TENANT}={namespace},{n.LABEL_JOB_NAME}=bad") == []


OPERATOR_REJECTED = [
    # (id, Secret to create (None: none), spec changes, Validated reason, the field its message names)
    ("secret-missing", None, {}, "SecretNotFound", "spec.credentials.secretName"),
    ("secret-lacks-a-key", {"AWS_ACCESS_KEY_ID": local_s3.ACCESS_KEY}, {}, "SecretKeysMissing", "AWS_SECRET_ACCESS_KEY"),
    ("unknown-node-pool", "ok", {"resources": {"workers": 1, "gpusPerWorker": 0, "nodePool": "h100"}},
     "UnknownNodePool", "spec.resources.nodePool"),
    ("gpus-on-the-cpu-pool", "ok", {"resources": {"workers": 1, "gpusPerWorker": 1, "nodePool": "cpu"}},
     "GPUsNotAvailable", "spec.resources.gpusPerWorker"),
    ("more-gpus-than-a-node-has", "ok", {"resources": {"workers": 1, "gpusPerWorker": 16, "nodePool": "a100"}},
     "GPUsNotAvailable", "spec.resources.gpusPerWorker"),
    ("model-not-in-s3", "ok", {"model": {"uri": "s3://models/no-such-model/"}}, "S3ObjectNotFound", "spec.model.uri"),
    ("dataset-not-in-s3", "ok", {"datasets": [{"uri": f"{DATA}/support.jsonl", "format": "chat"},
                                              {"uri": f"{DATA}/missing.jsonl", "format": "chat"}]},
     "S3ObjectNotFound", "spec.datasets[1].uri"),
    ("bucket-not-in-s3", "ok", {"datasets": [{"uri": "s3://no-such-bucket/data.jsonl"}]},
     "S3ObjectNotFound", "spec.datasets[0].uri"),
    ("validation-set-not-in-s3", "ok", {"validation": {"uri": f"{DATA}/held-out-missing.jsonl"}},
     "S3ObjectNotFound", "spec.validation.uri"),
    ("stage-dataset-not-in-s3", "ok", {"datasets": [], "stages": [
        {"name": "sft", "datasets": [{"uri": f"{DATA}/instructions.jsonl", "format": "instruction"}]},
        {"name": "more", "datasets": [{"uri": f"{DATA}/nothing-here/", "format": "text"}]}]},
     "S3ObjectNotFound", "spec.stages[1].datasets[0].uri"),
]


@pytest.mark.parametrize("secret, changes, reason, field",
                         [pytest.param(s, c, r, f, id=i) for i, s, c, r, f in OPERATOR_REJECTED])
def test_a_job_that_cannot_run_is_not_validated_and_gets_nothing(kube, operator, cfg, namespace, secret, changes,
                                                                 reason, field):
    objects = [ftj("refused", **changes)]
    if secret == "ok":
        objects.insert(0, credentials())
    elif secret is not None:
        objects.insert(0, {"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": "s3-credentials", "labels": {n.CREDENTIALS_OPT_IN_LABEL: "true"}},
                           "stringData": secret})
    kube.apply(*objects, namespace=namespace)
    status = wait_status(kube, namespace, "refused", lambda s: "Validated" in conditions(s), "a Validated condition")
    validated = conditions(status)["Validated"]
    assert (validated["status"], validated["reason"]) == ("False", reason), validated
    assert field in validated["message"], validated
    assert status["phase"] == "Pending"
    assert conditions(status)["SandboxReady"]["status"] == "False"
    uid = job_uid(kube, namespace, "refused")
    assert get_or_none(kube, "namespace", sandbox_of(kube, cfg, namespace, "refused")) is None
    assert owned_namespaces(kube, uid) == [] and owned_pytorchjobs(kube, uid) == []
    events = [e for e in items(kube, "events", namespace) if e["involvedObject"]["name"] == "refused"]
    assert any(e["type"] == "Warning" and field in e["message"] for e in events), [e["message"] for e in events]


def test_a_job_waiting_for_its_secret_starts_once_the_secret_exists(kube, operator, cfg, namespace):
    kube.apply(ftj("patient"), namespace=namespace)
    wait_status(kube, namespace, "patient", lambda s: conditions(s).get("Validated", {}).get("reason") == "SecretNotFound",
                "Validated False (SecretNotFound)")
    kube.apply(credentials(), namespace=namespace)  # the periodic reconcile re-validates
    status = wait_phase(kube, namespace, "patient", "Succeeded", timeout=120)
    assert conditions(status)["Validated"]["status"] == "True"


# ---- the operator killed in the middle -----------------------------------------------------------


def _applied(kube, namespace, sandbox):
    return True


def _namespace_exists(kube, namespace, sandbox):
    return get_or_none(kube, "namespace", sandbox) is not None


def _configmap_exists(kube, namespace, sandbox):
    return get_or_none(kube, "configmap", "trainer-config-1", sandbox) is not None


def _pytorchjob_exists(kube, namespace, sandbox):
    return get_or_none(kube, "pytorchjob", "train-1", sandbox) is not None


KILL_POINTS = [
    pytest.param(_applied, id="right-after-apply"),
    pytest.param(_namespace_exists, id="once-the-namespace-exists"),
    pytest.param(_configmap_exists, id="once-the-configmap-exists"),
    pytest.param(_pytorchjob_exists, id="once-the-pytorchjob-exists"),
]


@pytest.mark.parametrize("kill_when", KILL_POINTS)
def test_an_operator_killed_during_creation_ends_with_one_sandbox_and_one_run(kube, operator, cfg, namespace, kill_when):
    job = ftj("crashy", resources={"workers": 2, "gpusPerWorker": 1, "nodePool": "a100", "cpu": "1", "memory": "1Gi"})
    kube.apply(credentials(), job, namespace=namespace)
    sandbox = sandbox_of(kube, cfg, namespace, "crashy")
    try:
        _wait_for(lambda: kill_when(kube, namespace, sandbox), 60, f"the kill point {kill_when.__name__}", interval=0.05)
        operator.kill()
        assert not operator.running()
    finally:
        operator.up(log=lambda *_: None)
    status = wait_phase(kube, namespace, "crashy", "Succeeded", timeout=120)
    uid = job_uid(kube, namespace, "crashy")
    assert owned_namespaces(kube, uid) == [sandbox]
    assert owned_pytorchjobs(kube, uid) == [f"{sandbox}/train-1"]
    assert [c["metadata"]["name"] for c in items(kube, "configmaps", sandbox, selector=n.LABEL_RUN_ID)] == \
        ["trainer-config-1"]
    assert len(pods_of(kube, sandbox)) == 2
    assert status["sandboxNamespace"] == sandbox and status["pytorchJob"] == "train-1"


def test_the_liveness_probe_answers_after_reconciles(kube, operator, namespace):
    # A fresh operator pod, then a job for it to reconcile.
    operator.kill()
    operator.up(log=lambda *_: None)
    kube.apply(credentials(), ftj("probed"), namespace=namespace)
    wait_phase(kube, namespace, "probed", "Succeeded")
    url = operator.health_url()

    def healthz():
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    # kopf answers /healthz from its probes' results of up to 10 s before (probing.py: probing_max_age):
    # a probe by the kubelet just before the job's passes leaves an answer of 0 for that long.
    def counted():
        code, body = healthz()
        return (code, body) if code != 200 or body["reconciles"] >= 1 else None

    code, body = _wait_for(counted, 30, "a /healthz answer counting the job's passes", interval=2)
    assert code == 200, body
    assert body["reconciles"] >= 1, body


# What a crash can leave behind, made deterministic: the operator's own objects (its builders, its
# field manager), a prefix of them in its apply order, made while it is down.
CRASH_LEFTOVERS = [
    pytest.param(1, id="only-the-namespace"),
    pytest.param(4, id="namespace-policies-and-quota"),
    pytest.param(7, id="the-whole-sandbox"),
    pytest.param(8, id="sandbox-and-configmap"),
    pytest.param(9, id="sandbox-configmap-and-pytorchjob"),
]


@pytest.mark.parametrize("made", CRASH_LEFTOVERS)
def test_an_operator_restarted_over_a_half_made_sandbox_completes_it(kube, operator, cfg, namespace, made):
    job = ftj("halfmade", resources={"workers": 2, "gpusPerWorker": 0, "nodePool": "cpu", "cpu": "1", "memory": "1Gi"})
    operator.kill()
    try:
        kube.apply(credentials(), job, namespace=namespace)
        ref = n.JobRef.from_body(kube.get("finetunejob", "halfmade", namespace))
        sandbox = sandbox_of(kube, cfg, namespace, "halfmade")
        secret_data = kube.get("secret", "s3-credentials", namespace)["data"]
        objects = (sandbox_objects(ref, cfg, secret_data) + run_objects(ref, cfg))[:made]
        assert len(objects) == made
        kube.run("apply", "--server-side", f"--field-manager={n.MANAGER}", "-f", "-", input=yaml.safe_dump_all(objects))
    finally:
        operator.up(log=lambda *_: None)
    status = wait_phase(kube, namespace, "halfmade", "Succeeded", timeout=120)
    uid = ref.uid
    assert owned_namespaces(kube, uid) == [sandbox]
    assert owned_pytorchjobs(kube, uid) == [f"{sandbox}/train-1"]
    assert [c["metadata"]["name"] for c in items(kube, "configmaps", sandbox, selector=n.LABEL_RUN_ID)] == \
        ["trainer-config-1"]
    assert sorted(p["metadata"]["name"] for p in items(kube, "networkpolicies", sandbox)) == ["allow-training", "default-deny"]
    assert kube.get("secret", "s3-credentials", sandbox)["data"] == secret_data
    assert len(pods_of(kube, sandbox)) == 2
    assert status["sandboxNamespace"] == sandbox and status["pytorchJob"] == "train-1"


# ---- tenants -------------------------------------------------------------------------------------

SANDBOX_RESOURCES = ["pods", "secrets", "configmaps", "pytorchjobs.kubeflow.org", "networkpolicies",
                     "resourcequotas", "serviceaccounts", "events"]


def test_a_tenant_creates_a_job_in_its_namespace_but_cannot_see_the_sandbox(kube, operator, cfg, namespace,
                                                                          tenant_kubeconfig):
    # What a platform team grants a tenant namespace: FineTuneJobs (the built-in `edit` role, which
    # the tenant already has here, does not know the CRD).
    kube.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "finetunejobs-edit"},
                "rules": [{"apiGroups": ["finetune.dev"], "resources": ["finetunejobs"],
                           "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                          {"apiGroups": ["finetune.dev"], "resources": ["finetunejobs/status"], "verbs": ["get"]}]},
               {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "finetunejobs-edit"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "finetunejobs-edit"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "finetune:tenants"}]},
               namespace=namespace)
    tenant = kube.as_user(tenant_kubeconfig)
    job = ftj("mine", runPolicy=run_policy())
    tenant.apply(credentials(), job, namespace=namespace)
    _wait_for(lambda: (status_of(tenant, namespace, "mine").get("phase") == "Succeeded"), 90, "the tenant's job Succeeded")
    sandbox = status_of(tenant, namespace, "mine")["sandboxNamespace"]
    assert get_or_none(kube, "namespace", sandbox)

    denied = {}
    for resource in SANDBOX_RESOURCES:
        result = tenant.run("get", resource, "-n", sandbox, check=False)
        denied[resource] = result.returncode != 0 and "Forbidden" in result.stderr
    for verb_args in (["get", "namespace", sandbox], ["delete", "namespace", sandbox, "--wait=false"],
                      ["delete", "pytorchjob", "train-1", "-n", sandbox, "--wait=false"]):
        result = tenant.run(*verb_args, check=False)
        denied[" ".join(verb_args[:2])] = result.returncode != 0 and "Forbidden" in result.stderr
    assert all(denied.values()), {k: v for k, v in denied.items() if not v}
    # ... while its own job and namespace stay usable.
    assert tenant.run("get", "finetunejob", "mine", "-n", namespace).returncode == 0
    assert get_or_none(kube, "pytorchjob", "train-1", sandbox)
