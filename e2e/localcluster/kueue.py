"""Kueue in the local cluster: its configuration, its CRDs and webhooks rewritten for a host process,
and the objects tests queue jobs with (ResourceFlavors of the node pools, ClusterQueues, LocalQueues).

Kueue runs out of cluster like the training-operator: the API server calls its webhooks on loopback
(`clientConfig.url`), with a serving certificate of the cluster CA, so Kueue manages no certificate.
Everything here is a pure function of its arguments except `crds` and `webhooks`, which read the
manifests of Kueue's Go module source.
"""

from __future__ import annotations

import base64
import copy
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import nodes
from .node import NODE_TOLERATION
from .node import POOL as LOCAL_POOL

NAMESPACE = "kueue-system"
API_VERSION = "kueue.x-k8s.io/v1beta2"
CONFIG_API_VERSION = "config.kueue.x-k8s.io/v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Only frameworks named group/kind: Kueue's "pod", "deployment" and "statefulset" integrations would
# put a webhook with failurePolicy Fail in front of every pod (or Deployment) of the cluster.
FRAMEWORKS = ("kubeflow.org/pytorchjob", "batch/job")
# Fixed in Kueue's main: without its internal certificate management it reads the metrics server's
# certificate from here (and exits when there is none).
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
WEBHOOK_NAME_PREFIX = "kueue-"
# Flavors named after the node pools they stand for.
LOCAL_FLAVOR = LOCAL_POOL
GPU_TOLERATION = {"key": nodes.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


# ---- Kueue's own configuration ----------------------------------------------------------------------

def configuration(*, webhook_port: int, cert_dir: Path, metrics_port: int, health_port: int,
                  visibility_address: str, visibility_port: int, frameworks: tuple[str, ...] = FRAMEWORKS) -> dict:
    """Kueue's Configuration file for one process on this machine: every server on loopback but the
    visibility API's, which the API server's aggregator reaches through a Service endpoint (and an
    endpoint cannot be a loopback address)."""
    for framework in frameworks:
        _framework_group_resource(framework)
    return {
        "apiVersion": CONFIG_API_VERSION,
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(frameworks)},
        # The visibility API (pending workloads and their positions) behind an APIService: see
        # visibility_objects. Its certificate is read from VISIBILITY_CERT_DIR.
        "featureGates": {"VisibilityOnDemand": True},
        "visibilityServer": {"bindAddress": visibility_address, "bindPort": visibility_port},
    }


# ---- the visibility API, aggregated by the API server --------------------------------------------------------

VISIBILITY_GROUP = "visibility.kueue.x-k8s.io"
VISIBILITY_VERSION = "v1beta2"
VISIBILITY_SERVICE = "visibility-server"  # upstream's name (config/components/visibility/service.yaml)
# Fixed in Kueue's main: without its internal certificate management the visibility server reads its
# serving certificate from here.
VISIBILITY_CERT_DIR = Path("/visibility")


def visibility_dns_name() -> str:
    """The name the aggregator checks the visibility server's certificate against."""
    return f"{VISIBILITY_SERVICE}.{NAMESPACE}.svc"


def visibility_objects(*, address: str, port: int, ca_bundle: bytes) -> list[dict]:
    """What makes the API server serve Kueue's visibility API: upstream's Service without a selector, its
    endpoint (the host process at address:port, the API server routes to endpoints), and upstream's
    APIService, verifying the server's certificate against the cluster CA instead of skipping it."""
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": VISIBILITY_SERVICE, "namespace": NAMESPACE},
               "spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]}}
    endpoints = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": VISIBILITY_SERVICE, "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": VISIBILITY_SERVICE,
                                "endpointslice.kubernetes.io/managed-by": "finetune-local"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    }
    api_service = {
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": f"{VISIBILITY_VERSION}.{VISIBILITY_GROUP}"},
        "spec": {"group": VISIBILITY_GROUP, "version": VISIBILITY_VERSION, "groupPriorityMinimum": 100,
                 "versionPriority": 100, "caBundle": base64.b64encode(ca_bundle).decode(),
                 "service": {"name": VISIBILITY_SERVICE, "namespace": NAMESPACE, "port": 443}},
    }
    return [service, endpoints, api_service]


def _framework_group_resource(framework: str) -> tuple[str, str]:
    """("kubeflow.org", "pytorchjobs") for "kubeflow.org/pytorchjob"."""
    group, slash, kind = framework.partition("/")
    if not slash or not group or not kind:
        raise ValueError(f"framework {framework!r}: only group/kind frameworks are supported")
    return group, kind + "s"


