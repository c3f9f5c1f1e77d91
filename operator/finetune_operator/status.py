"""Status derivation: (FineTuneJob, what one reconcile pass observed) -> the new status, in memory.

Pure functions only. The conditions are the truth; `phase` is a one-word summary of them.
A condition's lastTransitionTime changes only when its status flips. Run-scoped fields (progress, data,
checkpoints, evaluation, output, times) are reset when spec.runId changes, and carried over from
the previous status when this pass did not read the trainer's documents (rate limit, S3 error).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from finetune_operator.api.types import CONDITION_REASON_PATTERN, MAX_CONDITION_MESSAGE, MAX_CONDITION_REASON
from finetune_operator.api.types import ConditionType as C
from finetune_operator.api.types import (MAX_CONTENT_FILTERS, MAX_COUNT, MAX_DATASETS, MAX_EVALUATION_TASKS, MAX_STAGES,
                                         MAX_STATUS_URI, ContentFilterStatus, DatasetDataStatus, FineTuneJobStatus, OverlapStatus, Phase,
                                         PiiStatus, StageDataStatus)
from finetune_operator.kueue import QueueState, describe_wait
from finetune_operator.validation import TRANSIENT_REASONS, Problem
from finetune_trainer.config import DataSummary, EvaluationResult, Progress, RunResult

SANDBOX_ABSENT = "absent"
SANDBOX_ACTIVE = "active"
SANDBOX_TERMINATING = "terminating"
SANDBOX_EXPIRED = "expired"  # deleted after ttlSecondsAfterFinished

RUN_SCOPED = ("search", "startTime", "completionTime", "restarts", "gpuSeconds", "gpuSecondsSettled", "gpuPodSeconds",
              "progress", "checkpoints", "latestCheckpoint", "resumedFromStep", "data", "evaluation", "output", "pytorchJob", "preemptions", "queue")
# Running=False reasons of a job that waits to start (its phase is Queued).
WAITING_REASONS = ("BudgetExhausted", "RunningJobLimit", "Queued", "Preempted")


@dataclass
class Observation:
    """Everything one reconcile pass saw or did that the status depends on."""

    now: datetime
    problems: list[Problem] = field(default_factory=list)
    sandbox: str = ""
    sandbox_state: str = SANDBOX_ABSENT
    applied: bool = False  # the sandbox objects were applied in this pass
    pytorchjob: dict[str, Any] | None = None  # the current run's PyTorchJob as read
    pods: list[dict[str, Any]] = field(default_factory=list)
    # The training-operator's ExitedWithCode events of the current run's PyTorchJob: it deletes and
    # recreates a failed pod within a second, so the pods alone miss most restarts.
    exit_events: list[dict[str, Any]] = field(default_factory=list)
    gpu_resource: str = "nvidia.com/gpu"
    progress: Progress | None = None  # None: not read in this pass
    evaluation: EvaluationResult | None = None
    result: RunResult | None = None
    spec_drift: bool = False  # the spec changed after the run was created (needs a new runId)
    replacing_run: str = ""  # an older runId whose objects are being deleted first
    stall_after_seconds: float = 0.0  # Running with progress older than this is reported (0: never)
    queue: QueueState | None = None  # what Kueue's Workload of the run says
    hold: Problem | None = None  # why the run may not start yet (the tenant's budget or running-job limit)
    tenant_policy: str = ""  # the TenantPolicy governing the job's namespace
    search: Any = None  # search.driver.SearchObservation of a job with spec.search


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_id_of(raw_spec: dict[str, Any]) -> str:
    """spec.runId of a stored object ("1" is the schema's default; kept for objects made before it)."""
    return str(raw_spec.get("runId") or "1")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


# ---- conditions ----------------------------------------------------------------------------------


# A condition's reason: CamelCase (metav1.Condition's pattern), bounded like the CRD; the API refuses
# anything else.
REASON = re.compile(CONDITION_REASON_PATTERN)


def safe_reason(reason: str, fallback: str = "Failed") -> str:
    """A reason the API accepts: the trainer's result.json is the tenant's to write."""
    return reason if len(reason) <= MAX_CONDITION_REASON and REASON.match(reason) else fallback


def set_condition(conditions: list[dict[str, Any]], type_: str, status: bool | None, reason: str, message: str,
                  generation: int, now: datetime) -> list[dict[str, Any]]:
    """Return conditions with `type_` set; lastTransitionTime kept unless the status flips."""
    value = "Unknown" if status is None else ("True" if status else "False")
    reason = safe_reason(reason)
    previous = next((c for c in conditions if c.get("type") == type_), None)
    transition = previous["lastTransitionTime"] if previous and previous.get("status") == value and \
        previous.get("lastTransitionTime") else rfc3339(now)
    new = {"type": type_, "status": value, "reason": reason, "message": message[:MAX_CONDITION_MESSAGE],
           "observedGeneration": generation, "lastTransitionTime": transition}
    return [c for c in conditions if c.get("type") != type_] + [new]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c.get("type") == type_), None)


