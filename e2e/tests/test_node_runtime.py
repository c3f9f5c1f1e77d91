"""The local node runtime runs pods bound to the `local` pool as real processes."""

from __future__ import annotations

import json

import pytest

from e2e.tests.test_control_plane import _condition, _wait_for

pytestmark = pytest.mark.cluster

LOCAL = {"finetune.dev/pool": "local"}


def _pod(name: str, code: str, **extra) -> dict:
    container = {"name": "main", "image": "ignored:local", "command": ["python", "-c", code], **extra}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"restartPolicy": "Never", "nodeSelector": LOCAL, "terminationGracePeriodSeconds": 5,
                     "containers": [container]}}


def _phase(kube, namespace, name):
    return kube.get("pod", name, namespace).get("status", {}).get("phase")


def _logs(local_cluster, namespace, pod) -> str:
    path = local_cluster.pods_dir / namespace / pod / "main.log"
    return path.read_text() if path.exists() else ""


def test_a_pod_runs_as_a_process_with_its_env_and_volumes(kube, local_cluster, namespace):
    kube.apply(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"TOKEN": "s3cr3t"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
         "data": {"mode": "fast", "config.json": '{"answer": 42}'}},
        namespace=namespace,
    )
    code = ("import json, os; cfg = json.load(open(os.environ['CONFIG_FILE'])); "
            "print('token', os.environ['TOKEN'], 'mode', os.environ['MODE'], 'pod', os.environ['POD_NAME'], "
            "'ns', os.environ['POD_NAMESPACE'], 'answer', cfg['answer'], 'peer', os.environ['PEER_HOST'])")
    pod = _pod("envcheck", code,
               env=[{"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "CONFIG_FILE", "value": "/etc/settings/config.json"},
                    {"name": "PEER_HOST", "value": "envcheck"}],
               envFrom=[{"secretRef": {"name": "creds"}}],
               volumeMounts=[{"name": "settings", "mountPath": "/etc/settings"}])
    pod["spec"]["volumes"] = [{"name": "settings", "configMap": {"name": "settings"}}]
    kube.apply(pod, namespace=namespace)
    _wait_for(lambda: _phase(kube, namespace, "envcheck") == "Succeeded", 180, "pod Succeeded")
    out = _logs(local_cluster, namespace, "envcheck")
    assert f"token s3cr3t mode fast pod envcheck ns {namespace} answer 42 peer 127.0.0.1" in out
    status = kube.get("pod", "envcheck", namespace)["status"]
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert status["podIP"].startswith("10.245.")
    logs_cmd = local_cluster_logs(local_cluster, namespace, "envcheck")
    assert "token s3cr3t" in logs_cmd


def local_cluster_logs(local_cluster, namespace, pod) -> str:
    import subprocess
    import sys

    from e2e.localcluster.paths import REPO_ROOT
    return subprocess.run([sys.executable, "-m", "e2e.localcluster", "logs", namespace, pod], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True).stdout


def test_a_failing_process_reports_its_real_exit_code(kube, namespace):
    kube.apply(_pod("fails", "import sys; print('bye'); sys.exit(7)"), namespace=namespace)
    _wait_for(lambda: _phase(kube, namespace, "fails") == "Failed", 180, "pod Failed")
    state = kube.get("pod", "fails", namespace)["status"]["containerStatuses"][0]["state"]
    assert state["terminated"]["exitCode"] == 7 and state["terminated"]["reason"] == "Error"


def test_on_failure_restarts_the_process_and_counts_restarts(kube, local_cluster, namespace):
    code = ("import os, sys; p = 'attempts'; n = int(open(p).read()) if os.path.exists(p) else 0; "
            "open(p, 'w').write(str(n + 1)); sys.exit(0 if n >= 2 else 1)")
    pod = _pod("flaky", code)
    pod["spec"]["restartPolicy"] = "OnFailure"
    kube.apply(pod, namespace=namespace)
    _wait_for(lambda: _phase(kube, namespace, "flaky") == "Succeeded", 180, "pod Succeeded after restarts")
    assert kube.get("pod", "flaky", namespace)["status"]["containerStatuses"][0]["restartCount"] == 2


def test_deleting_a_pod_terminates_its_process(kube, local_cluster, namespace):
    code = ("import signal, sys, time, os\n"
            "def bye(*_):\n    open('got-sigterm', 'w').write(str(os.getpid())); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\ntime.sleep(600)")
    kube.apply(_pod("sleeper", code), namespace=namespace)
    _wait_for(lambda: "ready" in _logs(local_cluster, namespace, "sleeper"), 180, "process running")
    assert _phase(kube, namespace, "sleeper") == "Running"
    kube.run("delete", "pod", "sleeper", "-n", namespace, "--wait=true", "--timeout=60s")
    marker = local_cluster.pods_dir / namespace / "sleeper" / "got-sigterm"
    assert marker.exists()
    pid = int(marker.read_text())
    _wait_for(lambda: not _alive(pid), 10, "process gone")


def _alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read().split()
        return stat[2] != "Z"
    except OSError:
        return False


ALLREDUCE = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank {dist.get_rank()} of {dist.get_world_size()} sum {t.item()}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_pytorchjob_runs_torchrun_across_two_pods_on_the_local_pool(kube, local_cluster, namespace):
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "script"},
                "data": {"allreduce.py": ALLREDUCE}}, namespace=namespace)

    def replica(n):
        return {"replicas": n, "restartPolicy": "ExitCode", "template": {"spec": {
            "nodeSelector": LOCAL,
            "volumes": [{"name": "script", "configMap": {"name": "script"}}],
            "containers": [{"name": "pytorch", "image": "ignored:local",
                            "command": ["torchrun", "--nproc-per-node=1", "/opt/script/allreduce.py"],
                            "volumeMounts": [{"name": "script", "mountPath": "/opt/script"}],
                            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}}]}}}

    kube.apply({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "allreduce"},
                "spec": {"pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(1)}}}, namespace=namespace)
    job = _wait_for(lambda: (j := kube.get("pytorchjob", "allreduce", namespace)) and
                    (_condition(j, "Succeeded") or _condition(j, "Failed")) and j, 180, "PyTorchJob finished")
    master_log = _logs_of(local_cluster, namespace, "allreduce-master-0")
    worker_log = _logs_of(local_cluster, namespace, "allreduce-worker-0")
    assert _condition(job, "Succeeded"), (json.dumps(job["status"]), master_log[-2000:], worker_log[-2000:])
    assert "rank 0 of 2 sum 3.0" in master_log
    assert "rank 1 of 2 sum 3.0" in worker_log


def _logs_of(local_cluster, namespace, pod) -> str:
    path = local_cluster.pods_dir / namespace / pod / "pytorch.log"
    return path.read_text() if path.exists() else ""


IN_CLUSTER = """
from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import ConfigMap
try:
    list(Client().list(ConfigMap, namespace="kube-system"))
    print("listed")
except ApiError as e:
    print("api said:", e.status.message)
"""


def test_a_pod_reaches_the_api_server_as_its_service_account(kube, local_cluster, namespace):
    kube.apply(_pod("incluster", IN_CLUSTER), namespace=namespace)
    _wait_for(lambda: _phase(kube, namespace, "incluster") in ("Succeeded", "Failed"), 180, "pod finished")
    out = _logs(local_cluster, namespace, "incluster")
    assert f'User "system:serviceaccount:{namespace}:default" cannot list resource "configmaps"' in out, out


METRICS_SERVER = """
import os, time
from prometheus_client import Gauge, start_http_server
Gauge("e2e_runtime_probe", "A value the pod exposes").set(7)
start_http_server(int(os.environ["METRICS_PORT"]), addr="127.0.0.1")
print("serving on", os.environ["METRICS_PORT"], flush=True)
time.sleep(300)
"""


def test_a_metrics_port_gets_a_free_host_port_and_is_scraped_by_prometheus(kube, local_cluster, namespace):
    from e2e.tests.test_end_to_end import _prometheus

    pod = _pod("exporter", METRICS_SERVER, env=[{"name": "METRICS_PORT", "value": "9090"}],
               ports=[{"name": "metrics", "containerPort": 9090}])
    kube.apply(pod, namespace=namespace)
    _wait_for(lambda: "serving on" in _logs(local_cluster, namespace, "exporter"), 180, "metrics server up")
    assert "serving on 9090" not in _logs(local_cluster, namespace, "exporter"), "the port was not remapped"
    result = _wait_for(lambda: _prometheus(local_cluster, f'e2e_runtime_probe{{namespace="{namespace}"}}'), 60,
                       "Prometheus to scrape the pod")
    assert float(result[0]["value"][1]) == 7.0 and result[0]["metric"]["pod"] == "exporter"
    kube.run("delete", "pod", "exporter", "-n", namespace, "--wait=true", "--timeout=60s")
    assert not (local_cluster.prometheus_targets_dir / f"pod-{namespace}-exporter.json").exists()