# ---- webhooks and CRDs -----------------------------------------------------------------------------------

def webhook_url(port: int, path: str) -> str:
    return f"https://127.0.0.1:{port}{path}"


def _url_client_config(client_config: dict, *, port: int, ca_bundle: bytes) -> dict:
    return {"url": webhook_url(port, client_config["service"]["path"]),
            "caBundle": base64.b64encode(ca_bundle).decode()}


def _is_kueue_or_framework_webhook(webhook: dict, frameworks: tuple[str, ...]) -> bool:
    served = {_framework_group_resource(f) for f in frameworks}
    for rule in webhook.get("rules", []):
        if "kueue.x-k8s.io" in rule["apiGroups"]:
            return True
        if any((group, resource) in served for group in rule["apiGroups"] for resource in rule["resources"]):
            return True
    return False


def webhook_configurations(manifests: list[dict], *, port: int, ca_bundle: bytes,
                           frameworks: tuple[str, ...] = FRAMEWORKS) -> list[dict]:
    """Kueue's webhook configurations (config/components/webhook/manifests.yaml) for a Kueue on
    loopback: named `kueue-...`, every service reference a URL, only the webhooks of Kueue's own
    objects and of the enabled frameworks (Kueue answers the others with a no-op anyway)."""
    rendered = []
    for manifest in manifests:
        config = copy.deepcopy(manifest)
        config["metadata"] = {"name": WEBHOOK_NAME_PREFIX + manifest["metadata"]["name"]}
        config["webhooks"] = [
            {**webhook, "clientConfig": _url_client_config(webhook["clientConfig"], port=port, ca_bundle=ca_bundle)}
            for webhook in manifest["webhooks"] if _is_kueue_or_framework_webhook(webhook, frameworks)
        ]
        rendered.append(config)
    return rendered


def conversion_crd_names(kustomization: dict) -> set[str]:
    """The CRDs Kueue's CRD kustomization gives a conversion webhook (`patches/webhook_in_<plural>.yaml`)."""
    names = set()
    for patch in kustomization.get("patches", []):
        match = re.fullmatch(r"patches/webhook_in_([a-z]+)\.yaml", patch.get("path", ""))
        if match:
            names.add(f"{match.group(1)}.kueue.x-k8s.io")
    return names


def with_conversion_webhook(crd: dict, *, port: int, ca_bundle: bytes) -> dict:
    """The CRD converting between its versions (v1beta1, v1beta2) through Kueue's /convert."""
    crd = copy.deepcopy(crd)
    crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
        "clientConfig": _url_client_config({"service": {"path": "/convert"}}, port=port, ca_bundle=ca_bundle),
        "conversionReviewVersions": ["v1"]}}
    return crd


def crds(module_dir: Path, *, port: int, ca_bundle: bytes) -> list[dict]:
    """Kueue's CRDs from its module source, converting through the Kueue on `port` where upstream does."""
    crd_dir = module_dir / "config/components/crd"
    converting = conversion_crd_names(yaml.safe_load((crd_dir / "kustomization.yaml").read_text()))
    loaded = [yaml.safe_load(path.read_text()) for path in sorted((crd_dir / "bases").glob("*.yaml"))]
    return [with_conversion_webhook(crd, port=port, ca_bundle=ca_bundle) if crd["metadata"]["name"] in converting
            else crd for crd in loaded]


def webhooks(module_dir: Path, *, port: int, ca_bundle: bytes) -> list[dict]:
    text = (module_dir / "config/components/webhook/manifests.yaml").read_text()
    manifests = [m for m in yaml.safe_load_all(text) if m]
    return webhook_configurations(manifests, port=port, ca_bundle=ca_bundle)


# ---- objects tests queue jobs with ---------------------------------------------------------------------------

def resource_flavor(name: str, node_labels: dict[str, str], tolerations: tuple[dict, ...] = ()) -> dict:
    """A flavor whose admitted pods get `node_labels` as nodeSelector and `tolerations` added."""
    spec: dict = {"nodeLabels": dict(node_labels)}
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    return {"apiVersion": API_VERSION, "kind": "ResourceFlavor", "metadata": {"name": name}, "spec": spec}


def pool_flavor(pool: str, name: str | None = None) -> dict:
    """The flavor of a KWOK node pool (nodes.POOLS: `a100`, `cpu`); a GPU pool's taint is tolerated."""
    by_name = {p.name: p for p in nodes.POOLS}
    if pool not in by_name:
        raise ValueError(f"no KWOK pool {pool!r}; pools: {sorted(by_name)}")
    tolerations = (GPU_TOLERATION,) if by_name[pool].gpus else ()
    return resource_flavor(name or pool, {nodes.POOL_LABEL: pool}, tolerations)


