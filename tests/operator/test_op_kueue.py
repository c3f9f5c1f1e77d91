"""What Kueue's Workload says about a run (kueue.py) and how the FineTuneJob's status shows it, and
how a run held by its tenant's policy (budget, running-job limit) shows."""

from __future__ import annotations

import dataclasses

import pytest

from finetune_operator import kueue
from finetune_operator.builders import names
from finetune_operator.builders.events import transition_events
from finetune_operator.status import SANDBOX_ABSENT, condition, derive_status
from finetune_operator.validation import Problem
from op_testdata import job, minimal_spec
from test_op_status import NOW, obs, ptj

PENDING_MESSAGE = ("couldn't assign flavors to pod set master: insufficient quota for nvidia.com/gpu in flavor a100, "
                   "previously considered podsets requests (0) + current podset request (8) > maximum capacity (0)")


def workload(*conditions, evictions=(), owner_uid="ptj-uid"):
    return {"metadata": {"name": "pytorchjob-train-1-abcde", "ownerReferences": [{"uid": owner_uid}]},
            "status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conditions],
                       **({"schedulingStats": {"evictions": list(evictions)}} if evictions else {})}}


PENDING = workload(("QuotaReserved", "False", "Pending", PENDING_MESSAGE))
ADMITTED = workload(("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue team-a"),
                    ("Admitted", "True", "Admitted", "The workload is admitted"))
PREEMPTED = workload(("QuotaReserved", "False", "Pending", "Preempted to accommodate a workload (UID: x) due to "
                      "reclamation within the cohort"),
                     ("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: x) due to reclamation "
                      "within the cohort"),
                     ("Admitted", "False", "NoReservation", ""),
                     evictions=[{"reason": "Preempted", "underlyingCause": "InCohortReclamation", "count": 2},
                                {"reason": "PodsReadyTimeout", "underlyingCause": "", "count": 5}])


@pytest.mark.parametrize("wl, admitted, reason, preemptions, evicted", [
    (PENDING, False, "Pending", 0, False),
    (ADMITTED, True, "Admitted", 0, False),
    (PREEMPTED, False, "Preempted", 2, True),
    (workload(), False, "Pending", 0, False),  # Kueue has not looked at it yet
])
def test_queue_state(wl, admitted, reason, preemptions, evicted):
    state = kueue.queue_state(wl, "team-a")
    assert (state.admitted, state.reason, state.preemptions, state.evicted_by_preemption) == (
        admitted, reason, preemptions, evicted)


def test_the_workload_of_a_run_is_found_by_its_owner():
    run = {"metadata": {"name": "train-1", "uid": "ptj-uid"}}
    other = workload(owner_uid="someone-else")
    assert kueue.workload_of([other, PENDING], run) is PENDING
    assert kueue.workload_of([other], run) is None and kueue.workload_of([PENDING], None) is None


@pytest.mark.parametrize("annotations, step, patch", [
    ({}, None, None),
    ({}, 40, {names.ANNOTATION_CHECKPOINT_STEP: "40", names.ANNOTATION_CHECKPOINT_TIME: "t40"}),
    ({names.ANNOTATION_CHECKPOINT_STEP: "40", names.ANNOTATION_CHECKPOINT_TIME: "t40"}, 40, None),
    ({names.ANNOTATION_CHECKPOINT_STEP: "40", names.ANNOTATION_CHECKPOINT_TIME: "t40"}, 60,
     {names.ANNOTATION_CHECKPOINT_STEP: "60", names.ANNOTATION_CHECKPOINT_TIME: "t60"}),
])
def test_checkpoint_freshness_annotations(annotations, step, patch):
    obj = {"metadata": {"name": "x", "annotations": annotations}}
    got = kueue.freshness_patch(obj, step, f"t{step}" if step else None)
    assert got == (None if patch is None else {"metadata": {"annotations": patch}})


QUEUED_JOB = job(minimal_spec(runPolicy={"queueName": "team-a"}))


@pytest.mark.parametrize("wl, phase, reason, in_message", [
    (PENDING, "Queued", "Queued", "insufficient quota for nvidia.com/gpu in flavor a100"),
    (PREEMPTED, "Queued", "Preempted", "resumes from checkpoint step 0"),
])
def test_status_of_a_queued_run_says_why_from_kueue(wl, phase, reason, in_message):
    status = derive_status(QUEUED_JOB, obs(pytorchjob=ptj("Created", "Suspended", suspend=True),
                                           queue=kueue.queue_state(wl, "team-a")))
    running = condition(status, "Running")
    assert status["phase"] == phase and running["reason"] == reason and in_message in running["message"]
    assert status["queue"]["clusterQueue"] == "team-a" and status["queue"]["workload"] == "pytorchjob-train-1-abcde"
    assert status["queue"]["admitted"] is False


