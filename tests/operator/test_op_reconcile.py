"""The reconcile's decisions (pure: observed view -> plan), events, metrics and kopf wiring."""

from __future__ import annotations

import copy
from datetime import datetime, timezone

import kopf
import pytest

from finetune_operator.builders import JobRef, names, run_objects
from finetune_operator.builders.events import event, transition_events
from finetune_operator.config import OperatorConfig
from finetune_operator.handlers import configure_settings, register
from finetune_operator.reconcile import View, decide, needs_apply, objects_digest, should_read_documents, timer_due
from finetune_operator.status import SANDBOX_ABSENT, SANDBOX_ACTIVE, SANDBOX_EXPIRED, SANDBOX_TERMINATING
from finetune_operator.validation import Facts, Problem, validate
from op_testdata import ROOT, job, minimal_spec

CFG = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml").model_copy(update={"allowedClusterQueues": ["q"]})
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
CPU = {"gpusPerWorker": 0, "nodePool": "cpu"}
SECRET = {"data": {"AWS_ACCESS_KEY_ID": "eA==", "AWS_SECRET_ACCESS_KEY": "eQ=="}}
OURS = {names.LABEL_JOB_UID: job()["metadata"]["uid"]}
ACTIVE_NS = {"metadata": {"name": "ftj-team-a-support-bot", "labels": OURS}, "status": {"phase": "Active"}}
TERMINATING_NS = {"metadata": {"name": "ftj-team-a-support-bot", "labels": OURS,
                               "deletionTimestamp": "2026-01-01T11:00:00Z"}, "status": {"phase": "Terminating"}}
FOREIGN_NS = {"metadata": {"name": "ftj-team-a-support-bot", "labels": {names.LABEL_JOB_UID: "another-uid"},
                           "annotations": {names.ANNOTATION_JOB: "team-a-support/bot"}}, "status": {"phase": "Active"}}
SUCCEEDED = {"runId": "1", "completionTime": "2026-01-01T11:00:00Z",
             "conditions": [{"type": "Succeeded", "status": "True"}]}


def body(status=None, **spec_overrides):
    spec = minimal_spec(resources=CPU, **spec_overrides)
    return job(spec, status=status)


