"""The FineTuneJob API (finetune.dev/v1alpha1): typed models, the single source of truth.

The spec sections shared with the trainer (model, datasets, method, ...) are imported from
`finetune_trainer.config`, so the document a user writes and the TrainerConfig the trainer reads
are the same models. The CRD YAML under crds/ is generated from these classes (`make crds`).

Conventions:
* every field has a description (it becomes `kubectl explain` text);
* defaults live here and are applied by the API server from the generated schema, so the
  operator never writes spec;
* rules that involve more than one field are CEL rules (`x-kubernetes-validations`), bounded by
  maxItems / maxLength so the API server accepts their cost.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from finetune_operator.api.search import Search
from finetune_trainer.config import (
    DNS_LABEL_PATTERN,
    EVALUATE_ONLY_RULE as TRAINER_EVALUATE_ONLY_RULE,
    MAX_CONTENT_FILTERS,
    MAX_EVALUATION_TASKS,
    ApiModel,
    Checkpoint,
    Dataset,
    Distributed,
    Evaluation,
    Hyperparameters,
    Method,
    ModelSource,
    Objective,
    Output,
    Preprocessing,
    Stage,
    Storage,
    Validation,
    cel,
)

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["finetune"]

MAX_DATASETS = 32
MAX_STAGES = 16

# A Kubernetes resource quantity without a sign ("8", "500m", "64Gi", "1e3").
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = Annotated[
    Annotated[int, Field(ge=0, strict=True)] | Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)],
    Field(description="A Kubernetes quantity (for example 8, 500m, 64Gi)."),
]
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


def obj_default(model: type[BaseModel]):
    """A field that defaults to the model's defaults, written out in full in the schema: the API
    server evaluates a default against the CEL rules as it is (without nested defaults)."""
    return {"default_factory": model,
            "json_schema_extra": {"default": model().model_dump(mode="json", exclude_none=True)}}


class Resources(ApiModel):
    """Compute for the run: `workers` pods, each with `gpusPerWorker` GPUs on `nodePool`."""

    workers: int = Field(default=1, ge=1, le=512, description="Number of pods (1 Master + workers-1 Workers).")
    gpusPerWorker: int = Field(
        default=1, ge=0, le=16,
        description="GPUs per pod; torchrun starts one process per GPU (one CPU process when 0).",
    )
    nodePool: str = Field(
        default="", max_length=63,
        description="Node pool from the operator's configuration (selects nodes and tolerations); "
        "empty means the operator's default pool.",
    )
    cpu: Quantity = Field(default="4", description="CPU request and limit per pod (a Kubernetes quantity).")
    memory: Quantity = Field(default="16Gi", description="Memory request and limit per pod (a Kubernetes quantity).")
    sharedMemory: Quantity = Field(
        default="2Gi", description="Size of the in-memory /dev/shm volume per pod (data loader and NCCL buffers)."
    )


class Credentials(ApiModel):
    secretName: str = Field(
        max_length=253, pattern=SECRET_NAME_PATTERN,
        description="Name of a Secret in the FineTuneJob's own namespace with non-empty keys AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN), labelled finetune.dev/credentials=true by "
        "its owner (the consent to its use by FineTuneJobs); the operator copies it into the sandbox and keeps the "
        "copy in step with it.",
    )


class RunPolicy(ApiModel):
    backoffLimit: int = Field(
        default=3, ge=0, le=100,
        description="Pod restarts (on retryable exit codes) before the run is marked Failed.",
    )
    activeDeadlineSeconds: int = Field(
        default=0, ge=0, le=31_536_000,
        description="Wall-clock limit of the run in seconds; 0 means no limit.",
    )
    ttlSecondsAfterFinished: int = Field(
        default=0, ge=0, le=31_536_000,
        description="Delete the sandbox namespace this many seconds after the run finished (the "
        "FineTuneJob and its status stay); 0 means keep the sandbox.",
    )
    suspend: bool = Field(
        default=False,
        description="Suspend the run: its pods are removed, checkpoints stay; unsuspending resumes from "
        "the latest checkpoint. With queueName, Kueue suspends the run until it is admitted; a "
        "queued run created suspended is created (and queued) only when unsuspended.",
    )
    queueName: str = Field(
        default="", max_length=63,
        description="Kueue ClusterQueue of the run: one the tenant's TenantPolicy lists (kueue.clusterQueues; "
        "empty: its first) or, without a policy, one of the operator's allowedClusterQueues (empty: none). The "
        "operator creates a LocalQueue of that name in the sandbox.",
    )
    priorityClassName: str = Field(default="", max_length=253,
                                   description="PriorityClass of the training pods: one the operator allows "
                                   "(allowedPriorityClasses); empty means none.")


EVALUATE_ONLY_RULE = "spec." + TRAINER_EVALUATE_ONLY_RULE
EPOCHS_WITH_MAX_STEPS = ("spec.search.parameters.epochs: the trainer ignores epochs when spec.hyperparameters.maxSteps "
                         "> 0, so every trial would train alike: set maxSteps to 0, or search maxSteps instead")

_SPEC_RULES = cel(
    (
        "(has(self.datasets) && size(self.datasets) > 0) || (has(self.stages) && size(self.stages) > 0) || "
        "(has(self.output.combine) && has(self.output.combine.includeTrained) && !self.output.combine.includeTrained) || "
        "(has(self.evaluation) && has(self.evaluation.only) && self.evaluation.only)",
        "spec: set datasets or stages (at least one must be non-empty), or output.combine with includeTrained false "
        "(a combine-only job), or evaluation.only (an evaluate-only job)",
    ),
    (
        "!has(self.evaluation) || !has(self.evaluation.only) || !self.evaluation.only || "
        "(has(self.method) && (has(self.method.adapter) != has(self.evaluation.candidateModel)) && "
        "(!has(self.evaluation.candidateModel) || (has(self.method.type) && self.method.type == 'full')) && "
        "((has(self.evaluation.tasks) && size(self.evaluation.tasks) > 0) || has(self.evaluation.general)) && "
        "(!has(self.datasets) || size(self.datasets) == 0) && (!has(self.stages) || size(self.stages) == 0) && "
        "!has(self.search) && !has(self.output.combine) && (!has(self.output.merge) || !self.output.merge) && "
        "!has(self.evaluation.maxPerplexityRatio))",
        EVALUATE_ONLY_RULE,
    ),
    (
        "!has(self.output.combine) || (has(self.output.combine.includeTrained) && !self.output.combine.includeTrained) "
        "|| !has(self.method) || !has(self.method.type) || self.method.type in ['lora', 'qlora']",
        "spec.output.combine.includeTrained needs method lora or qlora (a LoRA adapter)",
    ),
    (
        "!has(self.stages) || self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
        "spec.stages: stage names must be unique",
    ),
    (
        "!has(self.method) || !has(self.method.type) || self.method.type != 'qlora' || "
        "(has(self.resources) && has(self.resources.gpusPerWorker) && self.resources.gpusPerWorker > 0)",
        "spec.method.type qlora needs spec.resources.gpusPerWorker > 0 (4-bit quantization runs on GPUs)",
    ),
    (
        "!has(self.objective) || self.objective != 'dpo' || !has(self.datasets) || "
        "self.datasets.all(d, has(d.format) && d.format == 'preference')",
        "spec.objective dpo needs every spec.datasets[].format to be preference",
    ),
    (
        "!has(self.stages) || self.stages.all(s, !has(s.objective) || s.objective != 'dpo' || "
        "s.datasets.all(d, has(d.format) && d.format == 'preference'))",
        "spec.stages[]: a stage with objective dpo needs preference datasets",
    ),
    (
        "!has(self.objective) || self.objective != 'dpo' || !has(self.preprocessing) || "
        "!has(self.preprocessing.packing) || !self.preprocessing.packing",
        "spec.preprocessing.packing is not allowed with objective dpo",
    ),
    (
        "!has(self.objective) || self.objective != 'kto' || !has(self.datasets) || "
        "self.datasets.all(d, has(d.format) && d.format == 'feedback')",
        "spec.objective kto needs every spec.datasets[].format to be feedback",
    ),
    (
        "!has(self.datasets) || !self.datasets.exists(d, has(d.format) && d.format == 'feedback') || "
        "(has(self.objective) && self.objective == 'kto')",
        "spec.datasets[].format feedback needs spec.objective kto",
    ),
    (
        "!has(self.stages) || self.stages.all(s, !has(s.objective) || s.objective != 'kto' || "
        "s.datasets.all(d, has(d.format) && d.format == 'feedback'))",
        "spec.stages[]: a stage with objective kto needs feedback datasets",
    ),
    (
        "!has(self.stages) || self.stages.all(s, (has(s.objective) && s.objective == 'kto') || "
        "!s.datasets.exists(d, has(d.format) && d.format == 'feedback'))",
        "spec.stages[]: a stage with feedback datasets needs objective kto",
    ),
    (
        "!has(self.objective) || self.objective != 'kto' || !has(self.preprocessing) || "
        "!has(self.preprocessing.packing) || !self.preprocessing.packing",
        "spec.preprocessing.packing is not allowed with objective kto",
    ),
    (
        "!has(self.method) || !has(self.method.type) || !(self.method.type in ['prefix', 'prompt']) || "
        "!has(self.preprocessing) || !has(self.preprocessing.packing) || !self.preprocessing.packing",
        "spec.preprocessing.packing is not allowed with method prefix or prompt (virtual tokens belong to one row)",
    ),
    (
        "!has(self.evaluation) || !has(self.evaluation.maxPerplexityRatio) || "
        "!has(self.evaluation.compareToBase) || self.evaluation.compareToBase",
        "spec.evaluation.maxPerplexityRatio needs spec.evaluation.compareToBase true",
    ),
    (
        "!has(self.search) || !has(self.stages) || size(self.stages) == 0",
        "spec.search cannot be combined with spec.stages: a search tunes one training run (search a stage as a "
        "job of its own)",
    ),
    (
        "!has(self.search) || !has(self.search.pruning) || !has(self.search.pruning.rule) || "
        "self.search.pruning.rule == 'none' || "
        "(has(self.evaluation) && has(self.evaluation.everySteps) && self.evaluation.everySteps > 0)",
        "spec.search.pruning needs spec.evaluation.everySteps > 0 (the validation loss it prunes on), or "
        "pruning.rule none",
    ),
    (
        "!has(self.search) || !has(self.search.parameters.epochs) || !has(self.hyperparameters) || "
        "!has(self.hyperparameters.maxSteps) || self.hyperparameters.maxSteps == 0",
        EPOCHS_WITH_MAX_STEPS,
    ),
)


class FineTuneJobSpec(ApiModel):
    """Desired state of one fine-tuning run."""

    model_config = ConfigDict(json_schema_extra=_SPEC_RULES)

    runId: str = Field(
        default="1", min_length=1, max_length=20, pattern=DNS_LABEL_PATTERN,
        description="Run identifier (a DNS label). Change it to start a fresh run of the same job "
        "(GitOps re-run): the old run's pods are deleted first.",
    )
    model: ModelSource = Field(description="The base model to fine-tune.")
    datasets: list[Dataset] = Field(
        default_factory=list, max_length=MAX_DATASETS, json_schema_extra={"default": []},
        description="Training datasets; several are mixed by weight (multi-task). Empty when stages are used.",
    )
    validation: Validation = Field(**obj_default(Validation), description="How the validation set is made.")
    preprocessing: Preprocessing = Field(**obj_default(Preprocessing), description="Tokenization and data cleaning.")
    method: Method = Field(**obj_default(Method), description="Fine-tuning method and its settings.")
    objective: Objective = Field(default=Objective.sft, description="Training objective: causal-lm|sft|dpo|kto.")
    hyperparameters: Hyperparameters = Field(**obj_default(Hyperparameters), description="Optimizer and schedule.")
    stages: list[Stage] = Field(
        default_factory=list, max_length=MAX_STAGES, json_schema_extra={"default": []},
        description="Sequential fine-tuning: each stage starts from the previous stage's output. "
        "When set, datasets and objective of the job are not used.",
    )
    resources: Resources = Field(**obj_default(Resources), description="Pods, GPUs and node pool of the run.")
    distributed: Distributed = Field(**obj_default(Distributed), description="Distributed training engine.")
    checkpoint: Checkpoint = Field(**obj_default(Checkpoint), description="Checkpointing (resume after restarts).")
    output: Output = Field(description="Where the trained adapter / model and the run documents are written.")
    evaluation: Evaluation = Field(**obj_default(Evaluation), description="Evaluation and quality gate.")
    credentials: Credentials = Field(description="S3 credentials: a Secret in the FineTuneJob's namespace.")
    storage: Storage = Field(
        **obj_default(Storage),
        description="S3-compatible storage; an empty endpoint means the operator's configured default.",
    )
    image: str = Field(
        default="", max_length=512,
        description="Trainer image override, from a registry prefix the operator allows (allowedImages); empty "
        "means the operator's configured trainer image.",
    )
    runPolicy: RunPolicy = Field(**obj_default(RunPolicy), description="Restarts, deadlines, suspension and queueing.")
    search: Search | None = Field(
        default=None,
        description="Hyperparameter search: run trials with other values of some hyperparameters (each its own "
        "PyTorchJob train-<runId>-t<N>), prune bad ones, promote the best trial's output to output.uri.")

    @property
    def runs_at_once(self) -> int:
        """Runs the job makes at once: a search, search.parallelism trials; any other job, one."""
        return self.search.parallelism if self.search is not None else 1


# ---- status ------------------------------------------------------------------------------------


class Phase(str, Enum):
    Pending = "Pending"
    Validating = "Validating"
    Queued = "Queued"
    Running = "Running"
    Stalled = "Stalled"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Suspended = "Suspended"


class ConditionType(str, Enum):
    Validated = "Validated"
    SandboxReady = "SandboxReady"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Suspended = "Suspended"
    UpToDate = "UpToDate"
    # The conditions kstatus reads (sigs.k8s.io/cli-utils: Flux, kpt, Helm 4's --wait) and
    # `kubectl wait --for=condition=Ready` waits on.
    Ready = "Ready"
    Reconciling = "Reconciling"
    Stalled = "Stalled"


class StatusModel(BaseModel):
    """Status models: written by the operator, read leniently."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, use_enum_values=True)


