"""The real Kueue in the local cluster: its webhooks suspend queued jobs, quota admits them onto the
flavor's KWOK pool, a full queue keeps the next one waiting (its visibility API shows the line), and a
cohort lends idle quota that its owner reclaims by preemption.

Every test makes its own flavor and queues (cluster-scoped, so named with a per-test suffix) and
deletes them afterwards; Kueue removes their finalizers once nothing uses them.
"""

from __future__ import annotations

import json

import pytest

from e2e.localcluster import kueue
from e2e.localcluster.nodes import GPU_RESOURCE, POOL_LABEL
from e2e.tests.test_control_plane import _wait_for as wait_for

pytestmark = pytest.mark.cluster

WORKLOADS = "workloads.kueue.x-k8s.io"
TIMEOUT = 60


def _wait_for(check, what: str, timeout: float = TIMEOUT, interval: float = 0.5):
    return wait_for(check, timeout, what, interval)


def _queued_pytorchjob(name: str, queue: str, gpus: int = 8) -> dict:
    """A one-replica PyTorchJob that runs 5 min on KWOK; it names no pool: the flavor Kueue assigns does."""
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": name, "labels": {kueue.QUEUE_LABEL: queue}},
        "spec": {"runPolicy": {"backoffLimit": 0}, "pytorchReplicaSpecs": {"Master": {
            "replicas": 1, "restartPolicy": "Never",
            "template": {
                "metadata": {"annotations": {"sim.finetune.dev/run-duration": "300s"}},
                "spec": {"containers": [{
                    "name": "pytorch", "image": "trainer:test", "command": ["python", "-c", "pass"],
                    "resources": {"requests": {GPU_RESOURCE: str(gpus)}, "limits": {GPU_RESOURCE: str(gpus)}},
                }]},
            },
        }}},
    }


def _batch_job(name: str, queue: str | None, gpus: int = 0) -> dict:
    labels = {kueue.QUEUE_LABEL: queue} if queue else {}
    container = {"name": "main", "image": "busybox", "command": ["true"]}
    if gpus:
        container["resources"] = {"requests": {GPU_RESOURCE: str(gpus)}, "limits": {GPU_RESOURCE: str(gpus)}}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}}}


def _workload(kube, namespace: str, kind: str, name: str) -> dict | None:
    return kueue.owned_workload(kube.get(WORKLOADS, namespace=namespace)["items"], kind, name)


def _admitted_workload(kube, namespace: str, name: str) -> dict | None:
    workload = _workload(kube, namespace, "PyTorchJob", name)
    return workload if workload and kueue.is_true(workload, "Admitted") else None


def _gpu_queue(cluster_objects, namespace: str, suffix: str, queues: dict[str, kueue.Quota], cohort: str | None = None):
    """A flavor of the a100 pool and, per name, a ClusterQueue with that GPU quota and a LocalQueue of
    the same name in `namespace`."""
    flavor = f"a100-{suffix}"
    cluster_objects(kueue.pool_flavor("a100", name=flavor))
    for name, quota in queues.items():
        cluster_objects(kueue.cluster_queue(f"{name}-{suffix}", {flavor: {GPU_RESOURCE: quota}}, cohort=cohort))
    return flavor


def _local_queues(kube, namespace: str, suffix: str, names) -> None:
    kube.apply(*(kueue.local_queue(name, namespace, f"{name}-{suffix}") for name in names), namespace=namespace)


@pytest.mark.parametrize("job, kind", [
    (_queued_pytorchjob("train", "lq"), "PyTorchJob"),
    (_batch_job("batch", "lq", gpus=1), "Job"),
])
def test_webhooks_suspend_a_queued_job_while_there_is_no_quota(kube, cluster_objects, namespace, suffix, job, kind):
    _gpu_queue(cluster_objects, namespace, suffix, {"lq": kueue.Quota(0)})
    _local_queues(kube, namespace, suffix, ["lq"])
    kube.apply(job, namespace=namespace)
    name = job["metadata"]["name"]

    created = kube.get(kind.lower(), name, namespace)
    suspended = created["spec"]["runPolicy"]["suspend"] if kind == "PyTorchJob" else created["spec"]["suspend"]
    assert suspended is True, "Kueue's mutating webhook did not suspend the job"
    workload = _wait_for(lambda: _workload(kube, namespace, kind, name), "the job's Workload")
    assert workload["spec"]["queueName"] == "lq"
    pending = _wait_for(lambda: (c := kueue.condition(_workload(kube, namespace, kind, name), "QuotaReserved"))
                        and c["status"] == "False" and c, "QuotaReserved=False")
    assert "insufficient quota for nvidia.com/gpu" in pending["message"], pending
    assert not kube.get("pods", namespace=namespace)["items"]


def test_a_job_without_a_queue_is_left_alone(kube, namespace):
    kube.apply(_batch_job("plain", None), namespace=namespace)
    assert not kube.get("job", "plain", namespace)["spec"].get("suspend")
    assert _workload(kube, namespace, "Job", "plain") is None