def existing_run(b, **changes):
    """The PyTorchJob the operator made for `b` (as read back), optionally for a changed spec."""
    ptj = run_objects(JobRef.from_body(b), CFG)[1]
    if changes:
        ptj["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH] = "0123456789abcdef"
    return ptj


def view(b, problems=None, **kw):
    spec, found = validate(b["spec"], CFG, Facts())
    return View(body=b, now=NOW, spec=spec, problems=found if problems is None else problems,
                secret=kw.pop("secret", SECRET), **kw)


def kinds(objects):
    return [o["kind"] for o in objects]


SANDBOX_KINDS = ["Namespace", "NetworkPolicy", "NetworkPolicy", "ResourceQuota", "LimitRange", "ServiceAccount", "Secret"]
B = body()
CASES = [
    # name, view, expected (sandbox_state, applied kinds, deleted kinds, drift, suspend patch, requeue?, permanent?)
    ("new job: sandbox then run", view(B), (SANDBOX_ACTIVE, SANDBOX_KINDS + ["ConfigMap", "PyTorchJob"], [], False, None, False, False)),
    ("invalid: nothing is created", view(B, problems=[Problem("SecretNotFound", "spec.credentials.secretName: x")]),
     (SANDBOX_ABSENT, [], [], False, None, False, True)),
    ("S3 unreachable: wait, nothing created", view(B, problems=[Problem("S3Unreachable", "spec.model.uri: x")]),
     (SANDBOX_ABSENT, [], [], False, None, True, False)),
    ("problem during a run: the run is left alone, the Secret's copy follows the Secret",
     view(B, problems=[Problem("UnknownNodePool", "x")], namespace=ACTIVE_NS, pytorchjob=existing_run(B)),
     (SANDBOX_ACTIVE, ["Secret"], [], False, None, False, False)),
    ("problem during a run, the Secret not usable: its copy goes",
     view(B, problems=[Problem("UnknownNodePool", "x")], namespace=ACTIVE_NS, pytorchjob=existing_run(B), secret=None),
     (SANDBOX_ACTIVE, [], ["Secret"], False, None, False, False)),
    ("a spec that does not parse during a run: no Secret it names is judged, the copy goes",
     View(body=B, now=NOW, spec=None, problems=[Problem("InvalidSpec", "x")], namespace=ACTIVE_NS,
          pytorchjob=existing_run(B)),
     (SANDBOX_ACTIVE, [], ["Secret"], False, None, False, False)),
    ("the Secret went during a run: its copy goes, the run stays", view(B, problems=[Problem("SecretNotFound", "x")],
                                                                        namespace=ACTIVE_NS, pytorchjob=existing_run(B),
                                                                        secret=None),
     (SANDBOX_ACTIVE, [], ["Secret"], False, None, False, False)),
    ("the Secret lost its opt-in: its copy goes",
     view(B, problems=[Problem("SecretNotOptedIn", "x")], namespace=ACTIVE_NS, secret=None),
     (SANDBOX_ACTIVE, [], ["Secret"], False, None, False, True)),
    ("steady state: the sandbox and config again, the run left to its controllers",
     view(B, namespace=ACTIVE_NS, pytorchjob=existing_run(B)),
     (SANDBOX_ACTIVE, SANDBOX_KINDS + ["ConfigMap"], [], False, None, False, False)),
    ("suspend toggled alone: patched",
     view(body(runPolicy={"suspend": True}), namespace=ACTIVE_NS, pytorchjob=existing_run(B)),
     (SANDBOX_ACTIVE, SANDBOX_KINDS + ["ConfigMap"], [], False, True, False, False)),
    ("resumed by the user: patched",
     view(B, namespace=ACTIVE_NS, pytorchjob={**existing_run(B), "spec": {"runPolicy": {"suspend": True}}}),
     (SANDBOX_ACTIVE, SANDBOX_KINDS + ["ConfigMap"], [], False, False, False, False)),
    ("queued run suspended by the user: left to Kueue (its Workload is deactivated)",
     view(body(runPolicy={"queueName": "q", "suspend": True}), namespace=ACTIVE_NS,
          pytorchjob=existing_run(body(runPolicy={"queueName": "q"}))),
     (SANDBOX_ACTIVE, SANDBOX_KINDS + ["LocalQueue", "ConfigMap"], [], False, None, False, False)),
    ("queued run held by Kueue: suspend left to Kueue",
     view(body(runPolicy={"queueName": "q"}), namespace=ACTIVE_NS,
          pytorchjob={**existing_run(body(runPolicy={"queueName": "q"})), "spec": {"runPolicy": {"suspend": True}}}),
     (SANDBOX_ACTIVE, SANDBOX_KINDS + ["LocalQueue", "ConfigMap"], [], False, None, False, False)),
    ("new queued job: a LocalQueue in the sandbox", view(body(runPolicy={"queueName": "q"})),
     (SANDBOX_ACTIVE, SANDBOX_KINDS + ["LocalQueue", "ConfigMap", "PyTorchJob"], [], False, None, False, False)),
    ("new queued job created suspended: the sandbox, no run Kueue could admit",
     view(body(runPolicy={"queueName": "q", "suspend": True})),
     (SANDBOX_ACTIVE, SANDBOX_KINDS + ["LocalQueue"], [], False, None, False, False)),
    ("held by the tenant's budget: nothing created, look again later",
     view(B, hold=Problem("BudgetExhausted", "x")), (SANDBOX_ABSENT, [], [], False, None, True, False)),
    ("held, with a sandbox from an earlier run: the sandbox kept, no run",
     view(B, hold=Problem("RunningJobLimit", "x"), namespace=ACTIVE_NS),
     (SANDBOX_ACTIVE, SANDBOX_KINDS, [], False, None, True, False)),
    ("spec changed mid-run: reported, not applied", view(B, namespace=ACTIVE_NS, pytorchjob=existing_run(B, changed=True)),
     (SANDBOX_ACTIVE, SANDBOX_KINDS, [], True, None, False, False)),
    ("suspend toggled with another change: suspend still applied",
     view(body(runPolicy={"suspend": True}), namespace=ACTIVE_NS, pytorchjob=existing_run(B, changed=True)),
     (SANDBOX_ACTIVE, SANDBOX_KINDS, [], True, True, False, False)),
    ("queued by Kueue, spec changed: Kueue keeps suspend",
     view(body(runPolicy={"queueName": "q"}), namespace=ACTIVE_NS,
          pytorchjob={**existing_run(body(runPolicy={"queueName": "q"}), changed=True),
                      "spec": {"runPolicy": {"suspend": True}}}),
     (SANDBOX_ACTIVE, SANDBOX_KINDS + ["LocalQueue"], [], True, None, False, False)),
    ("new runId: old run deleted first", view(body(runId="2"), namespace=ACTIVE_NS, other_runs=[existing_run(B)]),
     (SANDBOX_ACTIVE, SANDBOX_KINDS, ["PyTorchJob", "ConfigMap"], False, None, True, False)),
    ("new runId: old pods still going", view(body(runId="2"), namespace=ACTIVE_NS, other_run_pods=2),
     (SANDBOX_ACTIVE, SANDBOX_KINDS, [], False, None, True, False)),
    ("sandbox terminating: wait", view(B, namespace=TERMINATING_NS), (SANDBOX_TERMINATING, [], [], False, None, True, False)),
    ("finished: never re-created", view(body(status=SUCCEEDED), namespace=ACTIVE_NS),
     (SANDBOX_ACTIVE, SANDBOX_KINDS, [], False, None, False, False)),
    ("finished, sandbox deleted by hand: not re-created", view(body(status=SUCCEEDED)),
     (SANDBOX_ABSENT, [], [], False, None, False, False)),
    ("finished, ttl not reached", view(body(status=SUCCEEDED, runPolicy={"ttlSecondsAfterFinished": 7200}), namespace=ACTIVE_NS),
     (SANDBOX_ACTIVE, SANDBOX_KINDS, [], False, None, False, False)),
    ("finished, ttl passed: sandbox deleted", view(body(status=SUCCEEDED, runPolicy={"ttlSecondsAfterFinished": 60}),
                                                   namespace=ACTIVE_NS),
     (SANDBOX_EXPIRED, [], ["Namespace"], False, None, False, False)),
    ("namespace of another job: refused, untouched", view(B, namespace=FOREIGN_NS),
     (SANDBOX_ABSENT, [], [], False, None, False, True)),
    ("ttl passed but the namespace is not ours: untouched",
     view(body(status=SUCCEEDED, runPolicy={"ttlSecondsAfterFinished": 60}), namespace=FOREIGN_NS),
     (SANDBOX_ABSENT, [], [], False, None, False, True)),
    ("ttl passed, sandbox gone: stays gone", view(body(status=SUCCEEDED, runPolicy={"ttlSecondsAfterFinished": 60})),
     (SANDBOX_EXPIRED, [], [], False, None, False, False)),
]


@pytest.mark.parametrize("name,v,expected", CASES, ids=[c[0] for c in CASES])
def test_decide(name, v, expected):
    state, applied, deleted, drift, suspend, requeue, permanent = expected
    plan = decide(v, CFG)
    assert plan.sandbox_state == state
    assert kinds(plan.apply) == applied
    assert kinds(plan.delete) == deleted
    assert plan.spec_drift == drift and plan.suspend_patch == suspend
    assert (plan.requeue_after is not None) == requeue
    assert bool(plan.permanent) == permanent


def test_the_copy_that_follows_the_secret_holds_its_credentials_only():
    rotated = {"data": {"AWS_ACCESS_KEY_ID": "bmV3", "AWS_SECRET_ACCESS_KEY": "cm90YXRlZA==", "other": "eA=="}}
    plan = decide(view(B, problems=[Problem("UnknownNodePool", "x")], namespace=ACTIVE_NS, pytorchjob=existing_run(B),
                       secret=rotated), CFG)
    [copy] = plan.apply
    assert copy["metadata"]["namespace"] == plan.sandbox and copy["metadata"]["name"] == names.CREDENTIALS_SECRET
    assert copy["data"] == {"AWS_ACCESS_KEY_ID": "bmV3", "AWS_SECRET_ACCESS_KEY": "cm90YXRlZA=="}


STEADY = view(B, namespace=ACTIVE_NS, pytorchjob=existing_run(B))
STEADY_DIGEST = objects_digest(decide(STEADY, CFG).apply)
RESYNC = 600.0
APPLY_CASES = [
    # name, view, last successful apply (digest, monotonic time) or None, now (monotonic), expected
    ("first pass since the operator started", STEADY, None, 1000.0, True),
    ("same objects, applied recently: no request", STEADY, (STEADY_DIGEST, 900.0), 1000.0, False),
    ("same objects, resync period passed", STEADY, (STEADY_DIGEST, 300.0), 1000.0, True),
    ("desired objects changed (e.g. a rotated Secret)", STEADY, ("another-digest", 900.0), 1000.0, True),
    ("sandbox namespace deleted by hand", view(B, pytorchjob=existing_run(B)), (STEADY_DIGEST, 900.0), 1000.0, True),
    ("sandbox namespace terminating: it waits, nothing to apply",
     view(B, namespace=TERMINATING_NS, pytorchjob=existing_run(B)), (STEADY_DIGEST, 900.0), 1000.0, False),
    ("the run's PyTorchJob is missing", view(B, namespace=ACTIVE_NS), (STEADY_DIGEST, 900.0), 1000.0, True),
    ("nothing to apply", view(body(status=SUCCEEDED)), None, 1000.0, False),
]


@pytest.mark.parametrize("name,v,last,now,expected", APPLY_CASES, ids=[c[0] for c in APPLY_CASES])
def test_needs_apply(name, v, last, now, expected):
    plan = decide(v, CFG)
    assert needs_apply(plan, v, objects_digest(plan.apply), last, now, RESYNC) is expected


def test_resync_zero_applies_on_every_pass():
    assert needs_apply(decide(STEADY, CFG), STEADY, STEADY_DIGEST, (STEADY_DIGEST, 999.0), 1000.0, 0) is True


def observed(status, **spec_overrides):
    b = body(status=copy.deepcopy(status), **spec_overrides)
    b["metadata"]["generation"] = 3
    b["status"]["observedGeneration"] = 3
    return b


SANDBOX_KEPT = {"type": "SandboxReady", "status": "True", "reason": "Ready"}
SANDBOX_GONE_TTL = {"type": "SandboxReady", "status": "False", "reason": "DeletedAfterTTL"}
RUNNING = {"runId": "1", "conditions": [{"type": "Running", "status": "True"}]}
IDLE = 300.0
TIMER_CASES = [
    # name, job, seconds since its last pass (None: none since the operator started), expected
    ("running: every tick", observed(RUNNING), 10, True),
    ("finished, no TTL, passed recently: skipped", observed(SUCCEEDED), 10, False),
    ("finished, no TTL, idle period over", observed(SUCCEEDED), 301, True),
    ("finished, first tick since the operator started", observed(SUCCEEDED), None, True),
    ("finished, TTL pending: every tick", observed({**SUCCEEDED, "conditions": SUCCEEDED["conditions"] + [SANDBOX_KEPT]},
                                                   runPolicy={"ttlSecondsAfterFinished": 60}), 10, True),
    ("finished, sandbox deleted after TTL: skipped",
     observed({**SUCCEEDED, "conditions": SUCCEEDED["conditions"] + [SANDBOX_GONE_TTL]},
              runPolicy={"ttlSecondsAfterFinished": 60}), 10, False),
    ("finished run of an older runId: every tick", observed(SUCCEEDED, runId="2"), 10, True),
    ("spec changed since the status was written: every tick",
     {**observed(SUCCEEDED), "metadata": {**observed(SUCCEEDED)["metadata"], "generation": 4}}, 10, True),
]


@pytest.mark.parametrize("name,b,since,expected", TIMER_CASES, ids=[c[0] for c in TIMER_CASES])
def test_timer_due(name, b, since, expected):
    now = 10_000.0
    assert timer_due(b, None if since is None else now - since, now, IDLE) is expected


def test_idle_zero_passes_every_tick():
    assert timer_due(observed(SUCCEEDED), 9_999.0, 10_000.0, 0) is True


def test_sandbox_conflict_names_no_one_else():
    plan = decide(view(B, namespace=FOREIGN_NS), CFG)
    assert [p.reason for p in plan.problems] == ["SandboxConflict"]
    assert "team-a-support/bot" not in plan.permanent and "were not made for it" in plan.permanent
    assert not plan.apply and not plan.delete


def test_permanent_message_names_the_field():
    plan = decide(view(B, problems=[Problem("SecretNotFound", "spec.credentials.secretName: Secret 's3' not found")]), CFG)
    assert "spec.credentials.secretName" in plan.permanent


def test_old_run_objects_are_named_by_their_run_id():
    plan = decide(next(c[1] for c in CASES if c[0] == "new runId: old run deleted first"), CFG)
    assert [o["metadata"]["name"] for o in plan.delete] == ["train-1", "trainer-config-1"]
    assert plan.replacing_run == "1"


def observed_as(obj, uid):
    """`obj` as read back from the API server, with its uid."""
    obj = copy.deepcopy(obj)
    obj["metadata"]["uid"] = uid
    return obj


DELETE_CASES = [
    # name, view, expected (kind, uid precondition) of each delete -- None: by name
    ("old run: the PyTorchJob as observed; its ConfigMap, never read, by name",
     view(body(runId="2"), namespace=ACTIVE_NS, other_runs=[observed_as(existing_run(B), "uid-old-run")]),
     [("PyTorchJob", "uid-old-run"), ("ConfigMap", None)]),
    ("old run observed without a uid: by name", view(body(runId="2"), namespace=ACTIVE_NS, other_runs=[existing_run(B)]),
     [("PyTorchJob", None), ("ConfigMap", None)]),
    ("ttl passed: the namespace as observed",
     view(body(status=SUCCEEDED, runPolicy={"ttlSecondsAfterFinished": 60}), namespace=observed_as(ACTIVE_NS, "uid-ns")),
     [("Namespace", "uid-ns")]),
    ("the Secret went: its copy, never read, by name",
     view(B, problems=[Problem("SecretNotFound", "x")], namespace=ACTIVE_NS), [("Secret", None)]),
]


@pytest.mark.parametrize("name, v, expected", DELETE_CASES, ids=[c[0] for c in DELETE_CASES])
def test_deletes_carry_the_uid_of_the_object_observed(name, v, expected):
    """A delete of an object the pass observed has its uid as precondition (Reconciler -> Kube.delete(uid=)):
    an object of the same name made since is not deleted."""
    assert [(o["kind"], o["metadata"].get("uid")) for o in decide(v, CFG).delete] == expected


def ptj_with(*conds):
    return {"metadata": {"name": "train-1"}, "status": {"conditions": [{"type": c, "status": "True"} for c in conds]}}


@pytest.mark.parametrize("ptj,previous,last,now,expected", [
    (None, {}, None, 100.0, False),
    (ptj_with("Created"), {}, None, 100.0, False),
    (ptj_with("Running"), {}, None, 100.0, True),
    (ptj_with("Running"), {}, 95.0, 100.0, False),  # rate-limited (10 s in the dev config)
    (ptj_with("Running"), {}, 85.0, 100.0, True),
    (ptj_with("Restarting"), {}, None, 100.0, True),
    (ptj_with("Succeeded"), {}, 99.0, 100.0, True),  # the final documents, once
    (ptj_with("Succeeded"), SUCCEEDED, None, 100.0, False),
])
def test_should_read_documents(ptj, previous, last, now, expected):
    assert should_read_documents(ptj, previous, "1", last, now, 10.0) == expected


@pytest.mark.parametrize("old,new,expected", [
    ({}, {"conditions": [{"type": "Validated", "status": "False", "reason": "SecretNotFound", "message": "m"}]},
     [("Warning", "SecretNotFound", "m")]),
    ({"conditions": [{"type": "Validated", "status": "False", "reason": "SecretNotFound"}]},
     {"conditions": [{"type": "Validated", "status": "False", "reason": "SecretNotFound", "message": "m"}]}, []),
    ({}, {"conditions": [{"type": "Running", "status": "False", "reason": "NotStarted"}]}, []),
    ({"conditions": [{"type": "Running", "status": "True", "reason": "Training"}]},
     {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed", "message": "done"},
                     {"type": "Running", "status": "False", "reason": "Finished"}]},
     [("Normal", "Completed", "done")]),
    ({"conditions": [{"type": "Running", "status": "True", "reason": "Training"}]},
     {"conditions": [{"type": "Running", "status": "True", "reason": "ProgressStalled", "message": "quiet"}]},
     [("Warning", "ProgressStalled", "quiet")]),
    # a pod that cannot start: one warning when the run gets stuck, none while the kubelet alternates
    # between the pull error and its back-off, a new one when the trouble changes
    ({"conditions": [{"type": "Running", "status": "False", "reason": "Starting"}]},
     {"conditions": [{"type": "Running", "status": "False", "reason": "ErrImagePull", "message": "pod p: pull"}]},
     [("Warning", "ErrImagePull", "pod p: pull")]),
    ({"conditions": [{"type": "Running", "status": "False", "reason": "ErrImagePull"}]},
     {"conditions": [{"type": "Running", "status": "False", "reason": "ImagePullBackOff", "message": "m"}]}, []),
    ({"conditions": [{"type": "Running", "status": "False", "reason": "ImagePullBackOff"}]},
     {"conditions": [{"type": "Running", "status": "False", "reason": "ErrImagePull", "message": "m"}]}, []),
    ({}, {"conditions": [{"type": "Running", "status": "False", "reason": "ImagePullBackOff", "message": "m"}]},
     [("Warning", "ImagePullBackOff", "m")]),
    ({"conditions": [{"type": "Running", "status": "True", "reason": "Training"}]},
     {"conditions": [{"type": "Running", "status": "False", "reason": "CrashLoopBackOff", "message": "crash"}]},
     [("Warning", "CrashLoopBackOff", "crash")]),
    ({"conditions": [{"type": "Running", "status": "False", "reason": "ErrImagePull"}]},
     {"conditions": [{"type": "Running", "status": "False", "reason": "CreateContainerConfigError", "message": "c"}]},
     [("Warning", "CreateContainerConfigError", "c")]),
    ({}, {"conditions": [{"type": "Running", "status": "False", "reason": "ContainerCreating", "message": "slow"}]},
     [("Warning", "ContainerCreating", "slow")]),
])
def test_transition_events(old, new, expected):
    assert transition_events(old, new) == expected


