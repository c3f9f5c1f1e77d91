"""Checkpoint-aware preemption for real: a FineTuneJob trains on the real node under a TenantPolicy
that queues it through Kueue; a higher-priority workload in the same ClusterQueue preempts it; the
trainer finishes its step, saves a checkpoint inside the grace period and exits; Kueue admits the run
again once the preemptor is done, and the trainer resumes from that checkpoint and succeeds.

The work lost is measured from the trainer's own log lines (`step`, `preempted`, `resume` events):
the steps done before SIGTERM that the resumed run had to do again (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from e2e.localcluster import kueue
from e2e.localcluster.node import NODE_TOLERATION
from e2e.localcluster.nodes import POOL_LABEL
from e2e.tests.test_control_plane import _wait_for
from e2e.tests.test_end_to_end import _demo_documents, _explain_failure, _status, _wait_phase, small_job
from e2e.tests.test_tenancy import policy, tenant_namespace

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

# Enough steps that Kueue's preemption (about 10 s from the preemptor's creation to SIGTERM) lands
# mid-run on a fast machine too: at 0.3 s a step, 40 steps were over before it arrived.
MAX_STEPS = 120


def priority_class(name: str, value: int) -> dict:
    return {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name},
            "value": value, "preemptionPolicy": "Never"}


def preemptor(name: str, queue: str, priority: str, image: str) -> dict:
    """A short batch Job that needs the quota the training run holds, at a higher priority."""
    pod = {
        "restartPolicy": "Never",
        "priorityClassName": priority,
        "nodeSelector": {POOL_LABEL: "local"},
        "tolerations": [NODE_TOLERATION],
        "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never", "command": ["sleep", "15"],
                        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}],
    }
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": {kueue.QUEUE_LABEL: queue}},
            "spec": {"backoffLimit": 0, "template": {"spec": pod}}}


class LogFollower:
    """`kubectl logs -f` of a pod into a list of the trainer's JSON events, until the pod goes."""

    def __init__(self, local_cluster, namespace: str, pod: str):
        self.proc = subprocess.Popen(
            [str(local_cluster.kubectl_path), f"--kubeconfig={local_cluster.kubeconfig}", "logs", "-f", "-n",
             namespace, pod, "-c", "pytorch"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def events(self, timeout: float = 60) -> list[dict]:
        out, _ = self.proc.communicate(timeout=timeout)
        found = []
        for line in out.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "event" in record:
                found.append(record)
        return found


def test_a_preempted_run_checkpoints_within_its_grace_period_and_resumes(kube, local_cluster, operator, namespace,
                                                                         suffix, cluster_objects):
    queue, low, high = f"node-{suffix}", f"training-low-{suffix}", f"training-high-{suffix}"
    tenant = f"preempt-{suffix}"
    tenant_namespace(kube, namespace, tenant)
    # The quota of one demo run (its pods' CPU, 2Gi and 8Gi scratch each): nothing else fits beside it.
    demo = _demo_documents()[1]["spec"]["resources"]
    quota = {"cpu": f"{demo['workers'] * int(demo['cpu'].removesuffix('m'))}m", "memory": "4Gi",
             "ephemeral-storage": "16Gi"}
    cluster_objects(priority_class(low, 100), priority_class(high, 1000),
                    kueue.local_node_flavor(f"node-{suffix}"),
                    kueue.cluster_queue(queue, {f"node-{suffix}": quota}, within_cluster_queue="LowerPriority"),
                    policy(tenant, tenant, nodePools=["local"], kueue={"clusterQueues": [queue]},
                           priorityClasses={"allowed": [low, high], "default": low}))
    hyperparameters = {**_demo_documents()[1]["spec"]["hyperparameters"], "maxSteps": MAX_STEPS}
    secret, job = small_job("preempted", hyperparameters=hyperparameters,
                            checkpoint={"everySteps": 10, "keep": 2, "preemptionGraceSeconds": 90})
    # The preemptor's LocalQueue exists before the run starts, so that its admission is all that
    # stands between its creation and the preemption.
    kube.apply(kueue.local_queue(queue, namespace, queue), secret, job, namespace=namespace)

    status = _wait_for(lambda: (s := _status(kube, namespace, "preempted")).get("progress", {}).get("step", 0) >= 12
                       and s, 420, "training past its first checkpoint", interval=1)
    sandbox = status["sandboxNamespace"]
    ptj = kube.get("pytorchjob", "train-1", sandbox)
    assert ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90
    assert ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["priorityClassName"] == low
    follower = LogFollower(local_cluster, sandbox, "train-1-master-0")

    kube.apply(preemptor("preemptor", queue, high, local_cluster.image("base")), namespace=namespace)
    events = follower.events(timeout=180)  # ends when the preempted pod is gone
    steps = [e["step"] for e in events if e["event"] == "step"]
    saved = [e["step"] for e in events if e["event"] == "preempted"]
    assert saved, f"no checkpoint on SIGTERM; the pod's last events: {events[-5:]}"
    last_step_before_sigterm = max(steps)

    held = _wait_for(lambda: (s := _status(kube, namespace, "preempted")).get("preemptions") and s, 60,
                     "the preemption in the status")
    assert held["queue"]["clusterQueue"] == queue
    final = _wait_phase(kube, namespace, "preempted", timeout=600)
    assert final["phase"] == "Succeeded", _explain_failure(local_cluster, final)
    assert final["preemptions"] >= 1
    assert final["resumedFromStep"] == saved[-1]
    lost = last_step_before_sigterm - final["resumedFromStep"]
    assert lost <= 1, (last_step_before_sigterm, final["resumedFromStep"])
    assert final["progress"]["step"] == MAX_STEPS
    print(f"\npreemption: SIGTERM after step {last_step_before_sigterm}, checkpoint at step {saved[-1]}, "
          f"resumed from step {final['resumedFromStep']}: {lost} step(s) lost")
    newest = str(final["checkpoints"][-1]["step"])
    _wait_for(lambda: (kueue.owned_workload(kube.get("workloads", namespace=sandbox)["items"], "PyTorchJob", "train-1")
                       or {}).get("metadata", {}).get("annotations", {}).get("finetune.dev/checkpoint-step") == newest,
              60, f"the Workload annotated with checkpoint step {newest}")
    published = kube.get("pytorchjob", "train-1", sandbox)["metadata"]["annotations"]
    assert published["finetune.dev/checkpoint-step"] == newest
    # and when it was saved, as the status records it: a victim choice can weigh the work since then
    assert published["finetune.dev/checkpoint-time"] == final["checkpoints"][-1]["time"] != "", published
