"""One level-based reconcile of a FineTuneJob: observe -> decide -> apply -> status.

* observe: read the job's Secret, sandbox namespace, PyTorchJobs and pods (and, rate-limited, the
  trainer's documents in S3) -- `Reconciler._observe`;
* decide: a pure function from what was observed to a Plan (objects to apply or delete, patches,
  when to come back) -- `decide`, table-tested;
* apply: server-side apply of whole objects with the field manager `finetune-operator`;
* status: computed in memory (`status.derive_status`) and written once, only when it changed.

Nothing is created before the job validates. A finished run is never re-created; a spec change in
the middle of a run is reported (UpToDate=False + Event), not applied, except runPolicy.suspend and
ttlSecondsAfterFinished. A new spec.runId deletes the old run's objects first, then creates the new run.
The copy of the tenant's Secret in a sandbox follows that Secret whatever else is wrong with the job;
nothing goes to the tenant's S3 in a pass where the job (its inputs aside) does not validate.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from lightkube import ApiError

from finetune_operator import endpoints, k8s, kueue, redact, s3, tenancy
from finetune_operator.api.tenant import KIND as TENANT_POLICY_KIND
from finetune_operator.api.types import FineTuneJobSpec
from finetune_operator.builders import events as ev
from finetune_operator.builders import names as n
from finetune_operator.builders.run import (
    Trial,
    config_map,
    owns_suspend,
    recorded_settings,
    run_objects,
    suspended_for_creation,
)
from finetune_operator.builders.sandbox import credentials_secret, resolve_pool, sandbox_objects
from finetune_operator.config import OperatorConfig
from finetune_operator.metrics import Metrics
from finetune_operator.search import driver, promote, report
from finetune_operator.status import (
    SANDBOX_ABSENT,
    SANDBOX_ACTIVE,
    SANDBOX_EXPIRED,
    SANDBOX_TERMINATING,
    Observation,
    changed,
    condition,
    derive_status,
    is_true,
    parse_time,
    pod_gpu_times,
    ptj_condition,
    run_id_of,
)
from finetune_operator.tenant_io import TenantIO, TenantIOTimeout
from finetune_trainer.config import run_prefix
from finetune_operator.validation import (
    SECRET_REASONS,
    TRANSIENT_REASONS,
    Facts,
    Problem,
    S3Check,
    check_secret,
    s3_uris_to_check,
    validate,
)

log = logging.getLogger(__name__)

REQUEUE_SHORT = 5.0
VISIBILITY_TIMEOUT = 3.0  # seconds for Kueue's visibility API (a queue position is a nicety, never a wait)
PROMOTE_TIMEOUT = 600.0  # server-side copies of the best trial's files (a merged model may be large)
HOLD_RECHECK = 30.0  # a job waiting for its tenant's budget or a running-job slot looks again this often
# Waits for a tenant's storage (its slot in the I/O executor included): an input check, a read of the
# trainer's documents, a DNS lookup of the endpoint's host.
INPUT_CHECK_TIMEOUT = s3.CHECK_BUDGET_SECONDS + s3.REQUEST_DEADLINE_SECONDS
DOCUMENTS_TIMEOUT = 3 * s3.REQUEST_DEADLINE_SECONDS + 5
RESOLVE_TIMEOUT = 10.0


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ---- decide (pure) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Storage:
    """The tenant's S3 as one pass judged it: the endpoint (a wildcard name only at the addresses it
    resolved to, see s3.Dial) and the credentials of a Secret that passed every check."""

    endpoint: str
    region: str
    creds: s3.Credentials
    dial: s3.Dial


@dataclass
class View:
    """What one pass observed in the cluster."""

    body: dict[str, Any]
    now: datetime
    spec: FineTuneJobSpec | None
    problems: list[Problem]
    secret: dict[str, Any] | None = None  # the Secret the job names, only once it passed every check
    namespace: dict[str, Any] | None = None
    sandbox_attempt: int = 0  # which of the job's sandbox names (names.sandbox_candidates) is its sandbox
    pytorchjob: dict[str, Any] | None = None  # the current run's
    other_runs: list[dict[str, Any]] = field(default_factory=list)  # PyTorchJobs of other runIds
    other_run_pods: int = 0
    run_pods: list[dict[str, Any]] = field(default_factory=list)  # pods of the current runId
    policy: tenancy.Policy | None = None  # the TenantPolicy governing the job's namespace
    hold: Problem | None = None  # why the run may not start yet (budget, running-job limit)
    # A search's trials with a PyTorchJob, and those its status has active without one (see _unmade_trials).
    trials: dict[int, driver.TrialRun] = field(default_factory=dict)
    # Set only when the job validated in this pass (its inputs aside): no storage, no request to the tenant's S3.
    storage: Storage | None = None

    @property
    def io_tenant(self) -> str:
        """Whose share of the tenant I/O pool this job's calls take."""
        return tenancy.io_tenant(self.body["metadata"]["namespace"], self.policy)


@dataclass
class Plan:
    sandbox: str
    sandbox_state: str = SANDBOX_ABSENT
    apply: list[dict[str, Any]] = field(default_factory=list)
    delete: list[dict[str, Any]] = field(default_factory=list)  # apiVersion, kind, metadata.name/namespace
    suspend_patch: bool | None = None  # merge-patch runPolicy.suspend of the existing PyTorchJob
    spec_drift: bool = False
    replacing_run: str = ""
    requeue_after: float | None = None
    permanent: str = ""  # why nothing can be done until the spec (or Secret) changes
    problems: list[Problem] = field(default_factory=list)  # found while deciding (sandbox conflicts)
    search: driver.SearchPlan | None = None  # the trials of a search after this pass
    trial_suspend: list[str] = field(default_factory=list)  # trial PyTorchJobs whose runPolicy.suspend is patched
    promote: bool = False  # the search is over: promote its best trial (I/O, after the applies)


def owns_namespace(ns: dict[str, Any], uid: str) -> bool:
    return (ns.get("metadata", {}).get("labels") or {}).get(n.LABEL_JOB_UID) == uid


def namespace_state(ns: dict[str, Any] | None) -> str:
    if ns is None:
        return SANDBOX_ABSENT
    if (ns.get("metadata") or {}).get("deletionTimestamp") or (ns.get("status") or {}).get("phase") == "Terminating":
        return SANDBOX_TERMINATING
    return SANDBOX_ACTIVE