def test_event_object():
    e = event(job(), "Warning", "SecretNotFound", "spec.credentials.secretName: missing", NOW)
    assert e["involvedObject"]["kind"] == "FineTuneJob" and e["involvedObject"]["uid"] == job()["metadata"]["uid"]
    assert e["metadata"]["namespace"] == "team-a" and e["type"] == "Warning"
    assert e["metadata"]["name"] != event(job(), "Warning", "SecretNotFound", "other", NOW)["metadata"]["name"]


def test_an_event_names_the_operator_replica_that_reported_it():
    e = event(job(), "Normal", "Running", "step 1/10", NOW, instance="finetune-operator-7d9f-abcde")
    assert (e["reportingComponent"], e["reportingInstance"]) == ("finetune-operator", "finetune-operator-7d9f-abcde")


def test_kopf_wiring():
    registry = kopf.OperatorRegistry()
    register(registry, CFG, start_metrics_server=False)
    ids = {str(h.id) for h in registry._changing.get_all_handlers()}
    assert {"create", "update/spec", "resume", "cleanup"} <= ids, ids
    timers = {str(h.id) for h in registry._spawning.get_all_handlers()}
    # the jobs' timer and the tenant policies' status (the sandboxes' sweep is a loop of its own: test_op_sweeper)
    assert timers == {"reconcile", "policy-status"}, timers
    indexes = {str(h.id) for h in registry._indexing.get_all_handlers()}
    assert indexes == {"namespace_labels", "tenant_policies", "job_summaries"}, indexes
    settings = kopf.OperatorSettings()
    configure_settings(settings)
    assert settings.persistence.finalizer == names.FINALIZER
    assert settings.posting.enabled is False


