"""Tenant policies (TenantPolicy) as pure functions: which policy governs a namespace, what it
allows a FineTuneJob, whether a new run may start now, and the policy's status.

The reconcile hands in a `Tenancy` snapshot (what the operator's indexes hold: the policies, the
labels of every namespace and a summary of every FineTuneJob); nothing here does I/O.

Rules:
* a namespace is governed by the one TenantPolicy whose namespaceSelector matches its labels; two
  matching policies are an error (`AmbiguousTenantPolicy`), none is an error only when the operator
  requires a policy (`NoTenantPolicy`);
* a policy's lists replace the operator-wide ones (images, priority classes, S3 endpoints) for the
  namespaces it governs; node pools stay those of the operator's configuration, narrowed by the policy;
* a policy is applied to runs not yet started: a run that exists keeps going when the policy changes,
  with what the policy filled in when it was made (RUN_SETTINGS);
* a policy that does not parse stops the namespaces it selects (`InvalidTenantPolicy`);
* a job's ceilings count what it runs at once: a search's search.parallelism trials together, which
  also take that many slots of maxRunningJobs;
* a run starts only while the tenant's budget is not used up (`BudgetExhausted`) and fewer than
  maxRunningJobs runs are active (`RunningJobLimit`); waiting jobs start oldest first.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from pydantic import ValidationError

from finetune_operator import quantity
from finetune_operator.api.tenant import (
    BudgetPeriod,
    LabelSelector,
    PolicyLimits,
    TenantPolicySpec,
    TenantPolicyStatus,
    parse_policy_spec,
)
from finetune_operator.api.types import FineTuneJobSpec, Phase, TrialPhase
from finetune_operator.config import OperatorConfig
from finetune_operator.problems import DIGEST, Problem, image_from

POLICY_VIOLATION = "PolicyViolation"
LIMIT_EXCEEDED = "LimitExceeded"  # beyond the operator's defaultLimits (no TenantPolicy governs the job)
NO_POLICY = "NoTenantPolicy"
AMBIGUOUS_POLICY = "AmbiguousTenantPolicy"
INVALID_POLICY = "InvalidTenantPolicy"
QUEUE_NOT_ALLOWED = "QueueNotAllowed"
BUDGET_EXHAUSTED = "BudgetExhausted"
RUNNING_JOB_LIMIT = "RunningJobLimit"
TENANCY_REASONS = {POLICY_VIOLATION, NO_POLICY, AMBIGUOUS_POLICY, INVALID_POLICY, QUEUE_NOT_ALLOWED, LIMIT_EXCEEDED}
MAX_STATUS_NAMESPACES = 100


# ---- the snapshot --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSummary:
    """What the operator's index keeps of one FineTuneJob."""

    namespace: str
    name: str
    uid: str
    created: str
    phase: str
    run_id: str
    started: bool  # the current run's PyTorchJob exists (status.pytorchJob)
    finished: bool
    validated: bool
    gpus_running: int  # GPUs its running pods request (see gpus_running())
    gpu_seconds: float
    slots: int = 1  # what it counts as against maxRunningJobs: a search, its search.parallelism

    @property
    def active(self) -> bool:
        """The run exists and has not finished: it counts against maxRunningJobs."""
        return self.started and not self.finished


