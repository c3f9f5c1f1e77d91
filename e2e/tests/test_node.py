"""The real node node-0: pods run as containers of our images (containerd + runc) with the kubelet
doing what a kubelet does -- env and volumes, exit codes, restarts, SIGTERM on deletion, security
contexts, cluster DNS, the `kubernetes` Service, Prometheus discovery."""

from __future__ import annotations

import json
import time

import pytest

from e2e.localcluster import network
from e2e.localcluster.node import NODE_NAME, NODE_TOLERATION
from e2e.tests.test_control_plane import _condition, _wait_for

pytestmark = pytest.mark.cluster

LOCAL = {"finetune.dev/pool": "local"}


def _pod(cluster, name: str, code: str, *, image: str = "base", restart: str = "Never", **extra) -> dict:
    container = {"name": "main", "image": cluster.image(image), "imagePullPolicy": "Never",
                 "command": ["python3", "-c", code], **extra}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"restartPolicy": restart, "nodeSelector": LOCAL, "tolerations": [NODE_TOLERATION],
                     "terminationGracePeriodSeconds": 10, "containers": [container]}}


def _status(kube, namespace, name) -> dict:
    return kube.get("pod", name, namespace).get("status", {})


def _logs(kube, namespace, pod, container="main") -> str:
    return kube.run("logs", "-n", namespace, pod, "-c", container, check=False).stdout


def test_node_0_is_a_real_kubelet_on_containerd(kube):
    node = kube.get("node", NODE_NAME)
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"].startswith("v1.35")
    assert info["containerRuntimeVersion"].startswith("containerd://1.6")
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == network.NODE_IP
    assert node["metadata"]["labels"]["finetune.dev/pool"] == "local"
    assert {"key": "finetune.dev/pool", "value": "local", "effect": "NoSchedule"} in node["spec"]["taints"]