@pytest.mark.parametrize("handler_id", ["create", "update/spec", "resume", "cleanup"])
def test_an_internal_error_reaches_kopf_without_its_text(handler_id, caplog):
    """kopf stores a failed handler's message in the job's annotations, which the tenant reads: an
    unexpected exception becomes a retry with a fixed message; its text goes to the operator's log only."""
    import asyncio
    import datetime as dt

    registry = kopf.OperatorRegistry()
    register(registry, CFG, start_metrics_server=False)
    handler = next(h for h in registry._changing.get_all_handlers() if str(h.id) == handler_id)

    class Failing:
        async def fail(self, *_args):
            raise RuntimeError('namespaces "ftj-other-tenant-x" is forbidden: 10.96.0.1')

        reconcile = finalize = fail

    memo = kopf.Memo(reconciler=Failing())
    indexes = {"tenant_policies": {}, "namespace_labels": {}, "job_summaries": {}}
    with pytest.raises(kopf.TemporaryError) as raised:
        asyncio.run(handler.fn(body=job(), memo=memo, runtime=dt.timedelta(seconds=1), **indexes))
    assert str(raised.value) == "the operator hit an internal error (the details are in its log); retrying"
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert "ftj-other-tenant-x" in caplog.text  # the details stay in the operator's log


