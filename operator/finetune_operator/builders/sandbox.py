"""The sandbox of one FineTuneJob: a namespace and the guard rails inside it (pure builders)."""

from __future__ import annotations

import ipaddress
from typing import Any, Sequence

from finetune_operator import endpoints
from finetune_operator.builders import names as n
from finetune_operator.quantity import multiply
from finetune_operator.config import NodePool, OperatorConfig

PSS_LEVEL = "restricted"


def resolve_pool(job: n.JobRef, cfg: OperatorConfig) -> tuple[str, NodePool]:
    name = job.spec.resources.nodePool or cfg.defaultNodePool
    if name not in cfg.nodePools:
        raise ValueError(f"spec.resources.nodePool: unknown node pool {name!r}")
    return name, cfg.nodePools[name]


def sandbox_name(job: n.JobRef, cfg: OperatorConfig) -> str:
    return n.sandbox_namespace(cfg.sandboxPrefix, job.namespace, job.name, job.uid, job.sandbox_attempt)


def object_meta(job: n.JobRef, cfg: OperatorConfig, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": sandbox_name(job, cfg),
        "labels": n.job_labels(job),
        "annotations": {n.ANNOTATION_JOB: f"{job.namespace}/{job.name}"},
        **extra,
    }


def namespace(job: n.JobRef, cfg: OperatorConfig) -> dict[str, Any]:
    labels = {
        **n.job_labels(job),
        "pod-security.kubernetes.io/enforce": PSS_LEVEL,
        "pod-security.kubernetes.io/enforce-version": "latest",
        "pod-security.kubernetes.io/audit": PSS_LEVEL,
        "pod-security.kubernetes.io/warn": PSS_LEVEL,
    }
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": sandbox_name(job, cfg),
            "labels": labels,
            "annotations": {n.ANNOTATION_JOB: f"{job.namespace}/{job.name}"},
        },
    }


def s3_endpoint(job: n.JobRef, cfg: OperatorConfig) -> str:
    return job.spec.storage.endpoint or cfg.s3Endpoint


def s3_ip_block(cidr: str, cluster_networks: Sequence[str] = ()) -> dict[str, Any]:
    """An ipBlock for S3 egress with every cloud metadata range and every cluster range (pods,
    Services, nodes: other sandboxes, the API server) inside it excepted. A range that is the block
    itself or contains it stays: that is an S3 the platform runs in the cluster, named on purpose."""
    network = ipaddress.ip_network(cidr, strict=False)
    ranges = [*endpoints.METADATA_NETWORKS, *(ipaddress.ip_network(c, strict=False) for c in cluster_networks)]
    excepted = list(dict.fromkeys(str(m) for m in ranges if m.version == network.version
                                  and m.subnet_of(network) and m != network))
    return {"ipBlock": {"cidr": str(network), **({"except": excepted} if excepted else {})}}


def network_policies(job: n.JobRef, cfg: OperatorConfig) -> list[dict[str, Any]]:
    """Default deny; then DNS (the cluster DNS only), this job's pods among themselves, S3 (the
    configured ranges without the metadata ranges, the configured ports only) and metrics scraping
    from the monitoring namespace."""
    deny = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(job, cfg, "default-deny"),
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }

    def same_sandbox() -> list[dict[str, Any]]:
        return [{"podSelector": {}}]

    cluster_dns = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cfg.clusterDNS.namespace}},
                   "podSelector": {"matchLabels": dict(cfg.clusterDNS.podLabels)}}
    allow = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(job, cfg, "allow-training"),
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": same_sandbox()},
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cfg.monitoringNamespace}}}],
                    "ports": [{"protocol": "TCP", "port": cfg.trainerMetricsPort}],
                },
            ],
            "egress": [
                {"to": same_sandbox()},
                {"to": [cluster_dns], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                {
                    "to": [s3_ip_block(cidr, cfg.clusterNetworks) for cidr in cfg.s3Egress.cidrs],
                    "ports": [{"protocol": "TCP", "port": p} for p in sorted(cfg.s3Egress.ports)],
                },
            ],
        },
    }
    return [deny, allow]


def resource_quota(job: n.JobRef, cfg: OperatorConfig) -> dict[str, Any]:
    """Room for exactly this job: workers pods (twice, for restarts that overlap) and their resources, for
    one run, or for search.parallelism trials at once."""
    res = job.spec.resources
    _, pool = resolve_pool(job, cfg)
    pods = res.workers * job.spec.runs_at_once
    hard = {
        "pods": str(pods * 2),
        "requests.cpu": multiply(res.cpu, pods),
        "limits.cpu": multiply(res.cpu, pods),
        "requests.memory": multiply(res.memory, pods),
        "limits.memory": multiply(res.memory, pods),
        f"requests.{pool.gpuResource}": str(res.gpusPerWorker * pods),
    }
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": object_meta(job, cfg, "finetune-quota"),
        "spec": {"hard": hard},
    }


def limit_range(job: n.JobRef, cfg: OperatorConfig) -> dict[str, Any]:
    res = job.spec.resources

    def per_pod() -> dict[str, str]:
        return {"cpu": str(res.cpu), "memory": str(res.memory)}

    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": object_meta(job, cfg, "finetune-limits"),
        "spec": {
            "limits": [
                {"type": "Container", "max": per_pod(), "default": per_pod(), "defaultRequest": per_pod()},
            ]
        },
    }


def service_account(job: n.JobRef, cfg: OperatorConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": object_meta(job, cfg, n.SERVICE_ACCOUNT),
        "automountServiceAccountToken": False,
    }


def credentials_secret(job: n.JobRef, cfg: OperatorConfig, tenant_secret_data: dict[str, str]) -> dict[str, Any]:
    """Copy of the tenant's S3 credentials (base64 `data` as read), only the AWS_* keys."""
    keys = n.CREDENTIAL_KEYS + n.OPTIONAL_CREDENTIAL_KEYS
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": object_meta(job, cfg, n.CREDENTIALS_SECRET),
        "type": "Opaque",
        "data": {k: tenant_secret_data[k] for k in keys if k in tenant_secret_data},
    }


def local_queue(job: n.JobRef, cfg: OperatorConfig) -> dict[str, Any]:
    """The Kueue LocalQueue of the sandbox: named after the ClusterQueue it feeds (the tenant's, resolved
    against its TenantPolicy), so the PyTorchJob's queue-name label says where the run queues."""
    queue = job.spec.runPolicy.queueName
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": object_meta(job, cfg, queue),
        "spec": {"clusterQueue": queue},
    }


def sandbox_objects(job: n.JobRef, cfg: OperatorConfig, tenant_secret_data: dict[str, str]) -> list[dict[str, Any]]:
    """Everything of the sandbox except the run, in apply order (the namespace first)."""
    return [
        namespace(job, cfg),
        *network_policies(job, cfg),
        resource_quota(job, cfg),
        limit_range(job, cfg),
        service_account(job, cfg),
        credentials_secret(job, cfg, tenant_secret_data),
        *([local_queue(job, cfg)] if job.spec.runPolicy.queueName else []),
    ]
