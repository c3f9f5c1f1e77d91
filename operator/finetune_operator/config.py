"""The operator's own configuration (platform team's YAML, e.g. operator/config/dev.yaml).

Tenants never see it: it maps node-pool names to scheduling constraints and holds the defaults a
FineTuneJob may leave empty (trainer image, S3 endpoint).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from finetune_operator import endpoints
from finetune_operator import quantity
from finetune_operator.api.tenant import PolicyLimits


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class NodePool(ConfigModel):
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Node labels the training pods select.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations of the training pods.")
    gpuResource: str = Field(default="nvidia.com/gpu", description="Extended resource name of this pool's GPUs.")
    gpusPerNode: int = Field(default=0, ge=0, description="GPUs per node (0: no GPUs); a pod cannot ask for more.")


class S3Egress(ConfigModel):
    cidrs: list[str] = Field(
        default_factory=lambda: ["0.0.0.0/0"],
        description="Where the trainer pods may connect for S3 (NetworkPolicy ipBlocks); the cloud metadata "
        "ranges and the clusterNetworks ranges inside one are excepted from it.",
    )
    ports: list[int] = Field(
        default_factory=lambda: [443],
        description="TCP ports allowed to those CIDRs; an S3 endpoint must use one of them.",
    )

    @field_validator("cidrs")
    @classmethod
    def _cidrs_are_networks(cls, cidrs: list[str]) -> list[str]:
        for cidr in cidrs:
            network = ipaddress.ip_network(cidr, strict=False)
            inside = next((m for m in endpoints.METADATA_NETWORKS
                           if m.version == network.version and network.subnet_of(m)), None)
            if inside is not None:
                raise ValueError(f"s3Egress.cidrs: {cidr} lies inside the metadata range {inside}")
        return cidrs


class ClusterDNS(ConfigModel):
    namespace: str = Field(default="kube-system", description="Namespace of the cluster DNS pods.")
    podLabels: dict[str, str] = Field(default_factory=lambda: {"k8s-app": "kube-dns"},
                                      description="Labels of the cluster DNS pods (the only DNS a sandbox may ask).")


class OperatorConfig(ConfigModel):
    trainerImage: str = Field(description="Trainer image used when spec.image is empty.")
    imagePullPolicy: str = Field(default="IfNotPresent", description="Pull policy of the trainer container when it "
                                 "runs trainerImage.")
    tenantImagePullPolicy: str = Field(
        default="Always", pattern=r"^(Always|IfNotPresent|Never)$",
        description="Pull policy of the trainer container when it runs a job's own spec.image. Always (the default): "
        "the registry checks the sandbox's right to the image on every start, so another tenant's private image "
        "cached on the node is not run from the cache (what the AlwaysPullImages admission plugin does).")
    nodePools: dict[str, NodePool] = Field(description="Node pools a FineTuneJob may name in resources.nodePool.")
    defaultNodePool: str = Field(description="Pool used when resources.nodePool is empty.")
    sandboxPrefix: str = Field(default="ftj", max_length=10, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
                               description="Prefix of sandbox namespace names.")
    s3Endpoint: str = Field(default="", description="S3 endpoint used when spec.storage.endpoint is empty ('' = AWS).")
    s3Egress: S3Egress = Field(default_factory=S3Egress, description="NetworkPolicy egress to S3.")
    allowedS3Endpoints: list[str] = Field(
        default_factory=list,
        description="S3 endpoints a FineTuneJob may name in spec.storage.endpoint besides s3Endpoint: origins "
        "(scheme://host[:port]); a host `*.example.com` allows its subdomains. Empty: only s3Endpoint.")
    clusterNetworks: list[str] = Field(
        default_factory=list,
        description="The cluster's own address ranges (pods, Services, nodes): a tenant's S3 endpoint may not "
        "lead there unless its exact origin is allowed. The API server's address is always excluded.")
    discoverClusterNetworks: bool = Field(
        default=True,
        description="Add to clusterNetworks what the cluster reports of itself, read at start and every "
        "apiServerRefreshSeconds: its Service ranges (ServiceCIDR objects) and each node's pod ranges "
        "(spec.podCIDRs) and addresses (InternalIP, ExternalIP). Needs list on nodes and servicecidrs (the chart "
        "grants it). Pod ranges that a CNI keeps elsewhere (its own IPAM objects) are not seen: name them in "
        "clusterNetworks. An S3 served inside the cluster is then reached only through an s3Egress.cidrs block "
        "narrower than those ranges (its own addresses).")
    clusterDNS: ClusterDNS = Field(default_factory=ClusterDNS, description="The only DNS servers a sandbox may ask.")
    allowedImages: list[str] = Field(
        default_factory=list,
        description="Prefixes (registry/repository) a FineTuneJob's spec.image must start with; empty: spec.image "
        "must stay empty (only trainerImage runs).")
    requireImageDigest: bool = Field(default=False, description="spec.image must be pinned by digest (@sha256:...).")
    tenantIOThreads: int = Field(
        default=32, ge=2, le=256,
        description="Threads for tenants' I/O (S3 checks and document reads, DNS lookups); a tenant holds at most "
        "tenantIOThreadsPerNamespace of them, a tenant holding none is served before one holding some, the "
        "threads held beyond tenants' first are together at most a quarter of these, and free ones go to the "
        "waiting tenants in turn. A tenant is the set of namespaces one TenantPolicy governs, or a namespace no "
        "policy governs. Slow tenants slow the others only when they are three quarters as many as these threads.")
    tenantIOThreadsPerNamespace: int = Field(default=2, ge=1, le=64,
                                             description="Most of tenantIOThreads one tenant holds at once: all the namespaces "
                                             "one TenantPolicy governs together, or one namespace no policy governs.")
    defaultLimits: PolicyLimits = Field(
        default_factory=PolicyLimits,
        description="Per-job ceilings (workers, GPUs, CPU, memory, deadline) and a default deadline for jobs in "
        "namespaces no TenantPolicy governs; a governing policy's limits replace them. A job beyond them is refused "
        "with reason LimitExceeded. Empty: no ceiling.")
    allowedPriorityClasses: list[str] = Field(
        default_factory=list,
        description="PriorityClasses a FineTuneJob may name in runPolicy.priorityClassName; empty: none.")
    allowedClusterQueues: list[str] = Field(
        default_factory=list,
        description="Kueue ClusterQueues a FineTuneJob in a namespace without a TenantPolicy may name in "
        "runPolicy.queueName; empty: none. A TenantPolicy's kueue.clusterQueues replace this list.")
    requireTenantPolicy: bool = Field(
        default=False,
        description="FineTuneJobs in a namespace that no TenantPolicy selects are refused (NoTenantPolicy).")
    maxSharedMemory: str = Field(default="64Gi", description="Upper bound of spec.resources.sharedMemory.")
    scratchSize: str = Field(
        default="100Gi",
        description="Size limit of each training pod's /tmp (emptyDir sizeLimit and ephemeral-storage limit).")
    sweepIntervalSeconds: float = Field(
        default=300.0, gt=0,
        description="How often sandboxes are checked for a FineTuneJob that is gone (a stripped finalizer) or "
        "that moved to another sandbox; those are deleted.")
    monitoringNamespace: str = Field(default="monitoring", description="Namespace allowed to scrape trainer metrics.")
    trainerMetricsPort: int = Field(default=9090, ge=1, le=65535, description="Port of the trainer's metrics endpoint.")
    progressIntervalSeconds: float = Field(default=5.0, gt=0, description="How often the trainer writes progress.json.")
    retryableExitCodes: list[int] = Field(
        default_factory=lambda: [130, 137, 143],
        description="Exit codes that mean 'retry the pod' (with restartPolicy ExitCode the training-operator "
        "restarts on 128-255 and fails on 1-127); used to explain failures in the status.",
    )
    runAsUser: int = Field(default=1000, ge=1, description="UID of the trainer processes (non-root).")
    operatorMetricsPort: int = Field(default=8000, ge=1, le=65535, description="Port of the operator's /metrics.")
    livenessPort: int = Field(default=8080, ge=1, le=65535, description="Port of the operator's /healthz.")
    reconcileIntervalSeconds: float = Field(default=15.0, gt=0, description="Timer period of the level-based reconcile.")
    progressPollSeconds: float = Field(default=10.0, ge=0, description="Minimum seconds between two S3 reads per job.")
    progressStallSeconds: float = Field(
        default=900.0, ge=0, description="A running job whose progress.json is older than this is reported as "
        "ProgressStalled (Running condition reason + Warning event); 0 disables.")
    idleReconcileSeconds: float = Field(
        default=300.0, ge=0, description="Timer period of a job with nothing left to do (its run finished and no "
        "ttlSecondsAfterFinished pending); spec changes and deletion are still handled at once. 0: the normal period.")
    resyncSeconds: float = Field(
        default=600.0, ge=0, description="An unchanged sandbox is applied again after this long (repairs hand edits "
        "inside it); in between, a pass applies only when the desired objects changed. 0: apply on every pass.")
    apiServerRefreshSeconds: float = Field(
        default=300.0, ge=0, description="How often the API server's addresses (EndpointSlice default/kubernetes), "
        "and with discoverClusterNetworks the ranges the cluster reports, are read again; they are excepted from "
        "every sandbox's S3 egress, and managed control planes replace them. 0: read once, at start.")
    deletionTimeoutSeconds: float = Field(
        default=300.0, gt=0, description="How long a deletion waits for the sandbox namespace before releasing the finalizer."
    )

    @field_validator("allowedS3Endpoints")
    @classmethod
    def _endpoints_are_origins(cls, urls: list[str]) -> list[str]:
        for url in urls:
            parsed = endpoints.parse_allowed(url)
            if isinstance(parsed, endpoints.EndpointProblem):
                raise ValueError(f"allowedS3Endpoints: {url!r}: {parsed.message}")
        return urls

    @field_validator("maxSharedMemory", "scratchSize")
    @classmethod
    def _quantities(cls, value: str) -> str:
        quantity.split(value)
        return value

    @field_validator("clusterNetworks")
    @classmethod
    def _networks(cls, cidrs: list[str]) -> list[str]:
        for cidr in cidrs:
            ipaddress.ip_network(cidr, strict=False)
        return cidrs

    @model_validator(mode="after")
    def _default_pool_exists(self) -> "OperatorConfig":
        if self.defaultNodePool not in self.nodePools:
            raise ValueError(f"defaultNodePool {self.defaultNodePool!r} is not one of nodePools {sorted(self.nodePools)}")
        return self

    @classmethod
    def from_yaml(cls, text: str) -> "OperatorConfig":
        return cls.model_validate(yaml.safe_load(text))

    @classmethod
    def load(cls, path: str | Path) -> "OperatorConfig":
        return cls.from_yaml(Path(path).read_text())