def is_true(status: dict[str, Any], type_: str) -> bool:
    c = condition(status, type_)
    return bool(c and c.get("status") == "True")


def running_since(conditions: list[dict[str, Any]]) -> datetime | None:
    """When Running last turned True (None while it is not True)."""
    running = condition({"conditions": conditions}, C.Running.value) or {}
    return parse_time(running.get("lastTransitionTime")) if running.get("status") == "True" else None


def heartbeat(progress: dict[str, Any] | None, since: datetime | None) -> datetime | None:
    """The stall clock: the trainer's latest progress, or the time the run last started running if later.

    A run resumed after a suspension, a Kueue preemption or a pod restart gets a fresh window from
    the moment it runs again, instead of being judged by the progress it wrote before it stopped.
    """
    return max((t for t in (parse_time((progress or {}).get("updatedAt")), since) if t), default=None)


def ptj_condition(ptj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    if not ptj:
        return None
    for c in (ptj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


# ---- pods ----------------------------------------------------------------------------------------


def pod_restarts(pods: list[dict[str, Any]]) -> int:
    restarts = 0
    for pod in pods:
        status = pod.get("status") or {}
        restarts += sum(int(cs.get("restartCount") or 0) for cs in status.get("containerStatuses") or [])
        if status.get("phase") == "Failed":
            restarts += 1
    return restarts


EXITED_WITH_CODE = re.compile(r"exited with code (\d+)")


def restarts_from_events(events: list[dict[str, Any]], retryable_exit_codes: list[int] | None = None) -> int:
    """Pod restarts the training-operator made: its ExitedWithCode events with a retryable code
    (an event repeated for the same pod and code is one object whose `count` grows)."""
    total = 0
    for event in events:
        match = EXITED_WITH_CODE.search(event.get("message") or "")
        if match and _retryable(int(match.group(1)), retryable_exit_codes):
            total += int(event.get("count") or 1)
    return total


def _retryable(code: int, retryable_exit_codes: list[int] | None) -> bool:
    return code in (retryable_exit_codes or []) or code >= 128


def _pod_gpus(pod: dict[str, Any], gpu_resource: str) -> int:
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        limits = (c.get("resources") or {}).get("limits") or {}
        try:
            total += int(str(limits.get(gpu_resource, 0)))
        except ValueError:
            continue
    return total


def pod_gpu_seconds(pods: list[dict[str, Any]], gpu_resource: str, now: datetime) -> float:
    """Running time x GPUs of the pods seen (a pod that finished counts until its containers ended)."""
    total = 0.0
    for pod in pods:
        gpus = _pod_gpus(pod, gpu_resource)
        status = pod.get("status") or {}
        start = parse_time(status.get("startTime"))
        if not gpus or not start:
            continue
        ends = [parse_time(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt"))
                for cs in status.get("containerStatuses") or []]
        ends = [e for e in ends if e]
        end = max(ends) if ends and status.get("phase") in ("Succeeded", "Failed") else now
        total += max((end - start).total_seconds(), 0.0) * gpus
    return total


def pod_gpu_times(pods: list[dict[str, Any]], gpu_resource: str, now: datetime) -> dict[str, float]:
    """GPU time of each pod with GPUs, by uid (a pod recreated under the same name is another pod)."""
    times = {(p.get("metadata") or {}).get("uid") or (p.get("metadata") or {}).get("name") or str(i):
             pod_gpu_seconds([p], gpu_resource, now) for i, p in enumerate(pods)}
    return {uid: seconds for uid, seconds in times.items() if seconds > 0}


def account_gpu_seconds(record: dict[str, Any], seen: dict[str, float]) -> None:
    """Add the GPU time of the pods seen to a run's (or trial's) record: a pod that is gone (preempted,
    suspended, recreated) is settled at the last value seen of it, and new pods count on top."""
    before = {str(k): float(v) for k, v in (record.get("gpuPodSeconds") or {}).items()}
    settled = float(record.get("gpuSecondsSettled") or 0.0) + sum(v for k, v in before.items() if k not in seen)
    current = {k: round(max(v, before.get(k, 0.0)), 1) for k, v in seen.items()}
    record["gpuSecondsSettled"] = round(settled, 1)
    record["gpuPodSeconds"] = current
    record["gpuSeconds"] = round(max(float(record.get("gpuSeconds") or 0.0), settled + sum(current.values())), 1)


def failed_exit_code(pods: list[dict[str, Any]]) -> int | None:
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            code = ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")
            if code:
                return int(code)
    return None


def unschedulable_pod(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(pod name, the scheduler's message) of the first pod the scheduler cannot place."""
    for pod in pods:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return (pod.get("metadata") or {}).get("name", ""), c.get("message") or "no node fits the pod"
    return None


# Why a container of a run's pod cannot start, as the kubelet says it (containerStatuses[].state.waiting):
# such a pod keeps the run from training even when its PyTorchJob says Running (its Master runs and waits
# for the others in the rendezvous). Each is also the Running=False reason that reports it (phase Pending).
CONTAINER_FAILURE_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                             "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                             "CrashLoopBackOff")
# Normal while a pod starts (pulling a multi-GB image takes minutes): reported once the pod has been
# starting for longer than SLOW_START_SECONDS (mounts that fail, a registry that does not answer).
CONTAINER_SLOW_REASONS = ("ContainerCreating", "PodInitializing")
SLOW_START_SECONDS = 600
POD_WAITING_REASONS = CONTAINER_FAILURE_REASONS + CONTAINER_SLOW_REASONS
# Running=False reasons of a run whose pods cannot be placed or started (its phase is Pending).
PENDING_REASONS = ("Unschedulable", *POD_WAITING_REASONS)
# Every reason of the Running condition, by its status (docs/api.md lists them; test_op_status holds the
# two, and these and the code, together).
RUNNING_TRUE_REASONS = ("Training", "ProgressStalled", "Searching")
RUNNING_FALSE_REASONS = ("NotStarted", "Starting", *WAITING_REASONS, *PENDING_REASONS, "Restarting", "ReplacingRun",
                         "Promoting", "Suspended", "Finished")
MAX_KUBELET_MESSAGE = 512  # of the kubelet's message in the condition (an image pull error can be long)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]+")


def waiting_container(pods: list[dict[str, Any]], now: datetime) -> tuple[str, str] | None:
    """(reason, message) of the first container (init containers first) that waits for a reason in
    POD_WAITING_REASONS; the message names the pod and the container and quotes the kubelet, cut and
    on one line (the image and its pull error are the tenant's to choose)."""
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") not in (None, "Pending", "Running"):
            continue
        starting_since = parse_time(status.get("startTime")) or parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            slow = reason in CONTAINER_SLOW_REASONS and starting_since is not None and \
                (now - starting_since).total_seconds() > SLOW_START_SECONDS
            if reason in CONTAINER_FAILURE_REASONS or slow:
                said = CONTROL_CHARACTERS.sub(" ", str(waiting.get("message") or "")).strip()[:MAX_KUBELET_MESSAGE]
                since = f" since {rfc3339(starting_since)}" if slow else ""
                return reason, (f"pod {(pod.get('metadata') or {}).get('name', '')} container {cs.get('name', '')}: "
                                f"{reason}{since}" + (f": {said}" if said else ""))
    return None


# ---- derivation ----------------------------------------------------------------------------------


def _finite(value: float | None) -> float | None:
    """NaN and infinities (a diverged loss, a zero-throughput ETA) are not JSON: report them as absent."""
    return value if value is not None and math.isfinite(value) else None


def _rounded(value: float | None, digits: int) -> float | None:
    """Readable numbers for `kubectl get` (the trainer's metrics endpoint has the full precision)."""
    finite = _finite(value)
    return None if finite is None else round(finite, digits)


def _progress_status(progress: Progress, succeeded: bool) -> dict[str, Any]:
    percent = 100.0 if succeeded else (
        round(min(progress.step / progress.totalSteps, 1.0) * 100, 1) if progress.totalSteps > 0 else 0.0)
    out = {
        "step": progress.step,
        "totalSteps": progress.totalSteps,
        "epoch": round(_finite(progress.epoch) or 0.0, 3),
        "percent": percent,
        "loss": _rounded(progress.loss, 4),
        "evalLoss": _rounded(progress.evalLoss, 4),
        "learningRate": _finite(progress.learningRate),
        "tokensPerSecond": _rounded(progress.tokensPerSecond, 1),
        "etaSeconds": None if _finite(progress.etaSeconds) is None else _count(int(progress.etaSeconds)),
        "updatedAt": progress.updatedAt,
        "datasetLosses": [{k: v for k, v in {"stage": d.stage[:63], "index": d.index, "uri": d.uri[:MAX_STATUS_URI],
                                             "loss": _rounded(d.loss, 4), "steps": d.steps}.items() if v is not None}
                          for d in progress.datasetLosses] or None,
    }
    return {k: v for k, v in out.items() if v is not None}


def _count(value: Any) -> int:
    """A count from the trainer's document, within [0, 2^53] (the model bounds it already; this holds
    for a document built without validation too)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return min(max(value, 0), MAX_COUNT)


def _counts(source: Any, status_model: type) -> dict[str, int]:
    """The count fields of a status model, read from the trainer's summary of the same shape."""
    return {name: _count(getattr(source, name, 0)) for name, field in status_model.model_fields.items()
            if field.annotation is int}


def _data_status(data: DataSummary) -> dict[str, Any]:
    """status.data from the trainer's summary of its data report: counts clamped, strings and lists cut."""
    stages = []
    for stage in data.stages[:MAX_STAGES]:
        datasets = [{"uri": str(d.uri)[:MAX_STATUS_URI], **_counts(d, DatasetDataStatus),
                     "piiReplaced": _counts(d.piiReplaced, PiiStatus)} for d in stage.datasets[:MAX_DATASETS]]
        stages.append({"stage": str(stage.stage)[:63], **_counts(stage, StageDataStatus),
                       "validationOverlap": _counts(stage.validationOverlap, OverlapStatus),
                       "packed": stage.packed is True, "datasets": datasets,
                       "contentFilters": [{"name": str(f.name)[:63], **_counts(f, ContentFilterStatus)}
                                          for f in stage.contentFilters[:MAX_CONTENT_FILTERS]]})
    return {"stages": stages}


def _evaluation_status(evaluation: EvaluationResult) -> dict[str, Any]:
    """status.evaluation from evaluation.json: perplexities, each task's headline metric, the report."""
    general = evaluation.general
    tasks = []
    for task in evaluation.tasks[:MAX_EVALUATION_TASKS]:
        scores = task.metrics.get(task.headline) or task.checks.get(task.headline)
        if scores is None:
            continue
        tasks.append({k: v for k, v in {"name": str(task.name)[:63], "metric": str(task.headline)[:63],
                                        "base": _rounded(scores.base, 4), "tuned": _rounded(scores.tuned, 4),
                                        "delta": _rounded(scores.delta, 4)}.items() if v is not None})
    out = {"basePerplexity": _rounded(evaluation.basePerplexity, 4), "perplexity": _rounded(evaluation.perplexity, 4),
           "generalBasePerplexity": _rounded(general.basePerplexity, 4) if general else None,
           "generalPerplexity": _rounded(general.perplexity, 4) if general else None,
           "tasks": tasks or None, "headline": headline(tasks[0]) if tasks and "tuned" in tasks[0] else None,
           "reportUri": evaluation.reportUri[:2048] if evaluation.reportUri else None}
    return {k: v for k, v in out.items() if v is not None}


def headline(task: dict[str, Any]) -> str:
    """`support rougeL 0.412 (+0.205)`: a task's tuned score and its gain over the base, for a printer column."""
    gain = f" ({task['delta']:+.3f})" if task.get("delta") is not None else ""
    return f"{task['name']} {task['metric']} {task['tuned']:.3f}{gain}"[:128]


def derive_status(body: dict[str, Any], obs: Observation, retryable_exit_codes: list[int] | None = None) -> dict[str, Any]:
    """The new status of a FineTuneJob (a JSON-ready dict without nulls)."""
    meta, spec = body["metadata"], body.get("spec") or {}
    generation = int(meta.get("generation") or 0)
    run_id = run_id_of(spec)
    run_policy = spec.get("runPolicy") or {}
    prev = dict(body.get("status") or {})
    same_run = prev.get("runId") == run_id
    status: dict[str, Any] = {k: v for k, v in prev.items() if k not in ("conditions",)}
    if not same_run:
        for key in RUN_SCOPED:
            status.pop(key, None)
    status["runId"] = run_id
    status["observedGeneration"] = generation
    conds: list[dict[str, Any]] = [dict(c) for c in prev.get("conditions") or []]
    if not same_run:  # a new run: the previous run's outcome is no longer this job's state
        conds = [c for c in conds if c.get("type") not in (C.Succeeded.value, C.Failed.value, C.Running.value)]
    now = obs.now

    def put(type_: C, value: bool | None, reason: str, message: str) -> None:
        nonlocal conds
        conds = set_condition(conds, type_.value, value, reason, message, generation, now)

    # Validated
    problems = obs.problems
    transient = bool(problems) and all(p.reason in TRANSIENT_REASONS for p in problems)
    if problems:
        put(C.Validated, None if transient else False, problems[0].reason, "; ".join(p.message for p in problems))
    else:
        put(C.Validated, True, "Valid", "spec, credentials and inputs are valid")

    # SandboxReady
    finished_before = same_run and (is_true(prev, C.Succeeded.value) or is_true(prev, C.Failed.value))
    if obs.sandbox and obs.sandbox_state != SANDBOX_ABSENT:
        status["sandboxNamespace"] = obs.sandbox
    if obs.sandbox_state == SANDBOX_EXPIRED:
        put(C.SandboxReady, False, "DeletedAfterTTL", f"sandbox {obs.sandbox} deleted after runPolicy.ttlSecondsAfterFinished")
    elif obs.sandbox_state == SANDBOX_ABSENT and finished_before:
        put(C.SandboxReady, False, "Deleted", "the run has finished and its sandbox namespace no longer exists")
    elif obs.sandbox_state == SANDBOX_TERMINATING:
        put(C.SandboxReady, False, "Terminating", f"namespace {obs.sandbox} is being deleted")
    elif obs.sandbox_state == SANDBOX_ABSENT and obs.hold is not None:
        put(C.SandboxReady, False, "Waiting", f"created when the run may start ({obs.hold.reason})")
    elif obs.sandbox_state == SANDBOX_ACTIVE and (obs.applied or not problems):
        put(C.SandboxReady, True, "Ready", f"namespace {obs.sandbox} and its policies are in place")
    elif problems:
        put(C.SandboxReady, False, "NotValidated", "nothing is created until the spec is valid")
    else:
        put(C.SandboxReady, False, "Creating", f"creating namespace {obs.sandbox}")

    # The run: PyTorchJob conditions, the trainer's result document.
    ptj = obs.pytorchjob
    if ptj:
        status["pytorchJob"] = ptj["metadata"]["name"]
    ptj_status = (ptj or {}).get("status") or {}
    succeeded_c, failed_c = ptj_condition(ptj, "Succeeded"), ptj_condition(ptj, "Failed")
    running_c, restarting_c = ptj_condition(ptj, "Running"), ptj_condition(ptj, "Restarting")
    ptj_suspended = ptj_condition(ptj, "Suspended") is not None or bool(((ptj or {}).get("spec") or {}).get("runPolicy", {}).get("suspend"))
    result = obs.result  # read from the current run's prefix

    if obs.progress is not None:
        status["progress"] = _progress_status(obs.progress, succeeded=bool(succeeded_c))
        status["checkpoints"] = [{"step": c.step, "uri": c.uri, "time": c.time} for c in obs.progress.checkpoints][-100:]
        if obs.progress.checkpoints:
            status["latestCheckpoint"] = obs.progress.checkpoints[-1].uri
        status["resumedFromStep"] = obs.progress.resumedFromStep
        if obs.progress.data is not None:
            status["data"] = _data_status(obs.progress.data)
    if obs.evaluation is not None:
        status["evaluation"] = _evaluation_status(obs.evaluation)
    if result is not None:
        output = {k: v for k, v in {"adapterUri": result.adapterUri, "mergedUri": result.mergedUri,
                                    "combinedUri": result.combinedUri}.items() if v}
        if output:
            status["output"] = output

    if obs.tenant_policy:
        status["tenantPolicy"] = obs.tenant_policy
    else:
        status.pop("tenantPolicy", None)
    queue = obs.queue
    if queue is not None:
        status["queue"] = {"clusterQueue": queue.cluster_queue, "workload": queue.workload, "admitted": queue.admitted,
                           "reason": queue.reason, "message": queue.message[:4096]}
        if queue.workloads_ahead is not None:
            status["queue"]["workloadsAhead"] = queue.workloads_ahead
        if obs.search is None:  # a search's queue is one trial's; its preemptions are every trial's (below)
            status["preemptions"] = max(int(status.get("preemptions") or 0), queue.preemptions)

    search = obs.search
    if search is not None:
        status["search"] = search.status
        trial_gpu_seconds = sum(float(t.get("gpuSeconds") or 0.0) for t in search.status.get("trials") or [])
        # Each trial has its own Workload: the search's preemptions are the sum of theirs.
        trial_preemptions = sum(int(t.get("preemptions") or 0) for t in search.status.get("trials") or [])
        status["preemptions"] = max(int(status.get("preemptions") or 0), trial_preemptions)
        status["gpuSeconds"] = round(max(float(status.get("gpuSeconds") or 0.0), trial_gpu_seconds), 1)
        if search.status.get("trials"):
            status.setdefault("startTime", rfc3339(now))

    if ptj and obs.pods:
        status["restarts"] = max(int(status.get("restarts") or 0), pod_restarts(obs.pods),
                                 restarts_from_events(obs.exit_events, retryable_exit_codes))
        account_gpu_seconds(status, pod_gpu_times(obs.pods, obs.gpu_resource, now))

    if search is not None and search.outcome is not None:
        outcome, reason, message = search.outcome
        put(C.Succeeded, outcome == "Succeeded", "Completed" if outcome == "Succeeded" else "Failed",
            message if outcome == "Succeeded" else "")
        if outcome == "Succeeded":
            put(C.Failed, False, "Completed", "")
        else:
            put(C.Failed, True, reason, message)
    elif succeeded_c:
        put(C.Succeeded, True, "Completed", (result.message if result and result.message else "training finished"))
        put(C.Failed, False, "Completed", "")
    elif failed_c:
        reason = (result.reason if result and not result.succeeded and result.reason else failed_c.get("reason") or "Failed")
        message = (result.message if result and result.message else failed_c.get("message") or "the run failed")
        code = failed_exit_code(obs.pods)
        if code is not None:
            kind = "retryable" if _retryable(code, retryable_exit_codes) else "not retryable"
            message += f" (trainer exit code {code}, {kind})"
        put(C.Failed, True, reason, message)
        put(C.Succeeded, False, "Failed", "")
    elif not finished_before:
        put(C.Succeeded, False, "NotFinished", "")
        put(C.Failed, False, "NotFailed", "")
    else:
        # The run's outcome stands (its PyTorchJob may be gone with the sandbox): restated for this
        # generation, so that tools which ignore stale conditions (kubectl wait, Argo CD) still see it.
        for outcome in (C.Succeeded, C.Failed):
            previous = condition({"conditions": conds}, outcome.value) or {}
            put(outcome, previous.get("status") == "True", previous.get("reason") or "Completed",
                previous.get("message") or "")

    finished = is_true({"conditions": conds}, C.Succeeded.value) or is_true({"conditions": conds}, C.Failed.value)
    user_suspend = bool(run_policy.get("suspend"))
    if finished:
        end = ptj_status.get("completionTime") or status.get("completionTime") or rfc3339(now)
        status["completionTime"] = end
        put(C.Running, False, "Finished", "the run has finished")
        put(C.Suspended, False, "Finished", "")
    elif user_suspend:
        put(C.Suspended, True, "SuspendedByUser", "spec.runPolicy.suspend is true; pods are removed, checkpoints kept")
        put(C.Running, False, "Suspended", "the run is suspended")
    else:
        put(C.Suspended, False, "NotSuspended", "")
        watch_pods = bool(ptj and not ptj_suspended) or search is not None
        unschedulable = unschedulable_pod(obs.pods) if watch_pods else None
        waiting = waiting_container(obs.pods, now) if watch_pods and unschedulable is None else None
        if search is not None and unschedulable is None and waiting is None:
            put(C.Running, *_search_running(search, queue, obs.hold))
        elif unschedulable is not None:
            # The PyTorchJob says Running once its master runs; a worker the scheduler cannot place
            # still keeps the run from training.
            pod_name, scheduler_message = unschedulable
            put(C.Running, False, "Unschedulable", f"pod {pod_name}: {scheduler_message}")
        elif waiting is not None:
            # Placed, but a container cannot start (its image, its config, a crash loop): no training either.
            put(C.Running, False, *waiting)
        elif running_c and not ptj_suspended:
            status.setdefault("startTime", ptj_status.get("startTime") or rfc3339(now))
            p = status.get("progress")
            since = running_since(conds) or now  # Running turns True in this pass if it was not
            beat = heartbeat(p, since)
            quiet = (now - beat).total_seconds()
            if obs.stall_after_seconds and quiet > obs.stall_after_seconds:
                last = f"last: step {p.get('step', 0)} at {p.get('updatedAt')}" if p and \
                    parse_time(p.get("updatedAt")) == beat else f"none since the run started running at {rfc3339(since)}"
                put(C.Running, True, "ProgressStalled",
                    f"no progress reported for {int(quiet)}s ({last}); threshold {int(obs.stall_after_seconds)}s")
            else:
                put(C.Running, True, "Training",
                    f"step {p.get('step', 0)}/{p.get('totalSteps', 0)}" if p else "training; no progress reported yet")
        elif restarting_c:
            put(C.Running, False, "Restarting", restarting_c.get("message") or "pods are restarting; the trainer resumes from the latest checkpoint")
        elif ptj and ptj_suspended and queue is not None and obs.hold is not None:
            put(C.Running, False, obs.hold.reason, f"{obs.hold.message} (its Kueue Workload {queue.workload} is "
                "deactivated until then)")
        elif ptj and ptj_suspended and queue is not None and queue.evicted_by_preemption:
            resume = status.get("checkpoints", [{}])[-1].get("step") if status.get("checkpoints") else 0
            put(C.Running, False, "Preempted", f"preempted by Kueue in ClusterQueue {queue.cluster_queue} "
                f"({queue.message}); resumes from checkpoint step {resume} when admitted again")
        elif ptj and ptj_suspended and queue is not None:
            put(C.Running, False, "Queued", f"waiting in Kueue ClusterQueue {queue.cluster_queue} "
                f"({describe_wait(queue)}): {queue.message}")
        elif ptj and ptj_suspended:
            put(C.Running, False, "Queued", "waiting for admission (the PyTorchJob is suspended by its queue)")
        elif obs.replacing_run:
            put(C.Running, False, "ReplacingRun", f"deleting the objects of run {obs.replacing_run} first")
        elif ptj:
            put(C.Running, False, "Starting", "waiting for the training pods to start")
        elif obs.hold is not None:
            put(C.Running, False, obs.hold.reason, obs.hold.message)
        else:
            put(C.Running, False, "NotStarted", "the run has not been created")

    if obs.spec_drift:
        put(C.UpToDate, False, "SpecChangedDuringRun",
            f"the spec changed after run {run_id} was created; the change is not applied to it: "
            "change spec.runId to start a new run with the new spec")
    else:
        put(C.UpToDate, True, "Applied", f"run {run_id} uses the current spec")

    for type_, value, reason, message in kstatus_conditions(conds):
        put(type_, value, reason, message)
    status["conditions"] = sorted(conds, key=lambda c: _ORDER.get(c["type"], 99))
    status["phase"] = phase(status["conditions"], ptj is not None or bool(search and search.status.get("trials"))).value
    return FineTuneJobStatus.model_validate(status).model_dump(mode="json", exclude_none=True)


_ORDER = {t.value: i for i, t in enumerate(C)}


def _search_running(search: Any, queue: QueueState | None, hold: Problem | None = None) -> tuple[bool, str, str]:
    """The Running condition of a search that has not finished: (status, reason, message). `queue`: what
    Kueue says of the trial the status shows (queued searches); `hold`: why trials not started yet wait
    (the tenant's budget is used up)."""
    s = search.status
    best = s.get("best")
    about = f"trials {s.get('progress')} finished ({s.get('running', 0)} active, {s.get('pruned', 0)} pruned, " \
            f"{s.get('failed', 0)} failed)" + (f"; best t{best['number']} {s.get('metric')} {best['value']:.4g}" if best else "")
    if hold is not None and not search.waiting and (not search.active or search.queued):
        held = "; the Kueue Workloads of queued trials that have not trained yet are deactivated" if search.active else ""
        return False, hold.reason, f"the next trials wait: {hold.message}{held}; {about}"
    if hold is not None and search.running:
        about = f"{about}; the next trials wait: {hold.message}"
    if search.active and search.queued:  # as a queued run: Queued (or Preempted) until Kueue admits a trial
        if queue is None:
            return False, "Queued", f"trials waiting for admission (their PyTorchJobs are suspended by their queue); {about}"
        return (False, "Preempted" if queue.evicted_by_preemption else "Queued",
                f"trials waiting in Kueue ClusterQueue {queue.cluster_queue} (trial Workload {queue.workload}: "
                f"{describe_wait(queue)}): {queue.message}; {about}")
    if search.active:  # between trials too: a search runs while any trial is to finish
        return True, "Searching", about if search.running else f"{about}; the next trials' pods are starting"
    if search.waiting:
        return False, "Promoting", f"{search.waiting}; {about}"
    return False, "NotStarted", "no trial has been created yet"


def kstatus_conditions(conditions: list[dict[str, Any]]) -> list[tuple[C, bool, str, str]]:
    """Ready, Reconciling and Stalled (the conditions kstatus reads) from the other conditions.

    Stalled: the job cannot get anywhere without someone acting (it failed, its spec is invalid, its
    trainer stopped reporting progress). Reconciling: the operator still works towards an outcome.
    Ready: the run succeeded. Each carries the reason and message that explain the job's state."""
    state = {"conditions": conditions}
    validated = condition(state, C.Validated.value) or {}
    running = condition(state, C.Running.value) or {}
    failed = condition(state, C.Failed.value) if is_true(state, C.Failed.value) else None
    succeeded = condition(state, C.Succeeded.value) if is_true(state, C.Succeeded.value) else None
    suspended = condition(state, C.Suspended.value) if is_true(state, C.Suspended.value) else None

    stalled: dict[str, Any] | None = None
    if failed is not None:
        stalled = failed
    elif succeeded is None and validated.get("status") == "False":
        stalled = validated
    elif running.get("status") == "True" and running.get("reason") == "ProgressStalled":
        stalled = running
    explains = stalled or suspended or (validated if validated.get("status") == "Unknown" else running)
    reason, message = explains.get("reason") or "Unknown", explains.get("message") or ""

    if succeeded is not None:
        done = succeeded.get("message") or "the run succeeded"
        return [(C.Ready, True, "Succeeded", done), (C.Reconciling, False, "Finished", done),
                (C.Stalled, False, "NotStalled", "")]
    if stalled is not None:
        return [(C.Ready, False, reason, message), (C.Reconciling, False, "Stalled", message),
                (C.Stalled, True, reason, message)]
    if suspended is not None:
        return [(C.Ready, False, reason, message), (C.Reconciling, False, "Suspended", message),
                (C.Stalled, False, "NotStalled", "")]
    return [(C.Ready, False, reason, message), (C.Reconciling, True, reason, message),
            (C.Stalled, False, "NotStalled", "")]


def phase(conditions: list[dict[str, Any]], run_exists: bool) -> Phase:
    """One word for `kubectl get`, derived from the conditions only."""
    state = {"conditions": conditions}
    validated = condition(state, C.Validated.value) or {}
    if is_true(state, C.Succeeded.value):
        return Phase.Succeeded
    if is_true(state, C.Failed.value):
        return Phase.Failed
    if is_true(state, C.Suspended.value):
        return Phase.Suspended
    running = condition(state, C.Running.value) or {}
    if running.get("status") == "True":
        return Phase.Stalled if running.get("reason") == "ProgressStalled" else Phase.Running
    if running.get("reason") in PENDING_REASONS:
        return Phase.Pending
    if running.get("reason") in WAITING_REASONS and validated.get("status") == "True":
        return Phase.Queued
    if validated.get("status") == "Unknown":
        return Phase.Validating
    if validated.get("status") == "False":
        return Phase.Pending
    if run_exists:
        return Phase.Queued
    return Phase.Pending


def changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether a status write is needed (the status subresource is only written when this is true)."""
    return (old or {}) != new