def test_a_pod_runs_in_a_container_with_its_env_and_volumes(kube, local_cluster, namespace):
    kube.apply(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"TOKEN": "s3cr3t"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
         "data": {"mode": "fast", "config.json": '{"answer": 42}'}},
        namespace=namespace,
    )
    code = ("import json, os, socket; cfg = json.load(open('/etc/settings/config.json')); "
            "print('token', os.environ['TOKEN'], 'mode', os.environ['MODE'], 'pod', os.environ['POD_NAME'], "
            "'ns', os.environ['POD_NAMESPACE'], 'answer', cfg['answer'], 'ip', os.environ['POD_IP'], "
            "'hostname', socket.gethostname())")
    pod = _pod(local_cluster, "envcheck", code,
               env=[{"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
               envFrom=[{"secretRef": {"name": "creds"}}],
               volumeMounts=[{"name": "settings", "mountPath": "/etc/settings"}])
    pod["spec"]["volumes"] = [{"name": "settings", "configMap": {"name": "settings"}}]
    kube.apply(pod, namespace=namespace)
    _wait_for(lambda: _status(kube, namespace, "envcheck").get("phase") == "Succeeded", 120, "pod Succeeded")
    status = _status(kube, namespace, "envcheck")
    assert status["podIP"].startswith(network.NODE_POD_CIDR.rsplit(".", 2)[0] + ".")
    assert status["hostIP"] == network.NODE_IP
    out = _logs(kube, namespace, "envcheck")
    assert (f"token s3cr3t mode fast pod envcheck ns {namespace} answer 42 ip {status['podIP']} "
            f"hostname envcheck") in out, out
    assert status["containerStatuses"][0]["imageID"], "no image ID: not run from an image"


def test_a_failing_container_reports_its_real_exit_code(kube, local_cluster, namespace):
    kube.apply(_pod(local_cluster, "fails", "import sys; print('bye'); sys.exit(7)"), namespace=namespace)
    _wait_for(lambda: _status(kube, namespace, "fails").get("phase") == "Failed", 120, "pod Failed")
    state = _status(kube, namespace, "fails")["containerStatuses"][0]["state"]
    assert state["terminated"]["exitCode"] == 7 and state["terminated"]["reason"] == "Error"


def test_on_failure_restarts_the_container_and_counts_restarts(kube, local_cluster, namespace):
    # The attempts are counted on an emptyDir: it outlives the container, not the pod.
    code = ("import os, sys; p = '/work/attempts'; n = int(open(p).read()) if os.path.exists(p) else 0; "
            "open(p, 'w').write(str(n + 1)); sys.exit(0 if n >= 2 else 1)")
    pod = _pod(local_cluster, "flaky", code, restart="OnFailure",
               volumeMounts=[{"name": "work", "mountPath": "/work"}])
    pod["spec"]["volumes"] = [{"name": "work", "emptyDir": {}}]
    kube.apply(pod, namespace=namespace)
    # The kubelet backs off 10 s, then 20 s between restarts.
    _wait_for(lambda: _status(kube, namespace, "flaky").get("phase") == "Succeeded", 180, "pod Succeeded")
    assert _status(kube, namespace, "flaky")["containerStatuses"][0]["restartCount"] == 2


SIGTERM_CASES = [
    # what the container does on SIGTERM, the pod's terminationGracePeriodSeconds
    pytest.param("sys.exit(0)", 30, id="leaves-on-sigterm"),  # gone long before its grace period is over
    pytest.param("pass", 4, id="ignores-sigterm"),  # killed once its grace period is over, not before
]


@pytest.mark.parametrize("on_sigterm, grace", SIGTERM_CASES)
def test_deleting_a_pod_delivers_sigterm_through_the_kubelet_with_its_grace_period(kube, local_cluster, namespace,
                                                                                  tmp_path, on_sigterm, grace):
    # What the container does on SIGTERM lands on the host through a hostPath volume (the test
    # namespace is not restricted), since the pod and its logs go with the deletion.
    code = ("import signal, sys, time\n"
            "def bye(signum, _):\n    open('/out/signal', 'w').write(signal.Signals(signum).name)\n"
            f"    {on_sigterm}\n"
            "signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\n"
            "while True:\n    time.sleep(1)\n")
    tmp_path.chmod(0o777)
    pod = _pod(local_cluster, "sleeper", code, volumeMounts=[{"name": "out", "mountPath": "/out"}])
    pod["spec"]["volumes"] = [{"name": "out", "hostPath": {"path": str(tmp_path), "type": "Directory"}}]
    pod["spec"]["terminationGracePeriodSeconds"] = grace
    kube.apply(pod, namespace=namespace)
    _wait_for(lambda: "ready" in _logs(kube, namespace, "sleeper"), 120, "container running")
    started = time.monotonic()
    kube.run("delete", "pod", "sleeper", "-n", namespace, "--wait=true", "--timeout=90s")
    took = time.monotonic() - started
    assert (tmp_path / "signal").read_text() == "SIGTERM"
    assert not local_cluster.node_runtime.container_pids(namespace, "sleeper")
    if on_sigterm == "pass":
        assert grace - 1 <= took < grace + 30, f"killed after {took:.1f}s, grace period {grace}s"
    else:
        assert took < grace - 5, f"gone after {took:.1f}s: the kubelet waited for the grace period ({grace}s)"


def test_an_image_whose_user_is_root_fails_run_as_non_root_at_the_kubelet(kube, local_cluster, namespace):
    # The base image has no USER (root); runAsNonRoot without a runAsUser must stop it at the kubelet.
    pod = _pod(local_cluster, "rootimage", "print('should not run')")
    pod["spec"]["securityContext"] = {"runAsNonRoot": True}
    kube.apply(pod, namespace=namespace)
    def refused():
        statuses = _status(kube, namespace, "rootimage").get("containerStatuses") or [{}]
        waiting = statuses[0].get("state", {}).get("waiting") or {}
        return waiting if waiting.get("reason") not in (None, "ContainerCreating") else None
    waiting = _wait_for(refused, 120, "the container to be refused")
    assert waiting["reason"] == "CreateContainerConfigError"
    assert "runAsNonRoot and image will run as root" in waiting["message"]


def test_pods_resolve_cluster_dns_and_reach_the_api_server_through_the_kubernetes_service(kube, local_cluster,
                                                                                          namespace):
    code = (
        "import json, socket, ssl, urllib.request, urllib.error\n"
        "print('dns', socket.gethostbyname('kubernetes.default.svc.cluster.local'))\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
        "ctx = ssl.create_default_context(cafile=sa + '/ca.crt')\n"
        "req = urllib.request.Request('https://kubernetes.default.svc/api/v1/namespaces/kube-system/configmaps',\n"
        "    headers={'Authorization': 'Bearer ' + open(sa + '/token').read()})\n"
        "try:\n    urllib.request.urlopen(req, context=ctx)\nexcept urllib.error.HTTPError as e:\n"
        "    print('api said', e.code, json.load(e)['message'])\n")
    kube.apply(_pod(local_cluster, "incluster", code), namespace=namespace)
    _wait_for(lambda: _status(kube, namespace, "incluster").get("phase") in ("Succeeded", "Failed"), 120,
              "pod finished")
    out = _logs(kube, namespace, "incluster")
    assert f"dns {network.KUBERNETES_SERVICE_IP}" in out, out
    assert (f'api said 403 configmaps is forbidden: User "system:serviceaccount:{namespace}:default" '
            f'cannot list resource "configmaps"') in out, out


EXPORTER = """
import http.server
class Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"# TYPE e2e_node_probe gauge\\ne2e_node_probe 7\\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("", 9100), Metrics).serve_forever()
"""


def test_a_trainer_pods_metrics_port_is_discovered_and_scraped_through_the_pod_monitor(kube, local_cluster, suffix):
    """A pod on the real node shaped like a run's master (in a sandbox-prefixed namespace, with the run's
    labels): Prometheus finds it through the chart's PodMonitor job and labels it as that job's."""
    from e2e.tests.test_end_to_end import _prometheus

    sandbox = f"ftj-probe-{suffix}"
    kube.apply({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": sandbox, "labels": {"finetune.dev/test": "true"}}})
    try:
        # An exporter as the trainer's prometheus_client is one: the text format with its Content-Type
        # (Prometheus 3 refuses a scrape without one).
        pod = _pod(local_cluster, "exporter", EXPORTER, ports=[{"name": "metrics", "containerPort": 9100}])
        pod["metadata"]["labels"].update({
            "app.kubernetes.io/managed-by": "finetune-operator", "finetune.dev/tenant": "probe",
            "finetune.dev/job-name": "probe-job", "finetune.dev/job-uid": "0000", "training.kubeflow.org/replica-type": "master"})
        pod["metadata"]["annotations"] = {"finetune.dev/job-name": "probe.job"}
        kube.apply(pod, namespace=sandbox)
        result = _wait_for(lambda: _prometheus(local_cluster, f'e2e_node_probe{{sandbox="{sandbox}"}}'), 120,
                           "Prometheus to discover and scrape the pod")
        metric = result[0]["metric"]
        assert float(result[0]["value"][1]) == 7.0
        assert (metric["job"], metric["namespace"], metric["name"], metric["pod"]) == (
            "finetune-system/finetune-operator-trainers", "probe", "probe.job", "exporter")
    finally:
        kube.run("delete", "namespace", sandbox, "--wait=false", check=False)


ALLREDUCE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank {dist.get_rank()} of {dist.get_world_size()} sum {t.item()}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_pytorchjob_runs_torchrun_across_two_containers_meeting_by_dns(kube, local_cluster, namespace):
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "script"},
                "data": {"allreduce.py": ALLREDUCE}}, namespace=namespace)

    def replica(n):
        return {"replicas": n, "restartPolicy": "ExitCode", "template": {"spec": {
            "nodeSelector": LOCAL, "tolerations": [NODE_TOLERATION],
            "volumes": [{"name": "script", "configMap": {"name": "script"}}],
            "containers": [{"name": "pytorch", "image": local_cluster.image("trainer"), "imagePullPolicy": "Never",
                            "command": ["torchrun", "--nproc-per-node=1", "/opt/script/allreduce.py"],
                            "volumeMounts": [{"name": "script", "mountPath": "/opt/script"}],
                            "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}}}]}}}

    kube.apply({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "allreduce"},
                "spec": {"pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(1)}}}, namespace=namespace)
    job = _wait_for(lambda: (j := kube.get("pytorchjob", "allreduce", namespace)) and
                    (_condition(j, "Succeeded") or _condition(j, "Failed")) and j, 300, "PyTorchJob finished")
    master_log = _logs(kube, namespace, "allreduce-master-0", "pytorch")
    worker_log = _logs(kube, namespace, "allreduce-worker-0", "pytorch")
    assert _condition(job, "Succeeded"), (json.dumps(job["status"]), master_log[-2000:], worker_log[-2000:])
    assert "rank 0 of 2 sum 3.0" in master_log
    assert "rank 1 of 2 sum 3.0" in worker_log
    # The worker met the master under its DNS name, the training-operator's MASTER_ADDR.
    worker = kube.get("pod", "allreduce-worker-0", namespace)
    env = {e["name"]: e.get("value") for e in worker["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == "allreduce-master-0"
