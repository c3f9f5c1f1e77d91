"""The local control plane does what a real cluster does: admission, quota, RBAC, CEL, scheduling
onto simulated GPU pools, PyTorchJobs through the real training-operator, S3 and Prometheus."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
import uuid

import pytest

from e2e.localcluster import s3 as local_s3
from e2e.localcluster.nodes import POOL_LABEL
from e2e.localcluster.procs import free_port

pytestmark = pytest.mark.cluster


def _pod(name: str, *, privileged: bool = False, gpus: int = 0) -> dict:
    container = {"name": "main", "image": "busybox", "command": ["true"]}
    if privileged:
        container["securityContext"] = {"privileged": True}
    if gpus:
        container["resources"] = {"requests": {"nvidia.com/gpu": str(gpus)}, "limits": {"nvidia.com/gpu": str(gpus)}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [container]}}


def _wait_for(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last observed: {last!r}")


def test_nodes_of_the_simulated_pools_are_ready(kube):
    nodes = kube.get("nodes")["items"]
    pools = {}
    for node in nodes:
        pools.setdefault(node["metadata"]["labels"].get(POOL_LABEL), []).append(node)
    assert len(pools["a100"]) == 2 and len(pools["cpu"]) >= 1
    for node in pools["a100"]:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True"


def test_privileged_pod_is_rejected_in_a_restricted_namespace(kube, namespace):
    kube.run("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    result = kube.apply(_pod("privileged", privileged=True), namespace=namespace, check=False)
    assert result.returncode != 0
    assert "violates PodSecurity \"restricted:latest\"" in result.stderr
    assert "privileged" in result.stderr


@pytest.mark.parametrize(("gpus", "allowed"), [(8, True), (9, False)])
def test_gpu_resource_quota_rejects_an_over_quota_pod(kube, namespace, gpus, allowed):
    kube.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "gpus"},
                "spec": {"hard": {"requests.nvidia.com/gpu": "8"}}}, namespace=namespace)
    # The quota controller must have computed usage before admission enforces it.
    _wait_for(lambda: kube.get("resourcequota", "gpus", namespace).get("status", {}).get("used"), 120, "quota usage")
    result = kube.apply(_pod("gpu-pod", gpus=gpus), namespace=namespace, check=False)
    if allowed:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0
        assert "exceeded quota: gpus" in result.stderr and "requests.nvidia.com/gpu" in result.stderr


def _pytorchjob(name: str, workers: int, worker_annotations: dict | None = None, restart_policy: str = "Never",
                master_annotations: dict | None = None, gpus: int = 4) -> dict:
    def replica(replicas: int, annotations: dict | None) -> dict:
        return {
            "replicas": replicas,
            "restartPolicy": restart_policy,
            "template": {
                "metadata": {"annotations": {"sim.finetune.dev/run-duration": "3s", **(annotations or {})}},
                "spec": {
                    "nodeSelector": {POOL_LABEL: "a100"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{
                        "name": "pytorch", "image": "trainer:test", "command": ["python", "-c", "pass"],
                        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}},
                    }],
                },
            },
        }
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
        "spec": {"runPolicy": {"backoffLimit": 0},
                 "pytorchReplicaSpecs": {"Master": replica(1, master_annotations), "Worker": replica(workers, worker_annotations)}},
    }


def _condition(obj: dict, ctype: str) -> dict | None:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == ctype and cond["status"] == "True":
            return cond
    return None


def test_pytorchjob_pods_are_scheduled_on_the_gpu_pool_and_succeed(kube, namespace):
    kube.apply(_pytorchjob("ok", workers=2), namespace=namespace)

    def pods_bound():
        pods = kube.get("pods", namespace=namespace, selector="training.kubeflow.org/job-name=ok")["items"]
        return pods if len(pods) == 3 and all(p["spec"].get("nodeName") for p in pods) else None

    pods = _wait_for(pods_bound, 180, "3 PyTorchJob pods bound to nodes")
    roles = sorted(p["metadata"]["labels"]["training.kubeflow.org/replica-type"] for p in pods)
    assert roles == ["master", "worker", "worker"]
    nodes = {n["metadata"]["name"]: n for n in kube.get("nodes")["items"]}
    assert {nodes[p["spec"]["nodeName"]]["metadata"]["labels"][POOL_LABEL] for p in pods} == {"a100"}
    # 3 pods x 4 GPUs on 2 nodes of 8: the scheduler must have spread them.
    assert len({p["spec"]["nodeName"] for p in pods}) == 2
    # The training-operator injects the rendezvous environment into every pod.
    env = {e["name"] for e in pods[0]["spec"]["containers"][0]["env"]}
    assert {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"} <= env

    _wait_for(lambda: (j := kube.get("pytorchjob", "ok", namespace)) and _condition(j, "Succeeded") and j,
              240, "PyTorchJob Succeeded")
    # The job succeeds with its master; the training-operator counts the workers as succeeded on a later
    # sync of the finished job (a CI run read the status between the two).
    _wait_for(lambda: (kube.get("pytorchjob", "ok", namespace)["status"]["replicaStatuses"].get("Worker") or {})
              .get("succeeded") == 2, 60, "both workers counted as succeeded")
    wait = kube.run("wait", "-n", namespace, "--for=condition=Succeeded", "pytorchjob/ok", "--timeout=5s")
    assert "condition met" in wait.stdout


def test_pytorchjob_with_a_failing_worker_fails_with_its_exit_code(kube, namespace):
    # restartPolicy ExitCode: 1-127 are permanent failures, the job fails without a retry.
    job = _pytorchjob("bad", workers=2, worker_annotations={"sim.finetune.dev/exit-code": "3",
                                                           "sim.finetune.dev/run-duration": "1s"},
                      master_annotations={"sim.finetune.dev/run-duration": "300s"}, restart_policy="ExitCode")
    job["spec"]["runPolicy"]["backoffLimit"] = 3
    kube.apply(job, namespace=namespace)
    job = _wait_for(lambda: (j := kube.get("pytorchjob", "bad", namespace)) and _condition(j, "Failed") and j,
                    240, "PyTorchJob Failed")
    assert "\"Worker\" replica(s) failed" in _condition(job, "Failed")["message"]
    assert not _condition(job, "Restarting")

    events = json.loads(kube.run("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    exits = [e["message"] for e in events if e["reason"] == "ExitedWithCode"]
    assert any(m.endswith("bad-worker-0 exited with code 3") or m.endswith("bad-worker-1 exited with code 3")
               for m in exits), exits


def test_pytorchjob_restarts_a_pod_on_a_retryable_exit_code(kube, namespace):
    """restartPolicy ExitCode: 128-255 are retryable, so the training-operator recreates the pod."""
    # The Master outlives the Worker: a PyTorchJob succeeds as soon as its Master does.
    job = _pytorchjob("retry", workers=1, worker_annotations={"sim.finetune.dev/exit-code": "137",
                                                              "sim.finetune.dev/run-duration": "1s"},
                      master_annotations={"sim.finetune.dev/run-duration": "300s"},
                      restart_policy="ExitCode", gpus=1)
    job["spec"]["runPolicy"]["backoffLimit"] = 3
    kube.apply(job, namespace=namespace)

    def events(reason: str) -> list[str]:
        items = json.loads(kube.run("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        return [e["message"] for e in items if e["reason"] == reason]

    # The Restarting condition lasts only until the new pod runs; the events keep the whole story.
    exits = _wait_for(lambda: [m for m in events("ExitedWithCode") if m.endswith("retry-worker-0 exited with code 137")],
                      180, "the worker's exit with 137")
    assert exits
    restarting = _wait_for(lambda: [m for m in events("PyTorchJobRestarting") if "1 Worker replica(s) failed" in m],
                           180, "the PyTorchJob restarting")
    assert restarting

    def recreated_worker():
        pods = kube.get("pods", namespace=namespace, selector="training.kubeflow.org/replica-type=worker")["items"]
        return [p for p in pods if p.get("status", {}).get("phase") != "Failed"]

    assert _wait_for(recreated_worker, 180, "a recreated worker pod")
    assert not _condition(kube.get("pytorchjob", "retry", namespace), "Failed")


def test_unprivileged_user_is_denied_by_rbac(kube, namespace, tenant_kubeconfig):
    tenant = kube.as_user(tenant_kubeconfig)
    # Allowed: the tenant edits its own namespace.
    assert tenant.run("create", "configmap", "mine", "-n", namespace).returncode == 0
    # Denied: other namespaces, cluster-scoped objects, RBAC escalation.
    for args in (["get", "secrets", "-n", "kube-system"], ["get", "nodes"],
                 ["create", "namespace", f"sneaky-{uuid.uuid4().hex[:6]}"],
                 ["create", "clusterrolebinding", "x", "--clusterrole=cluster-admin", "--user=tenant-alice"]):
        result = tenant.run(*args, check=False)
        assert result.returncode != 0, args
        assert "forbidden" in result.stderr.lower() and "tenant-alice" in result.stderr, result.stderr
    can_i = tenant.run("auth", "can-i", "create", "pods", "-n", "kube-system", check=False)
    assert can_i.stdout.strip() == "no"


def test_crd_with_a_cel_rule_rejects_an_invalid_object(kube, namespace):
    group = "test.finetune.dev"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object",
                     "properties": {"spec": {
                         "type": "object",
                         "x-kubernetes-validations": [{"rule": "self.min <= self.max",
                                                       "message": "min must not exceed max"}],
                         "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}}}}}}}]},
    }
    kube.apply(crd)
    kube.run("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=30s")

    def widget(name, lo, hi):
        return {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": {"min": lo, "max": hi}}

    ok = _wait_for(lambda: kube.apply(widget("good", 1, 2), namespace=namespace, check=False).returncode == 0, 30,
                   "CRD served")
    assert ok
    bad = kube.apply(widget("bad", 3, 2), namespace=namespace, check=False)
    assert bad.returncode != 0
    assert "min must not exceed max" in bad.stderr


def test_s3_objects_round_trip_with_boto3(local_cluster):
    client = local_s3.client(local_cluster.s3_endpoint)
    bucket = f"roundtrip-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    body = b"\x00binary\xffpayload" * 1000
    client.put_object(Bucket=bucket, Key="dir/object.bin", Body=body)
    assert client.get_object(Bucket=bucket, Key="dir/object.bin")["Body"].read() == body
    listed = client.list_objects_v2(Bucket=bucket, Prefix="dir/")
    assert [o["Key"] for o in listed["Contents"]] == ["dir/object.bin"]


def test_prometheus_scrapes_a_target_and_answers_a_query(local_cluster, tmp_path):
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    marker = uuid.uuid4().hex[:8]
    Gauge("e2e_probe_value", "A value the test exposes", ["marker"], registry=registry).labels(marker).set(42)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    target_file = local_cluster.prometheus_targets_dir / f"e2e-{marker}.json"
    target_file.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {"source": "e2e"}}]))
    try:
        def query():
            q = urllib.parse.quote(f'e2e_probe_value{{marker="{marker}"}}')
            with urllib.request.urlopen(f"{local_cluster.prometheus_url}/api/v1/query?query={q}", timeout=5) as r:
                data = json.load(r)
            return data["data"]["result"] if data["status"] == "success" else None

        result = _wait_for(query, 180, "Prometheus to scrape the test target")
        assert float(result[0]["value"][1]) == 42.0
        assert result[0]["metric"]["job"] == "finetune"
    finally:
        target_file.unlink()
        server.shutdown()