# metav1.Condition's validation (k8s.io/apimachinery/pkg/apis/meta/v1/types.go), so that a condition the
# operator writes is one every Kubernetes tool can read.
CONDITION_TYPE_PATTERN = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                          r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$")
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
MAX_CONDITION_REASON = 128   # metav1 allows 1024; ours are short CamelCase words
MAX_CONDITION_MESSAGE = 4096  # metav1 allows 32768
MAX_COUNT = 2**53       # counts in a status (from the trainer's documents too): what JSON numbers hold exactly
StatusCount = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class Condition(StatusModel):
    """One aspect of the object's state, in the shape and with the validation of metav1.Condition."""

    type: str = Field(max_length=316, pattern=CONDITION_TYPE_PATTERN,
                      description="Condition type (Validated, SandboxReady, Running, Succeeded, Failed, Suspended, "
                      "UpToDate, Ready, Reconciling, Stalled).")
    status: str = Field(description="True, False or Unknown.", json_schema_extra={"enum": ["True", "False", "Unknown"]})
    reason: str = Field(min_length=1, max_length=MAX_CONDITION_REASON, pattern=CONDITION_REASON_PATTERN,
                        description="CamelCase reason of the last transition or update.")
    message: str = Field(max_length=MAX_CONDITION_MESSAGE, description="Human-readable details (may be empty).")
    observedGeneration: StatusCount = Field(default=0, description="metadata.generation the condition was computed from.")
    lastTransitionTime: str = Field(max_length=64, description="When status last changed (RFC 3339).",
                                    json_schema_extra={"format": "date-time"})


