"""The operator installed in the local cluster by its Helm chart: its image (built from
operator/Dockerfile), its service account, its RBAC, its admission guard and its NetworkPolicy,
running as a pod on the real node. The demo and the end-to-end tier use it; `make operator-up`
(operator_process.py) still runs the working tree directly for quick development.

    python -m e2e.localcluster operator-install | operator-uninstall
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request

import yaml

from . import build
from .cluster import LocalCluster
from .node import NODE_TOLERATION
from .nodes import POOL_LABEL
from .paths import REPO_ROOT
from .procs import wait_until

CHART = REPO_ROOT / "charts" / "finetune-operator"
CRDS = REPO_ROOT / "crds"
CRD_NAMES = ("crd/finetunejobs.finetune.dev", "crd/tenantpolicies.finetune.dev")
DEV_CONFIG = REPO_ROOT / "operator" / "config" / "dev.yaml"
RELEASE = "finetune-operator"
NAMESPACE = "finetune-system"
MONITORING_NAMESPACE = "monitoring"
SELECTOR = f"app.kubernetes.io/instance={RELEASE}"


def local_operator_config(cluster: LocalCluster, overrides: dict | None = None) -> dict:
    """dev.yaml with the local cluster's facts: its S3 (address and port), its trainer image."""
    config = yaml.safe_load(DEV_CONFIG.read_text())
    # runAsUser differs from the trainer image's USER (1000), so a container's uid shows the
    # operator's setting reached the kubelet (test_end_to_end.py).
    config.update(s3Endpoint=cluster.s3_endpoint, trainerImage=cluster.image("trainer"),
                  imagePullPolicy="Never", runAsUser=2000)
    config.setdefault("s3Egress", {})["ports"] = [cluster.state.ports["s3"]]
    # Every Service name on the S3 port is allowed by wildcard: each resolves into the cluster's own
    # ranges, so the operator must refuse it by its address (test_hostile_tenants.py).
    config["allowedS3Endpoints"] = [f"http://*.svc.cluster.local:{cluster.state.ports['s3']}"]
    return {**config, **(overrides or {})}


def local_values(cluster: LocalCluster, config: dict, watch_namespaces: list[str] | None = None) -> dict:
    """Chart values for the local cluster: the image imported into the node, the pod on node-0."""
    repository, tag = cluster.image("operator").rsplit(":", 1)
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "watchNamespaces": watch_namespaces or [],
        "nodeSelector": {POOL_LABEL: "local"},
        "tolerations": [NODE_TOLERATION],
        "config": config,
        # The most verbose level: a test reads the whole log for credentials (there must be none).
        "extraArgs": ["--verbose"],
        "resources": {"requests": {"cpu": "50m", "memory": "192Mi"}, "limits": {"memory": "512Mi"}},
        "probes": {"liveness": {"initialDelaySeconds": 5, "periodSeconds": 5, "timeoutSeconds": 5,
                                "failureThreshold": 6},
                   "readiness": {"initialDelaySeconds": 2, "periodSeconds": 2, "timeoutSeconds": 5,
                                 "failureThreshold": 3}},
    }


