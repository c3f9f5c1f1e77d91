"""The TenantPolicy API (finetune.dev/v1alpha1, cluster-scoped): what a platform team allows a tenant.

A TenantPolicy selects tenant namespaces by label and governs every FineTuneJob in them: which node
pools, images, priority classes, S3 endpoints and S3 locations a job may use, per-job ceilings, how
many jobs may run at once, the Kueue ClusterQueues its runs go to and a GPU-hour budget per period.
Its lists replace the operator-wide allow-lists (OperatorConfig) for the namespaces it selects.
Like the FineTuneJob, the CRD is generated from these models (`make crds`).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetune_operator.api.types import Condition, Quantity, StatusCount, StatusModel, obj_default
from finetune_trainer.config import ApiModel, cel

KIND = "TenantPolicy"
PLURAL = "tenantpolicies"
SINGULAR = "tenantpolicy"
SHORT_NAMES = ["ftp"]

MAX_LIST = 64
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# An s3:// location pattern: `*` matches any run of characters but `/` (s3://team-a-*/models/*).
URI_PATTERN_PATTERN = r"^s3://[a-z0-9*][-a-z0-9.*]*(/[^\s]*)?$"
Name = Annotated[str, Field(max_length=253)]
LabelValue = Annotated[str, Field(max_length=63)]
PoolName = Annotated[str, Field(max_length=63)]
Origin = Annotated[str, Field(max_length=512)]
UriPattern = Annotated[str, Field(max_length=1024, pattern=URI_PATTERN_PATTERN)]
QueueName = Annotated[str, Field(max_length=253, pattern=NAME_PATTERN)]


class LabelSelectorRequirement(ApiModel):
    key: str = Field(max_length=317, description="The label key the requirement applies to.")
    operator: str = Field(description="In, NotIn, Exists or DoesNotExist.",
                          json_schema_extra={"enum": ["In", "NotIn", "Exists", "DoesNotExist"]})
    values: list[LabelValue] = Field(default_factory=list, max_length=MAX_LIST,
                              description="Values for In and NotIn; empty for Exists and DoesNotExist.")


class LabelSelector(ApiModel):
    """A Kubernetes label selector over namespace labels (every requirement must hold)."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("(has(self.matchLabels) && size(self.matchLabels) > 0) || "
         "(has(self.matchExpressions) && size(self.matchExpressions) > 0)",
         "namespaceSelector: set matchLabels or matchExpressions (an empty selector would select every namespace)"),
    ))

    matchLabels: dict[str, LabelValue] = Field(default_factory=dict, max_length=MAX_LIST,
                                        description="Labels a namespace must carry with these values.")
    matchExpressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=MAX_LIST, description="Set-based requirements on namespace labels.")


class PolicyImages(ApiModel):
    registries: list[Name] = Field(
        default_factory=list, max_length=MAX_LIST,
        description="Prefixes (registry/repository) spec.image must start with; empty: spec.image must stay "
        "empty (only the operator's trainer image runs).")
    requireDigest: bool = Field(default=False, description="spec.image must be pinned by digest (@sha256:...).")


class PolicyPriorityClasses(ApiModel):
    model_config = ConfigDict(json_schema_extra=cel(
        ("!has(self.default) || self.default == '' || (has(self.allowed) && self.default in self.allowed)",
         "priorityClasses.default must be one of priorityClasses.allowed"),
    ))

    allowed: list[Name] = Field(default_factory=list, max_length=MAX_LIST,
                                description="PriorityClasses a job may name in runPolicy.priorityClassName.")
    default: str = Field(default="", max_length=253,
                         description="PriorityClass of jobs that name none; empty: none.")