def pending_summary(*items):
    """Kueue's visibility API answer (PendingWorkloadsSummary) for a LocalQueue."""
    return {"kind": "PendingWorkloadsSummary", "apiVersion": "visibility.kueue.x-k8s.io/v1beta2",
            "items": [{"metadata": {"name": name, "namespace": "ft-team-a-tiny"}, "priority": 0, "localQueueName": "team-a",
                       "positionInClusterQueue": position, "positionInLocalQueue": 0} for name, position in items]}


@pytest.mark.parametrize("summary, ahead", [
    (pending_summary(("pytorchjob-train-1-abcde", 2)), 2),
    (pending_summary(("other", 0), ("pytorchjob-train-1-abcde", 0)), 0),
    (pending_summary(("other", 0)), None),  # admitted meanwhile, or not queued yet
    ({"items": []}, None),
    ({}, None),
    ({"items": [None, "x", {"metadata": None}]}, None),  # nothing of it is trusted to have a shape
    (pending_summary(("pytorchjob-train-1-abcde", -1)), None),
    (pending_summary(("pytorchjob-train-1-abcde", "3")), None),
    (pending_summary(("pytorchjob-train-1-abcde", True)), None),
])
def test_workloads_ahead_from_the_visibility_api(summary, ahead):
    assert kueue.workloads_ahead(summary, "pytorchjob-train-1-abcde") == ahead


@pytest.mark.parametrize("ahead, shown", [
    (None, "(Pending): "), (0, "(Pending, next in line): "), (1, "(Pending, 1 workload ahead): "),
    (7, "(Pending, 7 workloads ahead): "),
])
def test_a_queued_run_shows_its_place_in_the_cluster_queue_when_kueue_knows_it(ahead, shown):
    queue = dataclasses.replace(kueue.queue_state(PENDING, "team-a"), workloads_ahead=ahead)
    status = derive_status(QUEUED_JOB, obs(pytorchjob=ptj("Created", "Suspended", suspend=True), queue=queue))
    assert condition(status, "Running")["message"] == (f"waiting in Kueue ClusterQueue team-a {shown}"
                                                       f"{PENDING_MESSAGE}")
    assert status["queue"].get("workloadsAhead") == ahead


def test_preemptions_are_counted_and_never_go_down():
    first = derive_status(QUEUED_JOB, obs(pytorchjob=ptj("Created", "Suspended", suspend=True),
                                          queue=kueue.queue_state(PREEMPTED, "team-a")))
    assert first["preemptions"] == 2
    again = derive_status({**QUEUED_JOB, "status": first},
                          obs(pytorchjob=ptj("Created", "Running"), queue=kueue.queue_state(ADMITTED, "team-a")))
    assert again["preemptions"] == 2 and again["queue"]["admitted"] is True and again["phase"] == "Running"


@pytest.mark.parametrize("hold", [Problem("BudgetExhausted", "TenantPolicy team-a has used 10 of its 10 GPU-hours"),
                                  Problem("RunningJobLimit", "TenantPolicy team-a allows 2 running job(s) at once")])
def test_a_held_job_is_queued_with_the_reason_and_an_event(hold):
    status = derive_status(job(), obs(sandbox_state=SANDBOX_ABSENT, applied=False, hold=hold, tenant_policy="team-a"))
    running = condition(status, "Running")
    assert status["phase"] == "Queued" and (running["reason"], running["message"]) == (hold.reason, hold.message)
    assert condition(status, "SandboxReady")["reason"] == "Waiting"
    assert status["tenantPolicy"] == "team-a"
    assert (hold.reason, hold.message) in [(r, m) for _, r, m in transition_events({}, status)]


def test_a_policy_violation_is_an_event_naming_the_policy():
    problem = Problem("PolicyViolation", "spec.resources.nodePool: node pool 'a100' is not allowed (TenantPolicy "
                                         "team-a: allowed pools: local)")
    status = derive_status(job(), obs(problems=[problem], sandbox_state=SANDBOX_ABSENT, applied=False))
    assert condition(status, "Validated")["reason"] == "PolicyViolation" and status["phase"] == "Pending"
    assert ("Warning", "PolicyViolation", problem.message) in transition_events({}, status)


@pytest.mark.parametrize("spec, active, patch", [
    ({}, True, None),
    ({}, False, {"spec": {"active": False}}),
    ({"active": False}, False, None),
    ({"active": False}, True, {"spec": {"active": True}}),
])
def test_a_user_suspends_a_queued_run_through_its_workload(spec, active, patch):
    assert kueue.activation_patch({"metadata": {"name": "w"}, "spec": spec}, active) == patch