MAX_STATUS_URI = 256  # a dataset's URI in the status (the data report in S3 has it whole)


class DatasetLossStatus(StatusModel):
    stage: str = Field(default="", max_length=63, description="Name of the stage (main for a job without stages).")
    index: StatusCount = Field(default=0, description="Position of the dataset in the stage's datasets.")
    uri: str = Field(default="", max_length=MAX_STATUS_URI,
                     description=f"The dataset's S3 URI (cut to {MAX_STATUS_URI} characters).")
    loss: float | None = Field(default=None, description="Its training loss in the latest optimizer step that "
                               "trained on it (preprocessing.multiTask.strategy interleave).")
    steps: StatusCount = Field(default=0, description="Optimizer steps so far that trained on it.")


class ProgressStatus(StatusModel):
    step: int = Field(default=0, description="Optimizer steps done.")
    totalSteps: int = Field(default=0, description="Optimizer steps planned.")
    epoch: float = Field(default=0.0, description="Fractional epoch.")
    percent: float = Field(default=0.0, description="step / totalSteps in percent.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    evalLoss: float | None = Field(default=None, description="Latest validation loss.")
    learningRate: float | None = Field(default=None, description="Current learning rate.")
    tokensPerSecond: float | None = Field(default=None, description="Training throughput over all processes.")
    etaSeconds: int | None = Field(default=None, description="Estimated seconds to the end of training.")
    updatedAt: str = Field(default="", description="When the trainer wrote the progress document (RFC 3339).")
    datasetLosses: list[DatasetLossStatus] | None = Field(
        default=None, max_length=MAX_DATASETS * MAX_STAGES,
        description="Per dataset, its latest training loss, so each task is seen to learn (interleaved multi-task).")


MAX_TRIALS_IN_STATUS = 100  # a dataset's URI in the status (the data report in S3 has it whole)


class PiiStatus(StatusModel):
    email: StatusCount = Field(default=0, description="E-mail addresses replaced by [EMAIL].")
    phone: StatusCount = Field(default=0, description="Phone numbers replaced by [PHONE].")
    ip: StatusCount = Field(default=0, description="IPv4 and IPv6 addresses replaced by [IP].")
    card: StatusCount = Field(default=0, description="Payment card numbers replaced by [CARD].")
    key: StatusCount = Field(default=0, description="Secret keys, tokens and private key blocks replaced by [KEY].")


class DatasetDataStatus(StatusModel):
    uri: str = Field(default="", max_length=MAX_STATUS_URI,
                     description=f"The dataset's S3 URI (cut to {MAX_STATUS_URI} characters).")
    rowsRead: StatusCount = Field(default=0, description="Non-empty rows read.")
    rowsKept: StatusCount = Field(default=0, description="Rows kept for training or validation after every filter.")
    droppedTooShort: StatusCount = Field(default=0, description="Rows dropped by the length filter: fewer tokens than "
                                 "preprocessing.minTokens, or no trainable tokens left after truncation.")
    truncated: StatusCount = Field(default=0, description="Kept rows cut to preprocessing.maxSeqLength tokens.")
    duplicatesExact: StatusCount = Field(default=0, description="Rows dropped as exact duplicates.")
    duplicatesNormalised: StatusCount = Field(default=0,
                                      description="Rows dropped as duplicates after normalising case, whitespace and punctuation.")
    piiReplaced: PiiStatus = Field(default_factory=PiiStatus, description="PII replacements by kind (preprocessing.redactPII).")
    validationRows: StatusCount = Field(default=0, description="Kept rows held out for validation.")
    validationOverlapDropped: StatusCount = Field(default=0,
                                          description="Held-out rows dropped for sharing most of their word 8-grams with training rows.")
    trainTokens: StatusCount = Field(default=0, description="Tokens of the dataset's training rows (before mixing).")
    targetTokens: StatusCount = Field(default=0, description="Training tokens the loss is taken on.")
    droppedByContentFilters: StatusCount = Field(default=0, description="Rows dropped by a content filter (action drop).")
    flaggedByContentFilters: StatusCount = Field(default=0,
                                         description="Rows kept but flagged by a content filter (action flag).")


class ContentFilterStatus(StatusModel):
    name: str = Field(default="", max_length=63, description="The filter's name (preprocessing.contentFilters[].name).")
    rowsDropped: StatusCount = Field(default=0, description="Rows it dropped over the stage's datasets (action drop).")
    rowsFlagged: StatusCount = Field(default=0, description="Rows it flagged and kept (action flag).")


class OverlapStatus(StatusModel):
    rowsChecked: StatusCount = Field(default=0, description="Validation rows compared with the training rows.")
    rowsOverlapping: StatusCount = Field(default=0, description="Validation rows sharing at least one word 8-gram with training.")
    rowsDropped: StatusCount = Field(default=0, description="Validation rows dropped for sharing at least half of their 8-grams.")


class StageDataStatus(StatusModel):
    stage: str = Field(default="", max_length=63, description="Name of the stage (main for a job without stages).")
    rowsRead: StatusCount = Field(default=0, description="Rows read from the stage's datasets.")
    rowsDropped: StatusCount = Field(default=0,
                             description="Rows dropped: too short, no trainable tokens, duplicates, validation overlap, "
                             "content filters.")
    trainSequences: StatusCount = Field(default=0, description="Training sequences after mixing (and packing).")
    validationSequences: StatusCount = Field(default=0, description="Validation sequences after the overlap check.")
    trainTokens: StatusCount = Field(default=0, description="Tokens of the training sequences: trained on once per epoch.")
    targetTokens: StatusCount = Field(default=0, description="Training tokens the loss is taken on.")
    validationOverlap: OverlapStatus = Field(default_factory=OverlapStatus, description="Validation rows that leak from training.")
    packed: bool = Field(default=False, description="Training rows were packed into sequences of maxSeqLength.")
    datasets: list[DatasetDataStatus] = Field(default_factory=list, max_length=MAX_DATASETS,
                                              description="Per dataset, in the order of the spec.")
    contentFilters: list[ContentFilterStatus] = Field(
        default_factory=list, max_length=MAX_CONTENT_FILTERS,
        description="Per content filter, in the order of the spec: rows dropped and flagged (the data report "
        "in S3 has redacted examples).")


class DataStatus(StatusModel):
    stages: list[StageDataStatus] = Field(default_factory=list, max_length=MAX_STAGES,
                                          description="Per stage, in training order (one for a job without stages).")


class CheckpointStatus(StatusModel):
    step: int = Field(description="Optimizer step of the checkpoint.")
    uri: str = Field(description="S3 prefix of the checkpoint.")
    time: str = Field(default="", description="When it was completed (RFC 3339).")


class TaskEvaluationStatus(StatusModel):
    name: str = Field(default="", max_length=63, description="The task (evaluation.tasks[].name).")
    metric: str = Field(default="", max_length=63, description="The task's headline metric: its gate's, else its first metric, else its first check.")
    base: float | None = Field(default=None, description="The base model's score (0 to 1; with compareToBase).")
    tuned: float | None = Field(default=None, description="The tuned model's score (0 to 1).")
    delta: float | None = Field(default=None, description="tuned - base.")


class EvaluationStatus(StatusModel):
    basePerplexity: float | None = Field(default=None,
                                         description="Validation perplexity of the base model (with compareToBase).")
    perplexity: float | None = Field(default=None, description="Validation perplexity of the tuned model.")
    generalBasePerplexity: float | None = Field(
        default=None, description="Forgetting check (evaluation.general): general-domain perplexity of the base model.")
    generalPerplexity: float | None = Field(
        default=None, description="Forgetting check: general-domain perplexity of the tuned model.")
    tasks: list[TaskEvaluationStatus] | None = Field(
        default=None, max_length=MAX_EVALUATION_TASKS,
        description="Per evaluation task, its headline metric, base against tuned (every metric is in the report).")
    headline: str | None = Field(default=None, max_length=128,
                                 description="The first task's headline metric, as `kubectl get -o wide` shows it.")
    reportUri: str | None = Field(default=None, max_length=2048,
                           description="S3 prefix of the evaluation report (report.md, report.html, plots).")


class OutputStatus(StatusModel):
    adapterUri: str | None = Field(default=None, description="S3 prefix of the trained adapter (or full weights).")
    mergedUri: str | None = Field(default=None, description="S3 prefix of the merged model (output.merge).")
    combinedUri: str | None = Field(default=None, description="S3 prefix of the combined adapter (output.combine).")


class QueueStatus(StatusModel):
    clusterQueue: str = Field(default="", description="Kueue ClusterQueue the run queues in.")
    workload: str = Field(default="", description="Kueue Workload of the run (in the sandbox namespace).")
    admitted: bool = Field(default=False, description="Kueue admitted the run (it may have pods).")
    reason: str = Field(default="", description="Kueue's reason for the run's state (Pending, Admitted, Preempted, ...).")
    message: str = Field(default="", max_length=4096, description="Kueue's message, such as which quota is short.")
    workloadsAhead: int | None = Field(
        default=None, ge=0, description="Workloads ahead of the run in its ClusterQueue while it waits (0: next in "
        "line), from Kueue's visibility API; absent when Kueue does not serve it or the run is not pending.")


class TrialPhase(str, Enum):
    Pending = "Pending"
    Running = "Running"
    Succeeded = "Succeeded"
    Pruned = "Pruned"
    Failed = "Failed"


# Validation points kept per trial in the status (search.study.kept_history keeps fewer than 50 of the
# trainer's 1000; the trial's progress.json has those).
MAX_TRIAL_HISTORY = 64


class TrialPoint(StatusModel):
    step: StatusCount = Field(description="Optimizer step of the evaluation.")
    value: float = Field(description="The search metric at that step.")


class TrialStatus(StatusModel):
    number: StatusCount = Field(description="Trial number (0, 1, ...): its PyTorchJob is train-<runId>-t<number>.")
    parameters: dict[str, float] = Field(default_factory=dict, description="The hyperparameters of this trial.")
    phase: TrialPhase = Field(default=TrialPhase.Pending, description="Pending (not training yet or now: to be "
                              "made, waiting for Kueue to admit it, its pods starting, or suspended)|Running|Succeeded|"
                              "Pruned|Failed.")
    value: float | None = Field(default=None, description="The trial's result: the metric of its final evaluation.")
    bestValue: float | None = Field(default=None, description="The best metric value the trial reported so far.")
    step: StatusCount = Field(default=0, description="The latest step the trial reported a validation value for.")
    pruned: bool = Field(default=False, description="Stopped early by the pruning rule.")
    history: list[TrialPoint] = Field(default_factory=list, max_length=MAX_TRIAL_HISTORY,
                                      description="The metric at evaluation steps: the first 16 evaluations, "
                                      "then four per doubling of the step (every trial keeps the same steps, "
                                      "where pruning compares them), each successive-halving rung's, and the "
                                      "latest.")
    gpuSeconds: float = Field(default=0.0, description="GPU time of the trial's pods, including pods gone since.")
    gpuSecondsSettled: float = Field(default=0.0, description="GPU time of the trial's pods that are gone.")
    preemptions: StatusCount = Field(default=0, description="Times Kueue preempted the trial (it resumed from its "
                                     "latest checkpoint).")
    gpuPodSeconds: dict[str, float] = Field(default_factory=dict, max_length=1024, description="GPU time of each "
                                            "of the trial's current pods, by pod uid.")
    message: str = Field(default="", max_length=1024, description="Why the trial was pruned or failed.")


class BestTrialStatus(StatusModel):
    number: StatusCount = Field(description="The best trial so far.")
    value: float = Field(description="Its metric value.")
    parameters: dict[str, float] = Field(default_factory=dict, description="Its hyperparameters.")


class SearchStatus(StatusModel):
    metric: str = Field(default="", description="The metric the search optimises (evalLoss or perplexity).")
    progress: str = Field(default="", max_length=64, description="Finished trials / planned trials, for kubectl get.")
    planned: StatusCount = Field(default=0, description="Trials the search will run.")
    running: StatusCount = Field(default=0, description="Trials with a PyTorchJob that has not finished.")
    succeeded: StatusCount = Field(default=0, description="Trials that ran to their end.")
    pruned: StatusCount = Field(default=0, description="Trials stopped early by the pruning rule.")
    failed: StatusCount = Field(default=0, description="Trials that failed.")
    trials: list[TrialStatus] = Field(default_factory=list, max_length=MAX_TRIALS_IN_STATUS,
                                      description="Every trial, by number.")
    best: BestTrialStatus | None = Field(default=None, description="The best finished trial so far.")
    promoted: bool = Field(default=False, description="The best trial's output was copied to output.uri.")
    reportUri: str | None = Field(default=None, description="The search report (Markdown; JSON and the plot next to it).")


class FineTuneJobStatus(StatusModel):
    """Observed state; the conditions are the truth, phase is a summary for humans."""

    observedGeneration: int = Field(default=0, description="metadata.generation of the last reconciled spec.")
    phase: Phase = Field(default=Phase.Pending, description="Summary: Pending|Validating|Queued|Running|Stalled|Succeeded|Failed|Suspended.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16, description="Current conditions, one per type.")
    runId: str = Field(default="", description="The spec.runId this status describes.")
    sandboxNamespace: str | None = Field(default=None, description="Namespace holding the run's objects (once it exists).")
    pytorchJob: str | None = Field(default=None, description="Name of the PyTorchJob in the sandbox namespace.")
    startTime: str | None = Field(default=None, description="When the run started (RFC 3339).")
    completionTime: str | None = Field(default=None, description="When the run finished (RFC 3339).")
    restarts: int = Field(default=0, description="Container restarts of the run's pods.")
    gpuSeconds: float = Field(default=0.0, description="GPU time used by the run's pods (running time x GPUs), "
                              "including pods gone since (preempted, suspended, restarted).")
    gpuSecondsSettled: float = Field(default=0.0, description="GPU time of the run's pods that are gone, at the "
                                     "last value the operator saw of each.")
    gpuPodSeconds: dict[str, float] = Field(default_factory=dict, max_length=1024, description="GPU time of each of "
                                            "the run's current pods, by pod uid (settled once the pod is gone).")
    progress: ProgressStatus | None = Field(default=None, description="Training progress (from progress.json).")
    data: DataStatus | None = Field(
        default=None, description="What preprocessing did to the training data: rows read, dropped, de-duplicated, "
        "redacted and held out, and tokens trained on, per stage and dataset (a summary of the run's data-report.json).")
    checkpoints: list[CheckpointStatus] = Field(default_factory=list, max_length=100, description="Complete checkpoints, oldest first.")
    latestCheckpoint: str | None = Field(default=None, description="S3 prefix of the newest complete checkpoint.")
    resumedFromStep: int | None = Field(default=None, description="Step the run resumed from after a restart (0: fresh start).")
    preemptions: int = Field(default=0, description="Times Kueue preempted the run (it resumed from its latest checkpoint).")
    queue: QueueStatus | None = Field(default=None, description="What Kueue says about the run (runs with a queue; "
                                      "a search: its first trial waiting for admission, else its first active one).")
    tenantPolicy: str | None = Field(default=None, description="The TenantPolicy governing the job's namespace.")
    evaluation: EvaluationStatus | None = Field(
        default=None, description="The run's evaluation, base model against tuned (a summary of its "
        "evaluation.json): validation perplexities, each task's headline metric, the forgetting check's general "
        "perplexities, and where the evaluation report is.")
    output: OutputStatus | None = Field(default=None, description="Where the results were written.")
    search: SearchStatus | None = Field(default=None, description="The hyperparameter search (spec.search): its trials "
                                        "and the best one.")


class FineTuneJob(BaseModel):
    """The whole object as the CRD describes it (used to generate the schema)."""

    model_config = ConfigDict(extra="ignore")

    spec: FineTuneJobSpec = Field(description="Desired state of the fine-tuning run.")
    status: FineTuneJobStatus | None = Field(default=None, description="Observed state, written by the operator.")


def parse_spec(spec: dict) -> FineTuneJobSpec:
    """Parse a spec as stored by the API server (defaults applied); raises pydantic.ValidationError."""
    return FineTuneJobSpec.model_validate(spec)
