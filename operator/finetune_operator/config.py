"""The operator's own configuration (platform team's YAML, e.g. operator/config/dev.yaml).

Tenants never see it: it maps node-pool names to scheduling constraints and holds the defaults a
FineTuneJob may leave empty (trainer image, S3 endpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


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
        description="Where the trainer pods may connect for S3 (NetworkPolicy ipBlocks).",
    )
    ports: list[int] = Field(
        default_factory=lambda: [443], description="TCP ports allowed to those CIDRs (plus the endpoint URL's port)."
    )


class OperatorConfig(ConfigModel):
    trainerImage: str = Field(description="Trainer image used when spec.image is empty.")
    imagePullPolicy: str = Field(default="IfNotPresent", description="Pull policy of the trainer container.")
    nodePools: dict[str, NodePool] = Field(description="Node pools a FineTuneJob may name in resources.nodePool.")
    defaultNodePool: str = Field(description="Pool used when resources.nodePool is empty.")
    sandboxPrefix: str = Field(default="ftj", max_length=10, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
                               description="Prefix of sandbox namespace names.")
    s3Endpoint: str = Field(default="", description="S3 endpoint used when spec.storage.endpoint is empty ('' = AWS).")
    s3Egress: S3Egress = Field(default_factory=S3Egress, description="NetworkPolicy egress to S3.")
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
    deletionTimeoutSeconds: float = Field(
        default=300.0, gt=0, description="How long a deletion waits for the sandbox namespace before releasing the finalizer."
    )

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