class PolicyStorage(ApiModel):
    endpoints: list[Origin] = Field(
        default_factory=list, max_length=MAX_LIST,
        description="S3 endpoints (scheme://host[:port]; `*.example.com` allows subdomains) a job may name in "
        "spec.storage.endpoint besides the operator's default. Empty: the operator's allowedS3Endpoints.")
    modelURIs: list[UriPattern] = Field(
        default_factory=list, max_length=MAX_LIST,
        description="Patterns spec.model.uri must match, and every other source of weights: method.adapter.uri, "
        "evaluation.candidateModel.uri, "
        "output.combine.adapters[].uri, a content filter's classifier modelUri (`*` matches within one path "
        "segment, a trailing `*` anything below). Empty: any.")
    datasetURIs: list[UriPattern] = Field(
        default_factory=list, max_length=MAX_LIST,
        description="Patterns every URI of data must match: datasets, validation, a content filter's termsUri, "
        "evaluation tasks and evaluation.general. Empty: any.")
    checkpointURIs: list[UriPattern] = Field(
        default_factory=list, max_length=MAX_LIST,
        description="Patterns spec.checkpoint.uri must match when set. Empty: any.")
    outputURIs: list[UriPattern] = Field(
        default_factory=list, max_length=MAX_LIST,
        description="Patterns spec.output.uri must match. Empty: any.")


DEFAULT_DEADLINE_RULE = "limits.defaultActiveDeadlineSeconds must not exceed limits.maxActiveDeadlineSeconds"


class PolicyLimits(ApiModel):
    model_config = ConfigDict(json_schema_extra=cel(
        ("!has(self.maxActiveDeadlineSeconds) || self.maxActiveDeadlineSeconds == 0 || "
         "!has(self.defaultActiveDeadlineSeconds) || "
         "self.defaultActiveDeadlineSeconds <= self.maxActiveDeadlineSeconds",
         DEFAULT_DEADLINE_RULE),
    ))

    maxWorkers: int | None = Field(default=None, ge=1, le=512, description="Most pods a job runs at once: "
                                   "resources.workers (of a search, times search.parallelism).")
    maxGPUsPerWorker: int | None = Field(default=None, ge=0, le=16, description="Most GPUs per pod.")
    maxGPUsPerJob: int | None = Field(default=None, ge=0, le=8192, description="Most GPUs a job uses at once: "
                                      "workers x GPUs per pod (of a search, times search.parallelism).")
    maxCPUPerWorker: Quantity | None = Field(default=None, description="Most CPU per pod (resources.cpu).")
    maxMemoryPerWorker: Quantity | None = Field(default=None, description="Most memory per pod (resources.memory).")
    defaultActiveDeadlineSeconds: int = Field(
        default=0, ge=0, le=31_536_000,
        description="runPolicy.activeDeadlineSeconds of jobs that set none (0: none).")
    maxActiveDeadlineSeconds: int = Field(
        default=0, ge=0, le=31_536_000,
        description="Longest runPolicy.activeDeadlineSeconds a job may ask for; with a maximum, a job must have a "
        "deadline (its own or the default). 0: no maximum.")

    @model_validator(mode="after")
    def _default_deadline_within_the_maximum(self) -> "PolicyLimits":  # the CEL rule's Python twin
        if self.maxActiveDeadlineSeconds and self.defaultActiveDeadlineSeconds > self.maxActiveDeadlineSeconds:
            raise ValueError(DEFAULT_DEADLINE_RULE)
        return self


class BudgetPeriod(str, Enum):
    Day = "Day"
    Week = "Week"
    Month = "Month"


class PolicyBudget(ApiModel):
    gpuHours: float = Field(gt=0, le=10_000_000, description="GPU-hours the tenant's jobs may use per period.")
    period: BudgetPeriod = Field(default=BudgetPeriod.Month,
                                 description="Calendar period in UTC (Day, Week from Monday, Month from the 1st).")


class PolicyKueue(ApiModel):
    clusterQueues: list[QueueName] = Field(
        default_factory=list, min_length=1, max_length=MAX_LIST,
        description="Kueue ClusterQueues the tenant's runs go to; runPolicy.queueName picks one, the first is the "
        "default. The operator creates a LocalQueue for it in each sandbox.")