def test_quota_admits_one_8_gpu_job_onto_the_pool_and_keeps_the_next_waiting(kube, cluster_objects, namespace, suffix):
    flavor = _gpu_queue(cluster_objects, namespace, suffix, {"team": kueue.Quota(8)})
    _local_queues(kube, namespace, suffix, ["team"])
    kube.apply(_queued_pytorchjob("first", "team"), namespace=namespace)
    admitted = _wait_for(lambda: _admitted_workload(kube, namespace, "first"), "the first job admitted")
    (pod_set,) = admitted["status"]["admission"]["podSetAssignments"]
    assert pod_set["flavors"] == {GPU_RESOURCE: flavor}

    job = _wait_for(lambda: (j := kube.get("pytorchjob", "first", namespace))
                    and j["spec"]["runPolicy"].get("suspend") is False and j, "the first job unsuspended")
    template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert template["nodeSelector"] == {POOL_LABEL: "a100"}

    def pod_bound():
        pods = kube.get("pods", namespace=namespace, selector="training.kubeflow.org/job-name=first")["items"]
        return pods if pods and all(p["spec"].get("nodeName") for p in pods) else None

    (pod,) = _wait_for(pod_bound, "the first job's pod bound to a node")
    node = kube.get("node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"][POOL_LABEL] == "a100"

    kube.apply(_queued_pytorchjob("second", "team"), namespace=namespace)

    def waiting():
        workload = _workload(kube, namespace, "PyTorchJob", "second")
        cond = workload and kueue.condition(workload, "QuotaReserved")
        return cond if cond and cond["status"] == "False" else None

    cond = _wait_for(waiting, "the second job waiting for quota")
    assert "insufficient unused quota" in cond["message"] and GPU_RESOURCE in cond["message"], cond
    assert kube.get("pytorchjob", "second", namespace)["spec"]["runPolicy"]["suspend"] is True
    assert not kube.get("pods", namespace=namespace, selector="training.kubeflow.org/job-name=second")["items"]

    # Kueue's visibility API, aggregated by the API server: the two waiting jobs are in line in the
    # ClusterQueue (0 and 1 ahead; which first is Kueue's tie-break when created in the same second), the
    # admitted one is not listed.
    kube.apply(_queued_pytorchjob("third", "team"), namespace=namespace)
    path = (f"/apis/{kueue.VISIBILITY_GROUP}/{kueue.VISIBILITY_VERSION}/namespaces/{namespace}/localqueues/team/"
            "pendingworkloads")

    def in_line():
        items = json.loads(kube.run("get", "--raw", path).stdout)["items"]
        places = {job: (w := kueue.owned_workload(items, "PyTorchJob", job)) and w["positionInClusterQueue"]
                  for job in ("first", "second", "third")}
        return places if places["first"] is None and sorted((places["second"], places["third"])) == [0, 1] else None

    _wait_for(in_line, "the second and third jobs in line in the ClusterQueue")


def test_a_queue_reclaims_its_lent_quota_by_preempting_the_borrower(kube, cluster_objects, namespace, suffix):
    cohort = f"org-{suffix}"
    _gpu_queue(cluster_objects, namespace, suffix,
               {"team-a": kueue.Quota(8, borrowing_limit=8), "team-b": kueue.Quota(8)}, cohort=cohort)
    _local_queues(kube, namespace, suffix, ["team-a", "team-b"])

    # Team A runs 16 GPUs: its own 8 and the 8 team B does not use.
    kube.apply(_queued_pytorchjob("a-1", "team-a"), _queued_pytorchjob("a-2", "team-a"), namespace=namespace)
    _wait_for(lambda: all(_admitted_workload(kube, namespace, n) for n in ("a-1", "a-2")), "both of A's jobs admitted")

    def borrowed() -> str | None:
        usage = kube.get("clusterqueues.kueue.x-k8s.io", f"team-a-{suffix}").get("status", {}).get("flavorsReservation")
        return usage and usage[0]["resources"][0]["borrowed"]

    # The ClusterQueue's status follows the admissions a moment later.
    _wait_for(lambda: borrowed() == "8", "team A's ClusterQueue borrowing 8 GPUs")

    # Team B's job takes its quota back: one of A's jobs is preempted and suspended.
    kube.apply(_queued_pytorchjob("b-1", "team-b"), namespace=namespace)
    _wait_for(lambda: _admitted_workload(kube, namespace, "b-1"), "B's job admitted")
    evicted = {name: kueue.condition(_workload(kube, namespace, "PyTorchJob", name), "Evicted")
               for name in ("a-1", "a-2")}
    preempted = [name for name, cond in evicted.items() if cond and cond["status"] == "True"]
    assert len(preempted) == 1, evicted
    assert evicted[preempted[0]]["reason"] == "Preempted"
    (victim,) = preempted
    reason = kueue.condition(_workload(kube, namespace, "PyTorchJob", victim), "Preempted")
    assert reason["status"] == "True" and reason["reason"] == "InCohortReclamation", reason
    _wait_for(lambda: kube.get("pytorchjob", victim, namespace)["spec"]["runPolicy"].get("suspend") is True,
              "the preempted job suspended")
    (survivor,) = {"a-1", "a-2"} - {victim}
    assert _admitted_workload(kube, namespace, survivor)