def _condition_true(status: dict[str, Any], type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True" for c in status.get("conditions") or [])


def job_summary(body: dict[str, Any]) -> JobSummary:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    run_id = str(spec.get("runId") or "1")
    same_run = status.get("runId") == run_id
    return JobSummary(
        namespace=meta.get("namespace", ""), name=meta.get("name", ""), uid=meta.get("uid", ""),
        created=meta.get("creationTimestamp", ""), phase=status.get("phase") or Phase.Pending.value, run_id=run_id,
        started=same_run and (bool(status.get("pytorchJob")) or bool((status.get("search") or {}).get("trials"))),
        finished=same_run and (_condition_true(status, "Succeeded") or _condition_true(status, "Failed")),
        validated=_condition_true(status, "Validated"),
        gpus_running=gpus_running(spec, status) if same_run else 0,
        gpu_seconds=float(status.get("gpuSeconds") or 0.0) if same_run else 0.0,
        slots=parallelism(spec),
    )


RUNNING_PHASES = (Phase.Running.value, Phase.Stalled.value)


def gpus_running(raw_spec: dict[str, Any], status: dict[str, Any]) -> int:
    """GPUs the job's pods request now: those of a run that is Running or Stalled (not one waiting in
    Kueue, preempted or suspended), or of a search's trials that are running."""
    if status.get("phase") not in RUNNING_PHASES:
        return 0
    resources = raw_spec.get("resources") or {}
    per_run = int(resources.get("workers") or 1) * int(resources.get("gpusPerWorker", 1) or 0)
    if raw_spec.get("search"):
        trials = (status.get("search") or {}).get("trials") or []
        return per_run * sum(1 for t in trials if t.get("phase") == TrialPhase.Running.value)
    return per_run


def parallelism(raw_spec: dict[str, Any]) -> int:
    """Runs the job makes at once: a search, search.parallelism trials; any other job, one."""
    return int((raw_spec.get("search") or {}).get("parallelism") or 1)


@dataclass(frozen=True)
class Policy:
    name: str
    generation: int
    spec: TenantPolicySpec | None  # None: the stored spec does not parse
    status: dict[str, Any]
    error: str = ""
    selector: LabelSelector | None = None  # its namespaceSelector; None: that does not parse either

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "Policy":
        meta, raw = body.get("metadata") or {}, body.get("spec") or {}
        try:
            spec, error = parse_policy_spec(raw), ""
        except ValidationError as exc:
            spec, error = None, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        selector = spec.namespaceSelector if spec is not None else _selector_or_none(raw.get("namespaceSelector"))
        return cls(name=meta.get("name", ""), generation=int(meta.get("generation") or 0), spec=spec,
                   status=dict(body.get("status") or {}), error=error, selector=selector)

    def selects(self, labels: dict[str, str]) -> bool:
        """Whether it selects a namespace with these labels; a selector that does not parse might
        select any, so it is taken to select every one (a broken policy fails closed)."""
        return self.selector is None or selector_matches(self.selector, labels)


def _selector_or_none(raw: Any) -> LabelSelector | None:
    try:
        return LabelSelector.model_validate(raw)
    except ValidationError:
        return None


def io_tenant(namespace: str, policy: Policy | None) -> str:
    """Whose share of the tenant I/O pool a job's calls take: the TenantPolicy's, so that the
    namespaces one policy governs count as one tenant, else the namespace's own."""
    return f"policy/{policy.name}" if policy is not None else namespace


@dataclass
class Tenancy:
    policies: list[Policy] = field(default_factory=list)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    jobs: list[JobSummary] = field(default_factory=list)

    def jobs_in(self, namespaces: Iterable[str]) -> list[JobSummary]:
        wanted = set(namespaces)
        return [j for j in self.jobs if j.namespace in wanted]


# ---- which policy --------------------------------------------------------------------------------


def selector_matches(selector: LabelSelector, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.matchLabels.items()):
        return False
    for req in selector.matchExpressions:
        present = req.key in labels
        if req.operator == "In" and (not present or labels[req.key] not in req.values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in req.values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


def governed_namespaces(policy: Policy, tenancy: Tenancy) -> list[str]:
    if policy.spec is None:
        return []
    return sorted(ns for ns, labels in tenancy.namespace_labels.items()
                  if selector_matches(policy.spec.namespaceSelector, labels))


def policy_of(namespace: str, tenancy: Tenancy, require: bool) -> tuple[Policy | None, Problem | None]:
    """The TenantPolicy governing a namespace, or the problem that stops its jobs. A policy that does
    not parse stops the namespaces it selects, whatever `require` says: falling back to the
    operator-wide settings would lift its limits."""
    labels = tenancy.namespace_labels.get(namespace, {})
    matching = [p for p in tenancy.policies if p.selects(labels)]
    broken = [p for p in matching if p.spec is None]
    if broken:
        why = "; ".join(f"TenantPolicy {p.name}, which does not parse ({p.error})" for p in broken)
        return None, Problem(INVALID_POLICY, f"namespace {namespace} is selected by {why}; its jobs do not start "
                                             "until a platform admin fixes it")
    if len(matching) > 1:
        names = ", ".join(sorted(p.name for p in matching))
        return None, Problem(AMBIGUOUS_POLICY, f"namespace {namespace} is selected by more than one TenantPolicy "
                                               f"({names}); a platform admin must make their namespaceSelectors disjoint")
    if matching:
        return matching[0], None
    if require:
        return None, Problem(NO_POLICY, f"namespace {namespace} is governed by no TenantPolicy and the operator "
                                        f"requires one; ask a platform admin to set one up")
    return None, None


# ---- what a policy allows ------------------------------------------------------------------------


def _violation(policy: Policy, field_path: str, what: str, limit: str) -> Problem:
    return Problem(POLICY_VIOLATION, f"{field_path}: {what} (TenantPolicy {policy.name}: {limit})")


def default_node_pool(policy: Policy | None, cfg: OperatorConfig) -> str:
    """The pool of a job that names none: the operator's default, or the policy's first pool when the
    policy does not allow the operator's default."""
    if policy is None or policy.spec is None or not policy.spec.nodePools:
        return cfg.defaultNodePool
    pools = policy.spec.nodePools
    return cfg.defaultNodePool if cfg.defaultNodePool in pools else pools[0]


def cluster_queue(spec: FineTuneJobSpec, policy: Policy | None) -> str:
    """The Kueue ClusterQueue of the job's runs ('' = none): runPolicy.queueName, or the policy's default."""
    if spec.runPolicy.queueName:
        return spec.runPolicy.queueName
    if policy is not None and policy.spec is not None and policy.spec.kueue is not None:
        return policy.spec.kueue.clusterQueues[0]
    return ""


def with_policy_defaults(spec: FineTuneJobSpec, policy: Policy | None, cfg: OperatorConfig) -> FineTuneJobSpec:
    """The spec the run is built from: the policy's defaults filled in where the job left a field empty
    (node pool, priority class, deadline, queue); without a policy, the operator's default deadline.
    The stored spec is never written."""
    if policy is None or policy.spec is None:
        if spec.runPolicy.activeDeadlineSeconds or not cfg.defaultLimits.defaultActiveDeadlineSeconds:
            return spec
        return spec.model_copy(update={"runPolicy": spec.runPolicy.model_copy(
            update={"activeDeadlineSeconds": cfg.defaultLimits.defaultActiveDeadlineSeconds})})
    p = policy.spec
    resources = spec.resources.model_copy(update={"nodePool": spec.resources.nodePool or default_node_pool(policy, cfg)})
    run_policy = spec.runPolicy.model_copy(update={
        "priorityClassName": spec.runPolicy.priorityClassName or p.priorityClasses.default,
        "activeDeadlineSeconds": spec.runPolicy.activeDeadlineSeconds or p.limits.defaultActiveDeadlineSeconds,
        "queueName": cluster_queue(spec, policy),
    })
    return spec.model_copy(update={"resources": resources, "runPolicy": run_policy})


# What with_policy_defaults (or the operator's configuration) fills in, as a run was made with it: its
# PyTorchJob records these (builders.run.recorded_settings reads them back), and while the run exists
# they replace what the policy would fill in now.
RUN_SETTINGS: dict[str, type] = {"nodePool": str, "priorityClassName": str, "activeDeadlineSeconds": int,
                                 "queueName": str}


def run_settings(spec: FineTuneJobSpec, cfg: OperatorConfig) -> dict[str, Any]:
    """The settings of a run made from `spec` (the policy's defaults filled in), its pool resolved."""
    run = spec.runPolicy
    return {"nodePool": spec.resources.nodePool or cfg.defaultNodePool, "priorityClassName": run.priorityClassName,
            "activeDeadlineSeconds": run.activeDeadlineSeconds, "queueName": run.queueName}


def with_run_settings(spec: FineTuneJobSpec, settings: dict[str, Any]) -> FineTuneJobSpec:
    """The spec of a run that exists: the settings it was made with in place of today's defaults (a
    setting not recorded keeps today's)."""
    known = {k: v for k, v in settings.items() if k in RUN_SETTINGS}
    resources = spec.resources.model_copy(update={k: v for k, v in known.items() if k == "nodePool"})
    run_policy = spec.runPolicy.model_copy(update={k: v for k, v in known.items() if k != "nodePool"})
    return spec.model_copy(update={"resources": resources, "runPolicy": run_policy})


def effective_config(cfg: OperatorConfig, policy: Policy | None) -> OperatorConfig:
    """The operator's configuration as a governed job sees it: the policy's lists replace the
    operator-wide allow-lists (images, priority classes, S3 endpoints when the policy names some); a
    requirement (an image digest) the policy can only add to, never lift."""
    if policy is None or policy.spec is None:
        return cfg
    p = policy.spec
    update: dict[str, Any] = {
        "allowedImages": list(p.images.registries),
        "requireImageDigest": cfg.requireImageDigest or p.images.requireDigest,
        "allowedPriorityClasses": list(p.priorityClasses.allowed),
    }
    if p.storage.endpoints:
        update["allowedS3Endpoints"] = list(p.storage.endpoints)
    return cfg.model_copy(update=update)


def uri_pattern(pattern: str) -> re.Pattern[str]:
    """`*` matches within one path segment; a pattern ending in `*` or `/` matches everything below."""
    below = pattern.endswith("*") or pattern.endswith("/")
    body = pattern[:-1] if pattern.endswith("*") else pattern
    regex = re.escape(body).replace(r"\*", "[^/]*")
    return re.compile(f"^{regex}{'.*' if below else ''}$")


def _uri_allowed(uri: str, patterns: list[str]) -> bool:
    return not patterns or any(uri_pattern(p).match(uri) for p in patterns)


def _uris(spec: FineTuneJobSpec) -> list[tuple[str, str, str]]:
    """(field path, uri, which policy list) of every S3 location the job names."""
    out = [("spec.model.uri", spec.model.uri, "modelURIs"), ("spec.output.uri", spec.output.uri, "outputURIs")]
    out += [(f"spec.datasets[{i}].uri", d.uri, "datasetURIs") for i, d in enumerate(spec.datasets)]
    if spec.validation.uri:
        out.append(("spec.validation.uri", spec.validation.uri, "datasetURIs"))
    for s, stage in enumerate(spec.stages):
        out += [(f"spec.stages[{s}].datasets[{i}].uri", d.uri, "datasetURIs") for i, d in enumerate(stage.datasets)]
    if spec.checkpoint.uri:
        out.append(("spec.checkpoint.uri", spec.checkpoint.uri, "checkpointURIs"))
    # Adapters are model weights: read from where the tenant's models may come from.
    if spec.method.adapter is not None:
        out.append(("spec.method.adapter.uri", spec.method.adapter.uri, "modelURIs"))
    if spec.evaluation.candidateModel is not None:
        out.append(("spec.evaluation.candidateModel.uri", spec.evaluation.candidateModel.uri, "modelURIs"))
    if spec.output.combine is not None:
        out += [(f"spec.output.combine.adapters[{i}].uri", a.uri, "modelURIs")
                for i, a in enumerate(spec.output.combine.adapters)]
    for i, content_filter in enumerate(spec.preprocessing.contentFilters):
        if content_filter.termsUri:
            out.append((f"spec.preprocessing.contentFilters[{i}].termsUri", content_filter.termsUri, "datasetURIs"))
        if content_filter.modelUri:
            out.append((f"spec.preprocessing.contentFilters[{i}].modelUri", content_filter.modelUri, "modelURIs"))
    # Evaluation sets are data the trainer reads like the training data.
    out += [(f"spec.evaluation.tasks[{i}].uri", t.uri, "datasetURIs") for i, t in enumerate(spec.evaluation.tasks)]
    if spec.evaluation.general is not None:
        out.append(("spec.evaluation.general.uri", spec.evaluation.general.uri, "datasetURIs"))
    return out


def check_pool(spec: FineTuneJobSpec, policy: Policy) -> list[Problem]:
    allowed = policy.spec.nodePools
    if allowed and spec.resources.nodePool not in allowed:
        return [_violation(policy, "spec.resources.nodePool", f"node pool {spec.resources.nodePool!r} is not allowed",
                           f"allowed pools: {', '.join(allowed)}")]
    return []


def check_image(spec: FineTuneJobSpec, policy: Policy) -> list[Problem]:
    images = policy.spec.images
    if not spec.image:
        return []
    if not image_from(spec.image, images.registries):
        return [_violation(policy, "spec.image", f"{spec.image!r} is not from an allowed registry",
                           f"allowed: {', '.join(images.registries) or 'only the operator trainer image'}")]
    if images.requireDigest and not DIGEST.search(spec.image):
        return [_violation(policy, "spec.image", f"{spec.image!r} is not pinned by digest", "requireDigest: true")]
    return []


def check_priority(spec: FineTuneJobSpec, policy: Policy) -> list[Problem]:
    name, allowed = spec.runPolicy.priorityClassName, policy.spec.priorityClasses.allowed
    if name and name not in allowed:
        return [_violation(policy, "spec.runPolicy.priorityClassName", f"{name!r} is not allowed",
                           f"allowed: {', '.join(allowed) or 'none'}")]
    return []


def check_locations(spec: FineTuneJobSpec, policy: Policy) -> list[Problem]:
    storage = policy.spec.storage
    out = []
    for path, uri, which in _uris(spec):
        patterns = getattr(storage, which)
        if not _uri_allowed(uri, patterns):
            out.append(_violation(policy, path, f"{uri} is outside the allowed locations",
                                  f"storage.{which}: {', '.join(patterns)}"))
    return out


def limit_problems(spec: FineTuneJobSpec, lim: PolicyLimits, reason: str, source: str) -> list[Problem]:
    """Per-job ceilings: a TenantPolicy's limits, or the operator's defaultLimits for a job no policy
    governs. Each problem names the field, the value and the limit with where it was set. The pods and
    GPUs of a job are what it uses at once: a search's search.parallelism trials together."""
    res, out = spec.resources, []
    trials = spec.runs_at_once

    def over(field_path: str, value: Any, limit: Any, limit_name: str, exceeded: bool) -> None:
        if limit is not None and exceeded:
            out.append(Problem(reason, f"{field_path}: {value} is above the limit ({source}: limits.{limit_name}: {limit})"))

    def at_once(per_run: int, unit: str, limit: int | None, limit_name: str, field_path: str, value: Any) -> None:
        if limit is not None and per_run > limit:
            over(field_path, value, limit, limit_name, True)
        elif limit is not None and per_run * trials > limit:
            over("spec.search.parallelism", f"{trials} trials at once of {per_run} {unit} each ({per_run * trials} {unit})",
                 limit, limit_name, True)

    at_once(res.workers, "pods", lim.maxWorkers, "maxWorkers", "spec.resources.workers", res.workers)
    over("spec.resources.gpusPerWorker", res.gpusPerWorker, lim.maxGPUsPerWorker, "maxGPUsPerWorker",
         lim.maxGPUsPerWorker is not None and res.gpusPerWorker > lim.maxGPUsPerWorker)
    gpus = res.workers * res.gpusPerWorker
    at_once(gpus, "GPUs", lim.maxGPUsPerJob, "maxGPUsPerJob", "spec.resources",
            f"{gpus} GPUs in all (workers x gpusPerWorker)")
    for name, limit_name in (("cpu", "maxCPUPerWorker"), ("memory", "maxMemoryPerWorker")):
        limit, value = getattr(lim, limit_name), getattr(res, name)
        over(f"spec.resources.{name}", value, limit, limit_name,
             limit is not None and quantity.value(value) > quantity.value(limit))
    deadline = spec.runPolicy.activeDeadlineSeconds
    if lim.maxActiveDeadlineSeconds and not deadline:
        out.append(Problem(reason, f"spec.runPolicy.activeDeadlineSeconds: a deadline is required ({source}: "
                                   f"limits.maxActiveDeadlineSeconds: {lim.maxActiveDeadlineSeconds})"))
    else:
        over("spec.runPolicy.activeDeadlineSeconds", deadline, lim.maxActiveDeadlineSeconds, "maxActiveDeadlineSeconds",
             bool(lim.maxActiveDeadlineSeconds) and deadline > lim.maxActiveDeadlineSeconds)
    return out


def check_limits(spec: FineTuneJobSpec, policy: Policy) -> list[Problem]:
    return limit_problems(spec, policy.spec.limits, POLICY_VIOLATION, f"TenantPolicy {policy.name}")


def check_default_limits(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    """A job no TenantPolicy governs still meets the operator's defaultLimits."""
    return limit_problems(spec, cfg.defaultLimits, LIMIT_EXCEEDED, "the operator's defaultLimits")


def check_queue(spec: FineTuneJobSpec, policy: Policy) -> list[Problem]:
    queue, kueue = spec.runPolicy.queueName, policy.spec.kueue
    if not queue:
        return []
    if kueue is None:
        return [_violation(policy, "spec.runPolicy.queueName", f"queue {queue!r} is not allowed",
                           "no Kueue ClusterQueue is set up for this tenant")]
    if queue not in kueue.clusterQueues:
        return [_violation(policy, "spec.runPolicy.queueName", f"ClusterQueue {queue!r} is not allowed",
                           f"kueue.clusterQueues: {', '.join(kueue.clusterQueues)}")]
    return []


def check_running_jobs(spec: FineTuneJobSpec, policy: Policy) -> list[Problem]:
    """A search counts as its search.parallelism against maxRunningJobs: more could never start (0 is
    a tenant paused: its jobs wait)."""
    limit = policy.spec.maxRunningJobs
    if spec.search is not None and limit and spec.search.parallelism > limit:
        trials = spec.search.parallelism
        return [_violation(policy, "spec.search.parallelism", f"{trials} trials at once count as {trials} running jobs",
                           f"maxRunningJobs: {limit}")]
    return []


POLICY_CHECKS = (check_pool, check_image, check_priority, check_locations, check_limits, check_queue, check_running_jobs)


def check_policy(spec: FineTuneJobSpec, policy: Policy) -> list[Problem]:
    """PolicyViolation problems of a spec (with the policy's defaults filled in) under a policy that
    parses (policy_of never hands out one that does not)."""
    return [problem for check in POLICY_CHECKS for problem in check(spec, policy)]


def check_queue_without_policy(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    queue = spec.runPolicy.queueName
    if queue and queue not in cfg.allowedClusterQueues:
        allowed = ", ".join(cfg.allowedClusterQueues) or "none"
        return [Problem(QUEUE_NOT_ALLOWED, f"spec.runPolicy.queueName: ClusterQueue {queue!r} is not allowed "
                                           f"(allowed: {allowed})")]
    return []


# ---- may a run start now -------------------------------------------------------------------------


def budget_hold(policy: Policy | None) -> Problem | None:
    """Why no new run of the policy's tenant may start now: its GPU-hour budget is used up (None: it may).
    Holds a run that does not exist yet, and a queued run Kueue has not admitted yet."""
    if policy is None or policy.spec is None:
        return None
    p = policy.spec
    usage = policy.status.get("usage") or {}
    if p.budget is not None and usage.get("budgetExhausted"):
        return Problem(BUDGET_EXHAUSTED, f"TenantPolicy {policy.name} has used {usage.get('gpuHours', 0)} of its "
                                         f"{p.budget.gpuHours:g} GPU-hours this {p.budget.period.lower()}; the run "
                                         "starts when the next period begins or the budget is raised")
    return None


def start_hold(job: JobSummary, policy: Policy | None, tenancy: Tenancy) -> Problem | None:
    """Why a job whose run does not exist yet must wait (None: it may start). Jobs wait for the budget
    and for free slots under maxRunningJobs (a search takes search.parallelism); slots go to waiting
    jobs oldest first."""
    if policy is None or policy.spec is None:
        return None
    p = policy.spec
    exhausted = budget_hold(policy)
    if exhausted is not None:
        return exhausted
    if p.maxRunningJobs is None:
        return None
    jobs = tenancy.jobs_in(governed_namespaces(policy, tenancy))
    active = sum(j.slots for j in jobs if j.active and j.uid != job.uid)
    waiting = sorted((j for j in jobs if not j.started and not j.finished and (j.validated or j.uid == job.uid)),
                     key=lambda j: (j.created, j.namespace, j.name))
    rank = next((i for i, j in enumerate(waiting) if j.uid == job.uid), len(waiting))
    ahead = sum(j.slots for j in waiting[:rank])
    if active + ahead + job.slots > p.maxRunningJobs:
        mine = f"; this one counts as {job.slots} (search.parallelism)" if job.slots > 1 else ""
        return Problem(RUNNING_JOB_LIMIT, f"TenantPolicy {policy.name} allows {p.maxRunningJobs} running job(s) at "
                                          f"once (a search counts as its search.parallelism); {active} running, "
                                          f"{ahead} waiting before this one{mine}")
    return None


# ---- the policy's status -------------------------------------------------------------------------


def period_start(now: datetime, period: str) -> datetime:
    day = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == BudgetPeriod.Day.value:
        return day
    if period == BudgetPeriod.Week.value:
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def period_end(start: datetime, period: str) -> datetime:
    if period == BudgetPeriod.Day.value:
        return start + timedelta(days=1)
    if period == BudgetPeriod.Week.value:
        return start + timedelta(days=7)
    return start + timedelta(days=calendar.monthrange(start.year, start.month)[1])


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(value: str) -> datetime | None:
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None


def account(usage: dict[str, Any], jobs: list[JobSummary], now: datetime, period: str) -> tuple[dict[str, Any], float]:
    """The usage ledger after this pass and the GPU-seconds it added. Each run's GPU-seconds are
    counted once: the ledger remembers, per existing run, how much of it was counted; a deleted
    job's share stays in the total. A new period starts from zero (runs keep their counted share)."""
    start = period_start(now, period)
    total = float(usage.get("gpuSeconds") or 0.0)
    counted = {(a.get("uid"), a.get("runId")): float(a.get("gpuSeconds") or 0.0) for a in usage.get("accounted") or []}
    if _parse(usage.get("periodStart", "")) != start:
        total = 0.0
    added = 0.0
    accounted = []
    for job in sorted(jobs, key=lambda j: j.uid):
        before = counted.get((job.uid, job.run_id), 0.0)
        delta = max(0.0, job.gpu_seconds - before)
        added += delta
        accounted.append({"uid": job.uid, "runId": job.run_id, "gpuSeconds": round(max(before, job.gpu_seconds), 1)})
    total += added
    return {"periodStart": _rfc3339(start), "gpuSeconds": round(total, 1), "gpuHours": round(total / 3600, 3),
            "accounted": accounted}, added


def policy_status(policy: Policy, tenancy: Tenancy, now: datetime) -> tuple[dict[str, Any], float]:
    """The TenantPolicy's new status (JSON-ready) and the GPU-seconds this pass added to its usage."""
    prev = policy.status
    if policy.spec is None:
        status = {**prev, "observedGeneration": policy.generation,
                  "conditions": [_ready(prev, False, "InvalidSpec", policy.error, policy.generation, now)]}
        return TenantPolicyStatus.model_validate(status).model_dump(mode="json", exclude_none=True), 0.0
    namespaces = governed_namespaces(policy, tenancy)
    jobs = tenancy.jobs_in(namespaces)
    counts = {phase.value: 0 for phase in Phase}
    for job in jobs:
        counts[job.phase] = counts.get(job.phase, 0) + 1
    budget = policy.spec.budget
    usage, added = account(prev.get("usage") or {}, jobs, now, budget.period if budget else BudgetPeriod.Month.value)
    usage["budgetExhausted"] = bool(budget) and usage["gpuSeconds"] >= budget.gpuHours * 3600
    overlapping = sorted({other.name for other in tenancy.policies if other.name != policy.name and other.spec
                          and set(governed_namespaces(other, tenancy)) & set(namespaces)})
    if overlapping:
        ready = _ready(prev, False, AMBIGUOUS_POLICY, f"namespaces are also selected by {', '.join(overlapping)}; "
                       "their jobs do not start", policy.generation, now)
    else:
        ready = _ready(prev, True, "InEffect", f"governs {len(namespaces)} namespace(s)", policy.generation, now)
    status = {
        "observedGeneration": policy.generation,
        "conditions": [ready],
        "namespaces": namespaces[:MAX_STATUS_NAMESPACES],
        "jobs": counts,
        "runningJobs": sum(j.slots for j in jobs if j.active),
        "gpusInUse": sum(j.gpus_running for j in jobs if j.active),
        "usage": usage,
    }
    return TenantPolicyStatus.model_validate(status).model_dump(mode="json", exclude_none=True), added


def _ready(prev: dict[str, Any], value: bool, reason: str, message: str, generation: int, now: datetime) -> dict[str, Any]:
    old = next((c for c in prev.get("conditions") or [] if c.get("type") == "Ready"), None)
    text = "True" if value else "False"
    since = old["lastTransitionTime"] if old and old.get("status") == text and old.get("lastTransitionTime") else _rfc3339(now)
    return {"type": "Ready", "status": text, "reason": reason, "message": message[:4096],
            "observedGeneration": generation, "lastTransitionTime": since}


def budget_fraction(policy: Policy, status: dict[str, Any]) -> float | None:
    if policy.spec is None or policy.spec.budget is None:
        return None
    return float((status.get("usage") or {}).get("gpuSeconds") or 0.0) / (policy.spec.budget.gpuHours * 3600)
