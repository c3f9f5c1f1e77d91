"""Objects every local cluster starts with: the simulated node pools (KWOK), the training-operator's
namespace and webhook-certificate Secret, and the RBAC for tenant users."""

from __future__ import annotations

from dataclasses import dataclass

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
POOL_LABEL = "finetune.dev/pool"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Pool:
    name: str
    count: int
    cpu: str
    memory: str
    gpus: int = 0
    instance_type: str = ""


# Labelled and tainted as GPU pools are on managed clusters (GKE/EKS + NVIDIA GPU operator).
POOLS = (
    Pool("a100", 2, cpu="96", memory="1360Gi", gpus=8, instance_type="a2-highgpu-8g"),
    Pool("cpu", 2, cpu="32", memory="128Gi", instance_type="n2-standard-32"),
)


def node_object(pool: Pool, index: int) -> dict:
    labels = {
        POOL_LABEL: pool.name,
        "kubernetes.io/hostname": f"{pool.name}-{index}",
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": pool.instance_type,
        "type": "kwok",
    }
    capacity = {"cpu": pool.cpu, "memory": pool.memory, "pods": "110", "ephemeral-storage": "1Ti"}
    taints = []
    if pool.gpus:
        labels.update({
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
            "nvidia.com/gpu.count": str(pool.gpus),
        })
        capacity[GPU_RESOURCE] = str(pool.gpus)
        taints.append({"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": f"{pool.name}-{index}", "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
        "spec": {"taints": taints},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


SIMULATED_NODES = [node_object(pool, i) for pool in POOLS for i in range(pool.count)]


def bootstrap_objects(training_operator_namespace: str, tenant_group: str) -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": training_operator_namespace}},
        # The training-operator's certificate rotator fills this Secret; it must exist first.
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
         "metadata": {"name": "training-operator-webhook-cert", "namespace": training_operator_namespace}},
        # The training-operator's certificate rotator only reports ready once it has injected its CA
        # into this configuration. The API server cannot call a webhook on loopback under the
        # in-cluster DNS name the certificate is made for, so it is registered without webhooks.
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
         "metadata": {"name": "validator.training-operator.kubeflow.org"}, "webhooks": []},
        # Tenants may see what nodes and pools exist, nothing else cluster-wide; namespaces grant more.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "finetune:tenant-discovery"},
         "rules": [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                    "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "finetune:tenant-discovery"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "finetune:tenant-discovery"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": tenant_group}]},
        *SIMULATED_NODES,
    ]