def run_finished(status: dict[str, Any], run_id: str) -> bool:
    return status.get("runId") == run_id and (is_true(status, "Succeeded") or is_true(status, "Failed"))


def idle(body: dict[str, Any]) -> bool:
    """A job whose run finished and that waits for nothing on a timer (no TTL deletion pending):
    only a spec change (an update handler) or deletion can give it something to do."""
    raw_spec, status = body.get("spec") or {}, body.get("status") or {}
    if status.get("observedGeneration") != (body.get("metadata") or {}).get("generation"):
        return False
    if not run_finished(status, run_id_of(raw_spec)):
        return False
    ttl = int(((raw_spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished")) or 0)
    sandbox = condition(status, "SandboxReady") or {}
    return ttl == 0 or (sandbox.get("status") == "False" and sandbox.get("reason") in ("DeletedAfterTTL", "Deleted"))


def timer_due(body: dict[str, Any], last_pass: float | None, now_monotonic: float, idle_seconds: float) -> bool:
    """Whether the timer's pass should run: always, except for an idle job passed less than idle_seconds ago."""
    return last_pass is None or idle_seconds <= 0 or not idle(body) or now_monotonic - last_pass >= idle_seconds


def ttl_expired(status: dict[str, Any], ttl: int, now: datetime) -> bool:
    completion = parse_time(status.get("completionTime"))
    return ttl > 0 and completion is not None and now >= completion + timedelta(seconds=ttl)


def _ref(api_version: str, kind: str, name: str, namespace: str | None, uid: str | None = None) -> dict[str, Any]:
    """What to delete; with `uid`, only that very object (a precondition of the delete)."""
    meta = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    if uid:
        meta["uid"] = uid
    return {"apiVersion": api_version, "kind": kind, "metadata": meta}


def sandbox_conflict(sandbox: str) -> Problem:
    return Problem("SandboxConflict", f"metadata.name: the namespace {sandbox} and the other names this FineTuneJob's "
                                      "sandbox may have already exist and were not made for it; they are left alone "
                                      "(delete and recreate the FineTuneJob to get a sandbox of other names)")


def objects_digest(objects: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(objects, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def needs_apply(plan: Plan, view: View, digest: str, last_applied: tuple[str, float] | None, now_monotonic: float,
                resync_seconds: float) -> bool:
    """Whether this pass must send its server-side applies (`digest`: objects_digest(plan.apply)). An
    unchanged apply is a no-op in etcd but still a request: with the same desired objects as the last
    successful apply, a sandbox that is there and a run that exists, it waits for the resync period
    (which repairs hand edits)."""
    if not plan.apply or last_applied is None or resync_seconds <= 0:
        return bool(plan.apply)
    if namespace_state(view.namespace) != SANDBOX_ACTIVE:
        return True
    if any(o["kind"] == "PyTorchJob" for o in plan.apply) and view.pytorchjob is None:
        return True
    last_digest, when = last_applied
    return digest != last_digest or now_monotonic - when >= resync_seconds


def decide(view: View, cfg: OperatorConfig) -> Plan:
    body = view.body
    meta, raw_spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    sandbox = n.sandbox_of(cfg.sandboxPrefix, meta, view.sandbox_attempt)
    plan = Plan(sandbox=sandbox, sandbox_state=namespace_state(view.namespace))
    spec = view.spec
    run_id = spec.runId if spec else run_id_of(raw_spec)
    finished = run_finished(status, run_id)

    if view.namespace is not None and not owns_namespace(view.namespace, meta.get("uid", "")):
        # Sandbox names carry the job's uid, so these are someone else's namespaces made under every
        # name this job's sandbox may have: never adopt, touch or delete them, and say nothing about whose they are.
        plan.problems.append(sandbox_conflict(sandbox))
        plan.sandbox_state = SANDBOX_ABSENT
        plan.permanent = str(plan.problems[0])
        return plan

    if spec and finished and ttl_expired(status, spec.runPolicy.ttlSecondsAfterFinished, view.now):
        if plan.sandbox_state == SANDBOX_ACTIVE:
            plan.delete.append(_ref("v1", "Namespace", sandbox, None, uid=view.namespace["metadata"].get("uid")))
        plan.sandbox_state = SANDBOX_EXPIRED
        return plan

    if view.problems:
        if plan.sandbox_state == SANDBOX_ACTIVE:
            follow_secret(view, cfg, plan)
        transient = all(p.reason in TRANSIENT_REASONS for p in view.problems)
        if transient:
            plan.requeue_after = REQUEUE_SHORT * 2
        elif view.pytorchjob is None:
            plan.permanent = "; ".join(str(p) for p in view.problems)
        return plan  # nothing else is created or changed while the job does not validate

    assert spec is not None and view.secret is not None
    if finished and plan.sandbox_state == SANDBOX_ABSENT:
        return plan  # the run is over and its sandbox was removed: nothing to bring back
    if plan.sandbox_state == SANDBOX_TERMINATING:
        plan.requeue_after = REQUEUE_SHORT
        return plan

    if view.hold is not None and view.pytorchjob is None and not finished and plan.sandbox_state == SANDBOX_ABSENT:
        plan.requeue_after = HOLD_RECHECK  # nothing is created while the tenant's policy holds the run
        return plan

    # with the tenant policy's defaults
    ref = dataclasses.replace(n.JobRef.from_body(body), spec=spec, sandbox_attempt=view.sandbox_attempt)
    plan.apply.extend(sandbox_objects(ref, cfg, view.secret.get("data") or {}))
    plan.sandbox_state = SANDBOX_ACTIVE

    if view.other_runs or view.other_run_pods:
        for old in view.other_runs:
            old_id = old["metadata"].get("labels", {}).get(n.LABEL_RUN_ID, "")
            number = driver.trial_number(old)
            plan.delete.append(_ref("kubeflow.org/v1", "PyTorchJob", old["metadata"]["name"], sandbox,
                                    uid=old["metadata"].get("uid")))
            plan.delete.append(_ref("v1", "ConfigMap", n.configmap_name(old_id) if number is None else
                                    n.trial_configmap_name(old_id, number), sandbox))
            # The LocalQueue of the old run's ClusterQueue, when the new run queues elsewhere (its policy
            # changed meanwhile, or its spec): the sandbox keeps only the queue its run uses.
            old_queue = (old["metadata"].get("labels") or {}).get(n.LABEL_KUEUE_QUEUE)
            if old_queue and old_queue != spec.runPolicy.queueName:
                plan.delete.append(_ref(k8s.KUEUE_API_VERSION, "LocalQueue", old_queue, sandbox))
        plan.replacing_run = ", ".join(sorted({o["metadata"].get("labels", {}).get(n.LABEL_RUN_ID, "?")
                                               for o in view.other_runs})) or "(pods)"
        plan.requeue_after = REQUEUE_SHORT
        return plan

    if spec.search is not None:
        return _decide_search(view, ref, cfg, plan, finished)

    ptj = view.pytorchjob
    if ptj is None:
        # Kueue owns a queued run's suspend and admits a new Workload at once when its queue has
        # room, before the operator could deactivate it: a suspended queued run is not created yet.
        suspended_in_queue = spec.runPolicy.suspend and not owns_suspend(ref)
        if not finished and view.hold is None and not suspended_in_queue:
            plan.apply.extend(run_objects(ref, cfg))
        elif view.hold is not None:
            plan.requeue_after = HOLD_RECHECK
        return plan

    applied_hash = (ptj["metadata"].get("annotations") or {}).get(n.ANNOTATION_SPEC_HASH)
    current = bool(((ptj.get("spec") or {}).get("runPolicy") or {}).get("suspend"))
    if current != spec.runPolicy.suspend and not finished and owns_suspend(ref):
        plan.suspend_patch = spec.runPolicy.suspend
    if applied_hash != n.spec_hash(raw_spec):
        plan.spec_drift = True
    elif not finished:
        # The run exists: its PyTorchJob is not applied again (Kueue edits its pod templates and
        # suspension; a changed TenantPolicy applies to runs not yet started); its config is.
        plan.apply.append(config_map(ref, cfg))
    return plan


def _unmade_trials(status: dict[str, Any], run_id: str, observed: dict[int, driver.TrialRun]) -> list[int]:
    """Trials this run's status has Pending or Running but without a PyTorchJob. Their documents are read
    before they are made again: a pass that deleted a pruned trial's PyTorchJob and stopped before writing
    its status (an operator restart) leaves one, and it is judged again from what it reported, not re-made."""
    if status.get("runId") != run_id:
        return []
    return [t["number"] for t in (status.get("search") or {}).get("trials") or []
            if t.get("phase") in driver.ACTIVE and t["number"] not in observed]


def _decide_search(view: View, ref: n.JobRef, cfg: OperatorConfig, plan: Plan, finished: bool) -> Plan:
    """The trials of a search: start the next ones (up to search.parallelism at once), stop pruned ones,
    suspend and resume them with the job, and promote the best when every trial is over."""
    spec, raw_spec, status = ref.spec, view.body.get("spec") or {}, view.body.get("status") or {}
    trial_jobs = [t.pytorchjob for t in view.trials.values() if t.pytorchjob is not None]
    plan.spec_drift = view.pytorchjob is not None or any(
        (p["metadata"].get("annotations") or {}).get(n.ANNOTATION_SPEC_HASH) != n.spec_hash(raw_spec) for p in trial_jobs)
    may_start = not finished and view.hold is None and not spec.runPolicy.suspend and not plan.spec_drift
    search = driver.plan_search(spec.search, status.get("search") or {} if status.get("runId") == spec.runId else {},
                                view.trials, may_start, every_steps=spec.evaluation.everySteps)
    plan.search = search
    if finished:
        return plan
    if not plan.spec_drift:
        for number, params in search.start:
            plan.apply.extend(run_objects(ref, cfg, Trial(number, params)))
    for number in search.stop:
        observed = view.trials[number].pytorchjob if number in view.trials else None  # its uid: that very one
        if observed is not None:  # none: pruned again after a restart, its PyTorchJob already gone
            plan.delete.append(_ref("kubeflow.org/v1", "PyTorchJob", n.trial_pytorchjob_name(spec.runId, number),
                                    plan.sandbox, uid=observed["metadata"].get("uid")))
    stopped = set(search.stop)
    if owns_suspend(ref):
        for number, trial in view.trials.items():
            ptj = trial.pytorchjob
            if ptj is None or number in stopped or ptj_condition(ptj, "Succeeded") or ptj_condition(ptj, "Failed"):
                continue
            if bool(((ptj.get("spec") or {}).get("runPolicy") or {}).get("suspend")) != spec.runPolicy.suspend:
                plan.trial_suspend.append(ptj["metadata"]["name"])
    # Promotion is idempotent (the same copies, the same report): a pass that promoted but could not write its
    # status promotes again; a finished search returned above.
    plan.promote = search.finished and search.best is not None
    return plan  # the timer's passes follow the trials, as they follow a run


def follow_secret(view: View, cfg: OperatorConfig, plan: Plan) -> None:
    """The copy of the tenant's Secret in an active sandbox follows that Secret whatever else is wrong
    with the job: kept current while the Secret the job names passes every check, deleted otherwise
    (gone, not opted in, empty, or a spec that names none the pass could judge)."""
    if view.secret is not None and view.spec is not None and not any(p.reason in SECRET_REASONS for p in view.problems):
        ref = dataclasses.replace(n.JobRef.from_body(view.body), spec=view.spec, sandbox_attempt=view.sandbox_attempt)
        plan.apply.append(credentials_secret(ref, cfg, view.secret.get("data") or {}))
    else:
        plan.delete.append(_ref("v1", "Secret", n.CREDENTIALS_SECRET, plan.sandbox))


SWEEP_MESSAGES = {
    "orphaned": "its FineTuneJob is gone (deleted without its finalizer)",
    "superseded": "its FineTuneJob has another sandbox now",
}


def sweep_verdict(namespace: dict[str, Any], job: dict[str, Any] | None, prefix: str) -> str:
    """What the sweep does with a namespace (a pure function): `keep`, `not-a-sandbox`, `orphaned`
    (its job is gone, or a job of that name with another uid is there) or `superseded`."""
    meta = namespace["metadata"]
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    uid = labels.get(n.LABEL_JOB_UID)
    if labels.get(n.LABEL_MANAGED_BY) != n.MANAGER or not uid or "/" not in annotations.get(n.ANNOTATION_JOB, ""):
        return "not-a-sandbox"
    if job is None or job["metadata"].get("uid") != uid:
        return "orphaned"
    if meta["name"] not in n.sandbox_candidates(prefix, job["metadata"]):
        return "superseded"
    return "keep"


def should_read_documents(ptj: dict[str, Any] | None, previous_status: dict[str, Any], run_id: str,
                          last_read: float | None, now_monotonic: float, interval: float) -> bool:
    """Read progress/evaluation/result from S3: while the run is active (rate-limited), and once
    more right after it finished (its final documents)."""
    if ptj is None:
        return False
    finished_now = bool(ptj_condition(ptj, "Succeeded") or ptj_condition(ptj, "Failed"))
    if finished_now:
        return not run_finished(previous_status, run_id)
    active = bool(ptj_condition(ptj, "Running") or ptj_condition(ptj, "Restarting"))
    return active and (last_read is None or now_monotonic - last_read >= interval)


def secret_facts(facts: Facts, secret: dict[str, Any] | None, namespace: str) -> dict[str, Any] | None:
    """Fill in what validation needs to know of the Secret the job names (of its values, only whether
    they are blank); returns the Secret, or None when it is not the job's namespace's."""
    if secret is not None and secret.get("metadata", {}).get("namespace") not in (None, namespace):
        secret = None
    facts.secret_found = secret is not None
    if secret is not None:
        data = secret.get("data") or {}
        facts.secret_keys = frozenset(data)
        facts.secret_opted_in = (secret["metadata"].get("labels") or {}).get(n.CREDENTIALS_OPT_IN_LABEL) == "true"
        facts.secret_blank_keys = frozenset(k for k in n.CREDENTIAL_KEYS if k in data and s3.blank(data[k]))
    return secret


# ---- the reconciler (I/O) ------------------------------------------------------------------------


@dataclass
class Outcome:
    status: dict[str, Any]
    requeue_after: float | None = None
    permanent: str = ""


class Reconciler:
    def __init__(self, kube: k8s.Kube, cfg: OperatorConfig, metrics: Metrics,
                 clock: Callable[[], datetime] = utcnow, io: TenantIO | None = None) -> None:
        self.kube, self.cfg, self.metrics, self.clock = kube, cfg, metrics, clock
        self.io = io or TenantIO(cfg.tenantIOThreads, cfg.tenantIOThreadsPerNamespace)
        self.api_server = endpoints.api_server_addresses()
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_read: dict[str, float] = {}
        self._inputs_found: dict[str, tuple[int, str]] = {}  # uid -> (generation, spec hash) whose inputs all exist
        self._applied: dict[str, tuple[str, float]] = {}  # uid -> (digest of the objects, monotonic time)
        self._last_pass: dict[str, float] = {}  # uid -> monotonic time of its last pass
        # Events name the replica that wrote them: in a pod the hostname is the pod's name.
        self.instance = f"{n.MANAGER}-{socket.gethostname()}"

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    async def on_timer(self, body: dict[str, Any], tenants: tenancy.Tenancy | None = None) -> Outcome | None:
        """The timer's pass, or None when the job is idle and was passed recently."""
        if not timer_due(body, self._last_pass.get(body["metadata"].get("uid", "")), time.monotonic(),
                         self.cfg.idleReconcileSeconds):
            return None
        return await self.reconcile(body, tenants)

    async def reconcile(self, body: dict[str, Any], tenants: tenancy.Tenancy | None = None) -> Outcome:
        """One pass; `tenants`: what the operator knows of tenant policies, namespaces and jobs."""
        body = copy.deepcopy(body)
        started = time.monotonic()
        self._last_pass[body["metadata"].get("uid", "")] = started
        try:
            async with self._lock(body["metadata"].get("uid", "")):
                # Handlers and the timer may hold an older copy: decide on the stored object, so two
                # passes in a row never compute (and announce) the same transition twice.
                meta = body["metadata"]
                fresh = await self.kube.get(k8s.FineTuneJob, meta["name"], meta["namespace"])
                if fresh is None or fresh["metadata"].get("uid") != meta.get("uid"):
                    self.metrics.reconciles.labels("gone").inc()
                    return Outcome(status=body.get("status") or {})
                outcome = await self._reconcile(fresh, tenants or tenancy.Tenancy())
        except Exception:
            self.metrics.reconciles.labels("error").inc()
            raise
        finally:
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)
        self.metrics.reconciles.labels("permanent" if outcome.permanent else
                                       "requeue" if outcome.requeue_after else "ok").inc()
        return outcome

    async def _observe(self, body: dict[str, Any], now: datetime, tenants: tenancy.Tenancy) -> View:
        meta, raw_spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
        uid = meta.get("uid", "")
        policy, policy_problem = tenancy.policy_of(meta["namespace"], tenants, self.cfg.requireTenantPolicy)
        facts = Facts(policy=policy, policy_problem=policy_problem)
        view = View(body=body, now=now, spec=None, problems=[], policy=policy)
        view.sandbox_attempt, view.namespace = await self._find_sandbox(meta, status)
        sandbox = n.sandbox_of(self.cfg.sandboxPrefix, meta, view.sandbox_attempt)
        run_id = run_id_of(raw_spec)
        if view.namespace is not None:
            runs = await self.kube.list(k8s.PyTorchJob, sandbox, labels={n.LABEL_JOB_UID: uid})
            current = n.pytorchjob_name(run_id)
            view.pytorchjob = next((r for r in runs if r["metadata"]["name"] == current), None)
            this_run = [r for r in runs if (r["metadata"].get("labels") or {}).get(n.LABEL_RUN_ID) == run_id]
            for r in this_run:
                number = driver.trial_number(r)
                if number is not None and r["metadata"]["name"] == n.trial_pytorchjob_name(run_id, number):
                    view.trials[number] = driver.TrialRun(pytorchjob=r)
            view.other_runs = [r for r in runs if r not in this_run]
        started = view.pytorchjob is not None or bool(view.trials)
        made = view.pytorchjob or next((t.pytorchjob for _, t in sorted(view.trials.items())), None)
        if made is not None:  # the run keeps what its policy filled in; a policy changed since applies to new runs
            facts.run_settings = recorded_settings(made)
        view.spec, view.problems = self._validated(raw_spec, facts, started)
        spec = view.spec
        if spec is None:
            redact.REDACTOR.forget(uid)
            return view
        # The Secret is read whatever else is wrong: its copy in the sandbox follows it (follow_secret).
        secret = await self.kube.get(k8s.Secret, spec.credentials.secretName, meta["namespace"])
        secret = secret_facts(facts, secret, meta["namespace"])
        facts.api_server_addresses = self.api_server
        spec_problems = bool(view.problems)
        host = None if spec_problems else endpoints.needs_resolution(
            spec.storage.endpoint, tenancy.effective_config(self.cfg, policy))
        if host:
            facts.endpoint_addresses = await self._resolve(view.io_tenant, host)
            facts.endpoint_unanswered = facts.endpoint_addresses is None
        view.spec, view.problems = self._validated(raw_spec, facts, started)
        # A Secret's values are used (copied, signed with, registered for redaction) only once it
        # passed every check; those of a Secret the job no longer uses are dropped.
        usable = secret is not None and view.spec is not None and not check_secret(view.spec, facts)
        view.secret = secret if usable else None
        creds = s3.Credentials.from_secret_data(view.secret.get("data") or {}) if view.secret is not None else None
        redact.REDACTOR.use(uid, *(creds.values() if creds else ()))
        if view.spec is None or spec_problems:
            return view
        if view.namespace is not None:
            pods = await self.kube.list(k8s.Pod, sandbox, labels={n.LABEL_JOB_UID: uid})
            view.run_pods = [p for p in pods if (p["metadata"].get("labels") or {}).get(n.LABEL_RUN_ID) == run_id]
            view.other_run_pods = len(pods) - len(view.run_pods)
        if view.problems or creds is None:
            return view
        # The endpoint (as it resolves now) and the Secret were judged in this pass: only now may a
        # request go to the tenant's storage, and a wildcard name's only to the judged addresses.
        dial = s3.Dial(addresses=tuple(facts.endpoint_addresses or ())) if host else s3.BY_NAME
        view.storage = Storage(spec.storage.endpoint or self.cfg.s3Endpoint, spec.storage.region, creds, dial)
        if spec.search is not None:
            for number in _unmade_trials(status, spec.runId, view.trials):
                view.trials[number] = driver.TrialRun()
            if view.trials:
                await self._observe_trials(view, uid)
        if not started and not run_finished(status, run_id) and not view.other_runs:
            facts.s3 = await self._check_inputs(uid, int(meta.get("generation") or 0), spec, raw_spec, view.storage,
                                                view.io_tenant)
        view.spec, view.problems = self._validated(raw_spec, facts, started)
        if view.spec is not None and not view.problems and not run_finished(status, run_id):
            if not started:
                view.hold = tenancy.start_hold(tenancy.job_summary(body), policy, tenants)
            elif view.spec.search is not None:
                # A search under way keeps its running-job slots, but each new trial spends GPU-hours:
                # trials not started yet wait for the budget, as a run not started yet does.
                view.hold = tenancy.budget_hold(policy)
        return view

    async def _find_sandbox(self, meta: dict[str, Any], status: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """Which of the job's sandbox names (names.sandbox_candidates) is its sandbox, and that namespace:
        the one its status records if it is the job's, else the first that is absent (to be made) or the
        job's. Every name someone else's: the first, which decide reports as a conflict. One read unless
        a name is taken or the job has a later name."""
        uid, names = meta.get("uid", ""), n.sandbox_candidates(self.cfg.sandboxPrefix, meta)
        recorded = status.get("sandboxNamespace")
        order = [recorded, *(name for name in names if name != recorded)] if recorded in names else names
        first = None
        for name in order:
            ns = await self.kube.get(k8s.Namespace, name)
            if ns is not None and owns_namespace(ns, uid):
                return names.index(name), ns
            if ns is None and (name != recorded or name == names[0]):  # a later recorded one gone: from the first
                return names.index(name), None
            if name == names[0]:
                first = ns
        return 0, first

    async def _observe_trials(self, view: View, uid: str) -> None:
        """GPU-seconds of each trial's pods, and its documents: while it runs (at most every
        progressPollSeconds) and once it finished, until its status records the outcome."""
        spec, meta = view.spec, view.body["metadata"]
        assert spec is not None
        recorded = {t["number"]: t.get("phase") for t in ((view.body.get("status") or {}).get("search") or {}).get("trials") or []}
        gpu_resource = self._gpu_resource(view.body, spec)
        mono = time.monotonic()
        storage = view.storage
        for number, trial in sorted(view.trials.items()):
            ptj = trial.pytorchjob
            pods = [p for p in view.run_pods if (p["metadata"].get("labels") or {}).get(n.LABEL_TRIAL) == str(number)]
            trial.gpu_pod_seconds = pod_gpu_times(pods, gpu_resource, view.now) if gpu_resource else {}
            if recorded.get(number) in driver.FINAL or storage is None:
                continue
            key = f"{uid}/t{number}"
            ended = bool(ptj_condition(ptj, "Succeeded") or ptj_condition(ptj, "Failed"))
            last = self._last_read.get(key)
            if not ended and last is not None and mono - last < self.cfg.progressPollSeconds:
                continue
            self._last_read[key] = mono
            try:
                trial.documents = await self.io.run(
                    view.io_tenant, DOCUMENTS_TIMEOUT, s3.read_documents, storage.endpoint, storage.region,
                    storage.creds, n.trial_output_uri(spec.output.uri, number), spec.runId, dial=storage.dial)
            except TenantIOTimeout as exc:
                log.warning("%s/%s trial %d: %s", meta["namespace"], meta["name"], number, exc)

    def _gpu_resource(self, body: dict[str, Any], spec: FineTuneJobSpec) -> str:
        try:
            return resolve_pool(dataclasses.replace(n.JobRef.from_body(body), spec=spec), self.cfg)[1].gpuResource
        except ValueError:
            return ""

    async def _promote(self, view: View, plan: Plan) -> driver.Promotion:
        """Copy the best trial's output to output.uri and write the search report (the tenant's storage,
        in its slot of the I/O executor); then read the promoted documents."""
        spec, meta, storage = view.spec, view.body["metadata"], view.storage
        assert spec is not None and spec.search is not None and plan.search is not None and plan.search.best is not None
        assert storage is not None  # a search is promoted only in a pass where the job validated
        best = plan.search.best
        endpoint, region, creds = storage.endpoint, storage.region, storage.creds
        source = n.trial_output_uri(spec.output.uri, best.number)
        try:
            copied = await self.io.run(view.io_tenant, PROMOTE_TIMEOUT, promote.promote, endpoint, region,
                                       creds, source, spec.output.uri, spec.runId, dial=storage.dial)
            if copied.error:
                return driver.Promotion(error=f"promoting trial {best.number} from {source}: {copied.error}")
            search_status = driver.summary(spec.search, plan.search, {})
            document = report.report_document(meta["name"], spec.runId, spec.search, search_status, spec.output.uri)
            written = await self.io.run(view.io_tenant, PROMOTE_TIMEOUT, promote.write_report, endpoint,
                                        region, creds, run_prefix(spec.output.uri, spec.runId), document,
                                        dial=storage.dial)
            if written.error:
                return driver.Promotion(error=f"writing the search report: {written.error}")
            docs = await self.io.run(view.io_tenant, DOCUMENTS_TIMEOUT, s3.read_documents, endpoint,
                                     region, creds, spec.output.uri, spec.runId, dial=storage.dial)
        except TenantIOTimeout as exc:
            return driver.Promotion(error=str(exc))
        return driver.Promotion(promoted=True, report_uri=written.uri, documents=docs)

    def _validated(self, raw_spec: dict[str, Any], facts: Facts, started: bool) -> tuple[FineTuneJobSpec | None, list[Problem]]:
        """validate(), except that a run that exists is not judged by the tenant's policy again: a
        policy applies to runs not yet started."""
        spec, problems = validate(raw_spec, self.cfg, facts)
        if started:
            problems = [p for p in problems if p.reason not in tenancy.TENANCY_REASONS]
            if spec is None and not problems:
                spec, problems = validate(raw_spec, self.cfg, dataclasses.replace(facts, policy_problem=None))
                problems = [p for p in problems if p.reason not in tenancy.TENANCY_REASONS]
        return spec, problems

    async def _resolve(self, tenant: str, host: str) -> tuple[Any, ...] | None:
        """The addresses of a host a tenant's endpoint names (None: no answer in time, so not judged yet)."""
        try:
            return await self.io.run(tenant, RESOLVE_TIMEOUT, endpoints.resolve, host)
        except TenantIOTimeout:
            return None

    async def _check_inputs(self, uid: str, generation: int, spec: FineTuneJobSpec, raw_spec: dict[str, Any],
                            storage: Storage, tenant: str) -> dict[str, S3Check]:
        key = (generation, n.spec_hash(raw_spec))
        uris = s3_uris_to_check(spec)
        if self._inputs_found.get(uid) == key:
            return {path: S3Check(True) for path in uris}
        try:
            checks = await self.io.run(tenant, INPUT_CHECK_TIMEOUT, s3.check_inputs, storage.endpoint, storage.region,
                                       storage.creds, uris, dial=storage.dial)
        except TenantIOTimeout as exc:
            checks = {path: S3Check(None, str(exc)) for path in uris}
        # Only "all there" is kept (this spec's inputs are not asked for again): nothing an endpoint
        # said outlives the pass.
        if all(c.exists for c in checks.values()):
            self._inputs_found[uid] = key
        else:
            self._inputs_found.pop(uid, None)
        return checks

    async def _reconcile(self, body: dict[str, Any], tenants: tenancy.Tenancy) -> Outcome:
        meta = body["metadata"]
        previous = body.get("status") or {}
        now = self.clock()
        view = await self._observe(body, now, tenants)
        plan = decide(view, self.cfg)

        for obj in plan.delete:
            await self.kube.delete(k8s.resource_of(obj), obj["metadata"]["name"], obj["metadata"].get("namespace"),
                                   uid=obj["metadata"].get("uid"))
        ptj = view.pytorchjob
        uid, mono, digest = meta.get("uid", ""), time.monotonic(), objects_digest(plan.apply)
        if needs_apply(plan, view, digest, self._applied.get(uid), mono, self.cfg.resyncSeconds):
            self._applied.pop(uid, None)  # a failed apply leaves no record: the next pass applies again
            for obj in plan.apply:
                if obj["kind"] == "Namespace" and view.namespace is None:
                    # Create-only: a namespace of this name made since it was observed (by anyone) is
                    # never adopted; nothing goes into it.
                    if not await self.kube.create_if_absent(obj):  # the next pass takes the job's next name
                        plan.sandbox_state, plan.requeue_after, ptj = SANDBOX_ABSENT, REQUEUE_SHORT, None
                        break
                    continue
                if obj["kind"] == "PyTorchJob" and view.pytorchjob is None and view.spec.runPolicy.queueName:
                    await self.kube.create_if_absent(suspended_for_creation(obj))
                applied = await self.kube.apply(obj)
                if obj["kind"] == "PyTorchJob" and driver.trial_number(obj) is None:
                    ptj = applied  # a trial is never the job's single run
            else:
                self._applied[uid] = (digest, mono)
        if plan.suspend_patch is not None and ptj is not None:
            await self.kube.merge_patch(k8s.PyTorchJob, ptj["metadata"]["name"], plan.sandbox,
                                        {"spec": {"runPolicy": {"suspend": plan.suspend_patch}}})
        for name in plan.trial_suspend:
            await self.kube.merge_patch(k8s.PyTorchJob, name, plan.sandbox,
                                        {"spec": {"runPolicy": {"suspend": view.spec.runPolicy.suspend}}})
        if plan.search is not None and view.spec.runPolicy.queueName and plan.sandbox_state == SANDBOX_ACTIVE:
            await self._queue_trials(plan.sandbox, view, plan.search)
        promotion = await self._promote(view, plan) if plan.promote else None
        if plan.sandbox_state == SANDBOX_EXPIRED:
            ptj = None

        obs = Observation(now=now, problems=view.problems + plan.problems, sandbox=plan.sandbox, sandbox_state=plan.sandbox_state,
                          applied=bool(plan.apply) and not view.problems, pytorchjob=ptj, spec_drift=plan.spec_drift,
                          replacing_run=plan.replacing_run, stall_after_seconds=self.cfg.progressStallSeconds,
                          hold=view.hold, tenant_policy=view.policy.name if view.policy else "")
        if plan.search is not None and view.spec is not None and view.spec.search is not None:
            obs.search = driver.observe(view.spec, plan.search, previous, promotion, view.trials)
            if promotion is not None and promotion.documents is not None:
                obs.evaluation, obs.result = promotion.documents.evaluation, promotion.documents.result
            if obs.search.queue is not None:
                obs.queue = obs.search.queue
                if not obs.queue.admitted:
                    obs.queue = dataclasses.replace(obs.queue, workloads_ahead=await self._workloads_ahead(
                        plan.sandbox, view.spec.runPolicy.queueName, obs.queue.workload))
        workload = None
        if view.spec is not None:
            try:
                obs.gpu_resource = resolve_pool(dataclasses.replace(n.JobRef.from_body(body), spec=view.spec),
                                                self.cfg)[1].gpuResource
            except ValueError:
                pass
            if ptj is not None and view.spec.runPolicy.queueName and plan.sandbox_state == SANDBOX_ACTIVE:
                workload = await self._workload(plan.sandbox, ptj)
                if workload is not None:
                    obs.queue = kueue.queue_state(workload, view.spec.runPolicy.queueName)
                    if not obs.queue.admitted:
                        obs.queue = dataclasses.replace(obs.queue, workloads_ahead=await self._workloads_ahead(
                            plan.sandbox, view.spec.runPolicy.queueName, obs.queue.workload))
                    # A run Kueue has not admitted yet has not started: it waits for the tenant's
                    # budget like a run not created yet (Kueue would admit it whatever the budget).
                    never_ran = not obs.queue.admitted and not (previous.get("runId") == view.spec.runId
                                                                and previous.get("startTime"))
                    obs.hold = tenancy.budget_hold(view.policy) if never_ran else None
                    activation = kueue.activation_patch(
                        workload, active=not view.spec.runPolicy.suspend and obs.hold is None)
                    if activation is not None:  # a suspend or hold of a queued run: Kueue's way
                        await self.kube.merge_patch(k8s.Workload, workload["metadata"]["name"], plan.sandbox, activation)
        if ptj is not None and plan.sandbox_state == SANDBOX_ACTIVE and view.spec is not None:
            # The pods were listed while observing; a pass that only applied objects sees them next time.
            obs.pods = view.run_pods
            obs.exit_events = await self.kube.list(k8s.Event, plan.sandbox, fields={
                "involvedObject.kind": "PyTorchJob", "involvedObject.name": ptj["metadata"]["name"],
                "reason": "ExitedWithCode"})
            await self._read_documents(meta.get("uid", ""), view, ptj, previous, obs)

        status = derive_status(body, obs, self.cfg.retryableExitCodes)
        if changed(previous, status):
            await self.kube.apply_status(meta["namespace"], meta["name"], status)
            for event_type, reason, message in ev.transition_events(previous, status) + ev.search_events(previous, status):
                await self._event(body, event_type, reason, message, now)
        if ptj is not None and plan.sandbox_state == SANDBOX_ACTIVE:
            await self._publish_freshness(plan.sandbox, status, ptj, workload)
        if plan.sandbox_state == SANDBOX_EXPIRED and namespace_state(view.namespace) == SANDBOX_ACTIVE:
            await self._event(body, ev.NORMAL, "SandboxDeleted",
                              f"deleted namespace {plan.sandbox} after runPolicy.ttlSecondsAfterFinished", now)
        self.metrics.observe_job(meta["namespace"], meta["name"], status)
        return Outcome(status=status, requeue_after=plan.requeue_after, permanent=plan.permanent)

    async def _workload(self, sandbox: str, ptj: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return kueue.workload_of(await self.kube.list(k8s.Workload, sandbox), ptj)
        except ApiError as exc:  # Kueue not installed (no Workload API): the run shows as queued
            log.warning("cannot read Kueue workloads in %s: %s", sandbox, exc)
            return None

    async def _workloads_ahead(self, sandbox: str, local_queue: str, workload: str) -> int | None:
        """The run's place in its ClusterQueue from Kueue's visibility API, or None where it is not known: the
        API not served (it is optional in Kueue), not allowed, or slow (bounded: never a stalled pass)."""
        try:
            summary = await asyncio.wait_for(self.kube.pending_workloads(sandbox, local_queue), VISIBILITY_TIMEOUT)
        except (ApiError, asyncio.TimeoutError) as exc:  # 404/403/503 from the aggregator, or slow
            log.debug("no queue position for %s/%s from Kueue's visibility API: %r", sandbox, workload, exc)
            return None
        return kueue.workloads_ahead(summary, workload)

    async def _queue_trials(self, sandbox: str, view: View, search: driver.SearchPlan) -> None:
        """What Kueue says of each unfinished trial's Workload (into view.trials); a queued search suspended by
        its user, and a trial Kueue has not admitted yet while the tenant's budget is used up, have their
        Workloads deactivated (Kueue's way, as for a run), activated again when the search resumes or the
        budget allows. Trials stopped in this pass are left alone."""
        spec = view.spec
        assert spec is not None
        trials = {number: t for number, t in view.trials.items() if t.pytorchjob is not None and number not in search.stop
                  and not (ptj_condition(t.pytorchjob, "Succeeded") or ptj_condition(t.pytorchjob, "Failed"))}
        if not trials:
            return
        try:
            workloads = await self.kube.list(k8s.Workload, sandbox)
        except ApiError as exc:  # Kueue not installed (no Workload API): the trials show as queued
            log.warning("cannot read Kueue workloads in %s: %s", sandbox, exc)
            return
        recorded = {t["number"]: t for t in search.trials}
        for number, trial in trials.items():
            workload = kueue.workload_of(workloads, trial.pytorchjob)
            if workload is None:
                continue
            trial.queue = kueue.queue_state(workload, spec.runPolicy.queueName)
            held = view.hold is not None and driver.never_ran(recorded.get(number) or {}, trial.queue)
            patch = kueue.activation_patch(workload, active=not spec.runPolicy.suspend and not held)
            if patch is not None:
                await self.kube.merge_patch(k8s.Workload, workload["metadata"]["name"], sandbox, patch)

    async def _publish_freshness(self, sandbox: str, status: dict[str, Any], ptj: dict[str, Any],
                                 workload: dict[str, Any] | None) -> None:
        """Annotate the run's PyTorchJob and Workload with its newest checkpoint (step, time)."""
        newest = (status.get("checkpoints") or [{}])[-1]
        for res, obj in ((k8s.PyTorchJob, ptj), (k8s.Workload, workload)):
            patch = kueue.freshness_patch(obj, newest.get("step"), newest.get("time")) if obj else None
            if patch is not None:
                try:
                    await self.kube.merge_patch(res, obj["metadata"]["name"], sandbox, patch)
                except ApiError as exc:  # gone meanwhile; the next pass publishes again
                    log.info("cannot annotate %s/%s: %s", sandbox, obj["metadata"]["name"], exc)

    async def _read_documents(self, uid: str, view: View, ptj: dict[str, Any], previous: dict[str, Any],
                              obs: Observation) -> None:
        spec = view.spec
        assert spec is not None
        mono, storage = time.monotonic(), view.storage
        if storage is None or not should_read_documents(ptj, previous, spec.runId, self._last_read.get(uid), mono,
                                                        self.cfg.progressPollSeconds):
            return
        self._last_read[uid] = mono
        try:
            docs = await self.io.run(view.io_tenant, DOCUMENTS_TIMEOUT, s3.read_documents, storage.endpoint,
                                     storage.region, storage.creds, spec.output.uri, spec.runId, dial=storage.dial)
        except TenantIOTimeout as exc:
            log.warning("%s/%s: %s", view.body["metadata"]["namespace"], view.body["metadata"]["name"], exc)
            return
        obs.progress, obs.evaluation, obs.result = docs.progress, docs.evaluation, docs.result

    async def _event(self, body: dict[str, Any], event_type: str, reason: str, message: str, now: datetime) -> None:
        try:
            await self.kube.create(ev.event(body, event_type, reason, message, now, instance=self.instance))
        except Exception as exc:  # an event is best effort; never fail the pass for it
            log.warning("cannot post event %s on %s/%s: %s", reason, body["metadata"]["namespace"],
                        body["metadata"]["name"], exc)

    # ---- tenant policies -------------------------------------------------------------------------

    async def reconcile_policy(self, body: dict[str, Any], tenants: tenancy.Tenancy) -> dict[str, Any] | None:
        """Write a TenantPolicy's status (what it governs, its GPU-hour usage) and its metrics. The
        stored object is read first: its usage ledger is the truth the pass adds to."""
        name = body["metadata"]["name"]
        fresh = await self.kube.get(k8s.TenantPolicy, name)
        if fresh is None or fresh["metadata"].get("uid") != body["metadata"].get("uid"):
            return None
        policy = tenancy.Policy.from_body(fresh)
        status, added = tenancy.policy_status(policy, tenants, self.clock())
        if changed(policy.status, status):
            await self.kube.apply_status(None, name, status, kind=TENANT_POLICY_KIND)
        budget = policy.spec.budget.gpuHours if policy.spec and policy.spec.budget else None
        self.metrics.observe_tenant(name, status, added, budget)
        self.metrics.retain_tenants({p.name for p in tenants.policies} | {name})  # deleted policies' series go
        return status

    # ---- deletion --------------------------------------------------------------------------------

    async def finalize(self, body: dict[str, Any], elapsed_seconds: float) -> bool:
        """Delete the sandbox; True when the finalizer may be released (gone, or waited long enough)."""
        meta = body["metadata"]
        ours = []  # under any of the job's sandbox names; one not the job's (a name conflict) is left alone
        for name in n.sandbox_candidates(self.cfg.sandboxPrefix, meta):
            ns = await self.kube.get(k8s.Namespace, name)
            if ns is not None and owns_namespace(ns, meta.get("uid", "")):
                ours.append(ns)
        done = not ours
        for ns in ours:
            if namespace_state(ns) == SANDBOX_ACTIVE:
                await self.kube.delete(k8s.Namespace, ns["metadata"]["name"], uid=ns["metadata"].get("uid"))
        if not done and elapsed_seconds >= self.cfg.deletionTimeoutSeconds:
            sandbox = ", ".join(ns["metadata"]["name"] for ns in ours)
            await self._event(body, ev.WARNING, "SandboxDeletionTimedOut",
                              f"namespace {sandbox} still exists after {int(elapsed_seconds)}s; releasing the "
                              "FineTuneJob anyway: delete the namespace by hand if it stays", self.clock())
            done = True
        if done:
            self.forget(body)
        return done

    # ---- the sweep of sandboxes without their job ------------------------------------------------

    async def sweep(self, namespace: dict[str, Any]) -> str:
        """Delete a sandbox whose FineTuneJob is gone (deleted with its finalizer stripped: tenants may
        patch their objects) or now has another sandbox (its name scheme changed); returns what was
        decided. Only namespaces this operator made (its labels, a job uid, the job annotation) are
        considered, and the delete carries the namespace's uid."""
        meta = namespace["metadata"]
        verdict = sweep_verdict(namespace, await self._job_of(namespace), self.cfg.sandboxPrefix)
        if verdict == "orphaned":
            self._forget_uid((meta.get("labels") or {}).get(n.LABEL_JOB_UID, ""))  # no finalizer said it went
        if verdict in ("orphaned", "superseded") and namespace_state(namespace) == SANDBOX_ACTIVE:
            if await self.kube.delete(k8s.Namespace, meta["name"], uid=meta.get("uid")):
                log.warning("deleted sandbox %s: %s", meta["name"], SWEEP_MESSAGES[verdict])
                self.metrics.sandboxes_swept.labels(verdict).inc()
        return verdict

    async def _job_of(self, namespace: dict[str, Any]) -> dict[str, Any] | None:
        owner = (namespace["metadata"].get("annotations") or {}).get(n.ANNOTATION_JOB, "")
        job_namespace, _, job_name = owner.partition("/")
        if not job_namespace or not job_name:
            return None
        return await self.kube.get(k8s.FineTuneJob, job_name, job_namespace)

    def forget(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        self.metrics.forget_job(meta["namespace"], meta["name"])
        self._forget_uid(meta.get("uid", ""))

    def _forget_uid(self, uid: str) -> None:
        """Drop what this process keeps of a job that is gone, its credentials' redaction included."""
        self._last_read.pop(uid, None)
        self._inputs_found.pop(uid, None)
        redact.REDACTOR.forget(uid)
        self._applied.pop(uid, None)
        self._last_pass.pop(uid, None)
        self._locks.pop(uid, None)