def _sandbox_ns(name: str, uid: str = "uid-b", managed: bool = True, annotated: bool = True) -> dict:
    labels = {names.LABEL_JOB_UID: uid}
    if managed:
        labels[names.LABEL_MANAGED_BY] = names.MANAGER
    annotations = {names.ANNOTATION_JOB: "team-a/job-b"} if annotated else {}
    return {"metadata": {"name": name, "labels": labels, "annotations": annotations}, "status": {"phase": "Active"}}


def _job(uid: str = "uid-b") -> dict:
    return {"metadata": {"namespace": "team-a", "name": "job-b", "uid": uid}}


CURRENT = names.sandbox_namespace("ftj", "team-a", "job-b", "uid-b")


@pytest.mark.parametrize("namespace, job, verdict", [
    (_sandbox_ns(CURRENT), _job(), "keep"),
    (_sandbox_ns(CURRENT), None, "orphaned"),                          # deleted with the finalizer stripped
    (_sandbox_ns(CURRENT), _job(uid="uid-new"), "orphaned"),           # a new job under the old name
    (_sandbox_ns("ftj-team-a-job-b"), _job(), "superseded"),           # the name scheme of an older operator
    (_sandbox_ns(CURRENT, managed=False), None, "not-a-sandbox"),      # someone else's namespace
    (_sandbox_ns(CURRENT, annotated=False), None, "not-a-sandbox"),
])
def test_sweep_verdict(namespace, job, verdict):
    from finetune_operator.reconcile import sweep_verdict

    assert sweep_verdict(namespace, job, "ftj") == verdict