def install_crds(cluster: LocalCluster) -> None:
    """Apply the working tree's CRDs (crds/) and wait until the API server serves them."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=finetune-local", "-f", str(CRDS))
    cluster.wait_condition("Established", *CRD_NAMES, timeout=120)


class OperatorRelease:
    """The chart's operator in `finetune-system`, with the interface of OperatorProcess that the
    tests use (up, down, running, kill, metrics_url, config_file, logs)."""

    def __init__(self, cluster: LocalCluster, namespace: str = NAMESPACE, release: str = RELEASE):
        self.cluster = cluster
        self.namespace = namespace
        self.release = release
        self.values_file = cluster.root / f"operator-values-{release}.yaml"
        self.config_file = cluster.root / f"operator-config-{release}.yaml"

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        build.build(build.HELM, log=lambda *_: None)
        result = subprocess.run([str(build.HELM.binary("helm")), "--kubeconfig", str(self.cluster.kubeconfig), *args],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def _pods(self) -> list[dict]:
        out = self.cluster.kubectl("get", "pods", "-n", self.namespace, "-l", SELECTOR, "-o", "json", check=False)
        return json.loads(out.stdout)["items"] if out.returncode == 0 else []

    def pod(self) -> dict | None:
        running = [p for p in self._pods() if p["status"].get("phase") == "Running"
                   and not p["metadata"].get("deletionTimestamp")]
        return running[0] if running else None

    def running(self) -> bool:
        pod = self.pod()
        if not pod:
            return False
        conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}
        return conditions.get("Ready") == "True"

    def config(self) -> dict:
        return yaml.safe_load(self.config_file.read_text())

    def values(self) -> dict:
        return yaml.safe_load(self.values_file.read_text())

    def metrics_url(self) -> str:
        pod = self.pod()
        if pod is None:
            raise RuntimeError("the operator pod is not running")
        return f"http://{pod['status']['podIP']}:{self.config()['operatorMetricsPort']}/metrics"

    def health_url(self) -> str:
        pod = self.pod()
        if pod is None:
            raise RuntimeError("the operator pod is not running")
        return f"http://{pod['status']['podIP']}:{self.config()['livenessPort']}/healthz"

    def install_crds(self) -> None:
        # helm installs a chart's crds/ only once and never upgrades them: the working tree's CRDs
        # are applied first, as an upgrade of a real installation would (docs/operations.md).
        install_crds(self.cluster)

    def up(self, log=print, overrides: dict | None = None, watch_namespaces: list[str] | None = None) -> None:
        """Install (or upgrade) the release and wait until its pod is Ready. The operator image and the
        trainer image it names are this tree's (built and imported into the node when they changed)."""
        self.cluster.ensure_node_images(log)
        self.install_crds()
        for namespace, labels in ((self.namespace, {"pod-security.kubernetes.io/enforce": "restricted"}),
                                  (MONITORING_NAMESPACE, {})):
            self.cluster.kubectl("apply", "--server-side", "--field-manager=finetune-local", "-f", "-", input=yaml.safe_dump(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}}))
        config = local_operator_config(self.cluster, overrides)
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.values_file.write_text(yaml.safe_dump(local_values(self.cluster, config, watch_namespaces)))
        self.helm("upgrade", "--install", self.release, str(CHART), "--namespace", self.namespace,
                  "--values", str(self.values_file), "--wait", "--timeout", "240s", timeout=300)
        # After kill(): the chart's one replica again, whatever helm thinks changed.
        self.cluster.kubectl("scale", "deployment", self.deployment, "-n", self.namespace, "--replicas=1")
        wait_until(self.running, 120, "the operator pod Ready")
        log(f"operator installed by its chart: release {self.release} in {self.namespace}, "
            f"image {self.cluster.image('operator')}")

    def down(self, log=print) -> None:
        if self.helm("status", self.release, "--namespace", self.namespace, check=False).returncode == 0:
            self.helm("uninstall", self.release, "--namespace", self.namespace, "--wait", "--timeout", "120s")
            log(f"uninstalled the operator release {self.release}")

    def kill(self) -> None:
        """A crash that stays down until up(): the Deployment scaled to 0 (nothing restarts the pod),
        then SIGKILL to the operator's process in its container, as the OOM killer would do it: no
        graceful shutdown, no cleanup."""
        self.cluster.kubectl("scale", "deployment", self.deployment, "-n", self.namespace, "--replicas=0")
        for pod in self._pods():
            for pid in self.cluster.node_runtime.container_pids(self.namespace, pod["metadata"]["name"], "operator"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        wait_until(lambda: not self._pods(), 60, "the operator pod to go")

    @property
    def deployment(self) -> str:
        return self.release if "finetune-operator" in self.release else f"{self.release}-finetune-operator"

    def logs(self, previous: bool = False) -> str:
        pod = self.pod() or (self._pods() or [None])[0]
        if pod is None:
            return ""
        args = ["logs", "-n", self.namespace, pod["metadata"]["name"], "-c", "operator"]
        if previous:
            args.append("--previous")
        return self.cluster.kubectl(*args, check=False).stdout

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url(), timeout=10) as response:
            return response.read().decode()


def _restarts(pod: dict) -> int:
    return sum(s.get("restartCount", 0) for s in pod["status"].get("containerStatuses") or [])