class TenantPolicySpec(ApiModel):
    """What the tenant namespaces this policy selects may do with FineTuneJobs."""

    namespaceSelector: LabelSelector = Field(description="The tenant namespaces this policy governs.")
    nodePools: list[PoolName] = Field(
        default_factory=list, max_length=MAX_LIST,
        description="Node pools (of the operator's configuration) jobs may use; empty: every pool.")
    images: PolicyImages = Field(**obj_default(PolicyImages), description="Images jobs may run.")
    priorityClasses: PolicyPriorityClasses = Field(**obj_default(PolicyPriorityClasses),
                                                   description="PriorityClasses jobs may use, and a default.")
    storage: PolicyStorage = Field(**obj_default(PolicyStorage), description="S3 endpoints and locations jobs may use.")
    limits: PolicyLimits = Field(**obj_default(PolicyLimits), description="Ceilings per job.")
    maxRunningJobs: int | None = Field(
        default=None, ge=0, le=10_000,
        description="Jobs whose run exists and has not finished (queued, running or suspended) at once, a search "
        "counting as search.parallelism jobs (a search of more is refused); further jobs wait, oldest first. 0: "
        "none starts. Empty: no limit.")
    kueue: PolicyKueue | None = Field(default=None, description="Queue the runs through Kueue.")
    budget: PolicyBudget | None = Field(default=None, description="GPU-hour budget; when used up, new runs wait.")


# ---- status ------------------------------------------------------------------------------------


class JobCounts(StatusModel):
    Pending: StatusCount = Field(default=0, description="Jobs not yet validated or waiting to start.")
    Validating: StatusCount = Field(default=0, description="Jobs whose inputs are being checked.")
    Queued: StatusCount = Field(default=0, description="Jobs waiting (for Kueue, the budget or the running-job limit).")
    Running: StatusCount = Field(default=0, description="Jobs training.")
    Stalled: StatusCount = Field(default=0, description="Jobs whose trainer stopped reporting progress.")
    Suspended: StatusCount = Field(default=0, description="Suspended jobs.")
    Succeeded: StatusCount = Field(default=0, description="Jobs that succeeded.")
    Failed: StatusCount = Field(default=0, description="Jobs that failed.")


class AccountedRun(StatusModel):
    uid: str = Field(description="uid of the FineTuneJob.")
    runId: str = Field(description="Its spec.runId.")
    gpuSeconds: float = Field(description="GPU-seconds of that run already counted in usage.")


class Usage(StatusModel):
    periodStart: str = Field(default="", description="Start of the current budget period (RFC 3339).")
    gpuSeconds: float = Field(default=0.0, description="GPU-seconds used in the current period, deleted jobs included.")
    gpuHours: float = Field(default=0.0, description="gpuSeconds / 3600, rounded.")
    budgetExhausted: bool = Field(default=False, description="Usage reached the budget: new runs wait (BudgetExhausted).")
    accounted: list[AccountedRun] = Field(
        default_factory=list, description="Runs of existing jobs and the GPU-seconds of each counted so far "
        "(what is still to count when they go on).")


class TenantPolicyStatus(StatusModel):
    observedGeneration: int = Field(default=0, description="metadata.generation the status was computed from.")
    conditions: list[Condition] = Field(default_factory=list, max_length=8, description="Ready: the policy is in effect.")
    namespaces: list[str] = Field(default_factory=list, description="Tenant namespaces this policy governs (sorted; at most 100).")
    jobs: JobCounts = Field(default_factory=JobCounts, description="FineTuneJobs in those namespaces, by phase.")
    runningJobs: int = Field(default=0, description="Jobs whose run exists and has not finished, as maxRunningJobs "
                             "counts them (a search as search.parallelism).")
    gpusInUse: int = Field(default=0, description="GPUs requested by the pods of running jobs: runs Running or "
                           "Stalled (not those waiting in Kueue, preempted or suspended), a search's running trials.")
    usage: Usage = Field(default_factory=Usage, description="GPU time in the current budget period.")


class TenantPolicy(BaseModel):
    model_config = ConfigDict(extra="ignore")

    spec: TenantPolicySpec = Field(description="What the selected tenant namespaces may do.")
    status: TenantPolicyStatus | None = Field(default=None, description="What the policy governs, written by the operator.")


def parse_policy_spec(spec: dict) -> TenantPolicySpec:
    return TenantPolicySpec.model_validate(spec)