def local_node_flavor(name: str = LOCAL_FLAVOR) -> dict:
    """The flavor of the real node `node-0` (pool `local`, tainted): cpu and memory, no GPU."""
    return resource_flavor(name, {nodes.POOL_LABEL: LOCAL_POOL}, (NODE_TOLERATION,))


def pool_capacity(pool: str) -> dict[str, str]:
    """What all nodes of a KWOK pool hold together, as quota: {"cpu": "192", "memory": "2720Gi", ...}."""
    (p,) = [p for p in nodes.POOLS if p.name == pool]
    memory = re.fullmatch(r"(\d+)(\D*)", p.memory)
    capacity = {"cpu": str(int(p.cpu) * p.count), "memory": f"{int(memory.group(1)) * p.count}{memory.group(2)}"}
    if p.gpus:
        capacity[nodes.GPU_RESOURCE] = str(p.gpus * p.count)
    return capacity


@dataclass(frozen=True)
class Quota:
    nominal: str | int
    borrowing_limit: str | int | None = None
    lending_limit: str | int | None = None

    def resource(self, name: str) -> dict:
        resource = {"name": name, "nominalQuota": str(self.nominal)}
        if self.borrowing_limit is not None:
            resource["borrowingLimit"] = str(self.borrowing_limit)
        if self.lending_limit is not None:
            resource["lendingLimit"] = str(self.lending_limit)
        return resource


def _resource_groups(flavors: dict[str, dict[str, Quota | str | int]]) -> list[dict]:
    """Kueue allows a resource in one resource group only, and every flavor of a group must list all its
    resources: flavors sharing any resource form one group, a resource a flavor lacks gets quota 0."""
    groups: list[tuple[set[str], list[str]]] = []  # (covered resources, flavor names)
    for flavor, quotas in flavors.items():
        resources, members = set(quotas), [flavor]
        for group in [g for g in groups if g[0] & resources]:
            groups.remove(group)
            resources |= group[0]
            members = group[1] + members
        groups.append((resources, members))
    return [{"coveredResources": sorted(covered), "flavors": [
        {"name": flavor, "resources": [_quota(flavors[flavor].get(r, 0)).resource(r) for r in sorted(covered)]}
        for flavor in members]} for covered, members in groups]


def _quota(value: Quota | str | int) -> Quota:
    return value if isinstance(value, Quota) else Quota(value)


def cluster_queue(name: str, flavors: dict[str, dict[str, Quota | str | int]], *, cohort: str | None = None,
                  reclaim_within_cohort: str = "Any", within_cluster_queue: str = "LowerPriority",
                  namespace_selector: dict | None = None) -> dict:
    """A ClusterQueue with quotas per flavor and resource, e.g.
    `cluster_queue("team-a", {"a100": {"nvidia.com/gpu": Quota(8, borrowing_limit=8)}}, cohort="org")`.
    It reclaims what its cohort borrowed and preempts lower priorities in itself; every namespace
    may use it unless `namespace_selector` says otherwise."""
    spec = {
        "namespaceSelector": namespace_selector if namespace_selector is not None else {},
        "resourceGroups": _resource_groups(flavors),
        "preemption": {"reclaimWithinCohort": reclaim_within_cohort, "withinClusterQueue": within_cluster_queue},
    }
    if cohort:
        spec["cohortName"] = cohort
    return {"apiVersion": API_VERSION, "kind": "ClusterQueue", "metadata": {"name": name}, "spec": spec}


def local_queue(name: str, namespace: str, cluster_queue_name: str) -> dict:
    return {"apiVersion": API_VERSION, "kind": "LocalQueue", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterQueue": cluster_queue_name}}


# ---- reading what Kueue did ------------------------------------------------------------------------------------

def owned_workload(workloads: list[dict], owner_kind: str, owner_name: str) -> dict | None:
    """The Workload Kueue made for a job (its owner), from a list of Workloads of the job's namespace."""
    for workload in workloads:
        for owner in workload["metadata"].get("ownerReferences", []):
            if owner["kind"] == owner_kind and owner["name"] == owner_name:
                return workload
    return None


def condition(obj: dict, condition_type: str) -> dict | None:
    """The condition of that type (whatever its status), or None."""
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == condition_type:
            return cond
    return None


def is_true(obj: dict, condition_type: str) -> bool:
    cond = condition(obj, condition_type)
    return bool(cond) and cond["status"] == "True"
