"""A queued search's passes of `Reconciler.reconcile` over an in-memory API (no cluster, no S3): its trials
wait in Kueue like a run (the job Queued, the trials Pending), suspend and resume go through the trials'
Workloads, a suspended search remakes no trial, and a trial is never taken for the job's single run."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator import k8s, s3, tenancy
from finetune_operator.config import OperatorConfig
from finetune_operator.s3 import RunDocuments
from finetune_operator.validation import S3Check
from op_testdata import ROOT, job, minimal_spec
from test_op_tenancy_reconcile import LABELS, LOOSE, SECRET, FakeKube, passes, running

CFG = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml").model_copy(update={"allowedClusterQueues": ["q"]})
OUTPUT = "s3://team-a/models/support-bot/"
SEARCH = {"parameters": {"learningRate": {"values": [1e-4, 3e-4, 1e-3]}}, "trials": 3, "parallelism": 2,
          "strategy": "grid", "seed": 3, "pruning": {"rule": "none"}}
SPEC = minimal_spec(resources={"gpusPerWorker": 0, "nodePool": "cpu"}, evaluation={"everySteps": 5},
                    runPolicy={"queueName": "q"}, search=SEARCH)
PENDING = {"type": "QuotaReserved", "status": "False", "reason": "Pending",
           "message": "couldn't assign flavors to pod set master: insufficient unused quota for cpu"}
WORKLOAD_CONDITIONS = {
    "waiting": [PENDING],
    "admitted": [{"type": "Admitted", "status": "True", "reason": "Admitted", "message": "admitted by q"}],
    "preempted": [{"type": "Admitted", "status": "False", "reason": "NoReservation", "message": "evicted"},
                  {"type": "Evicted", "status": "True", "reason": "Preempted",
                   "message": "Preempted to accommodate a workload of higher priority"}],
}


@pytest.fixture(autouse=True)
def reads(monkeypatch) -> list[str]:
    """No S3: every input is there; the output prefixes whose documents a pass read (none written yet)."""
    read: list[str] = []
    monkeypatch.setattr(s3, "check_inputs", lambda endpoint, region, creds, uris, **_: {
        path: S3Check(True) for path in uris})

    def read_documents(endpoint, region, creds, output_uri, run_id, **_):
        read.append(output_uri)
        return RunDocuments()

    monkeypatch.setattr(s3, "read_documents", read_documents)
    return read


def new_search() -> FakeKube:
    return FakeKube(job(SPEC), SECRET)


def one_pass(kube: FakeKube) -> dict[str, Any]:
    return passes(kube, CFG, tenancy.Tenancy())[0].status


def stored_job(kube: FakeKube) -> dict[str, Any]:
    return kube.store[(k8s.FineTuneJob, "team-a", "support-bot")]


def trial_jobs(kube: FakeKube) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in kube.objects("PyTorchJob")}


def kueue_sets(kube: FakeKube, number: int, state: str) -> str:
    """Trial `number`'s PyTorchJob and Workload as Kueue leaves them in `state` (waiting, admitted, preempted):
    suspended until admitted, running once admitted. The Workload's name."""
    ptj = trial_jobs(kube)[f"train-1-t{number}"]
    sandbox = ptj["metadata"]["namespace"]
    ptj["metadata"]["uid"] = f"uid-t{number}"
    ptj["spec"]["runPolicy"]["suspend"] = state != "admitted"
    ptj["status"] = {"conditions": [{"type": "Running" if state == "admitted" else "Suspended", "status": "True"}]}
    name = f"pytorchjob-train-1-t{number}-abc"
    old = kube.store.get((k8s.Workload, sandbox, name))
    kube.store[(k8s.Workload, sandbox, name)] = {
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
        "metadata": {"name": name, "namespace": sandbox,
                     "ownerReferences": [{"kind": "PyTorchJob", "uid": f"uid-t{number}"}]},
        "spec": old["spec"] if old else {"active": True}, "status": {"conditions": WORKLOAD_CONDITIONS[state]}}
    return name


def phases(status: dict[str, Any]) -> list[str]:
    return [t["phase"] for t in status["search"]["trials"]]


def test_a_queued_search_is_queued_until_kueue_admits_a_trial():
    kube = new_search()
    created = one_pass(kube)
    assert sorted(trial_jobs(kube)) == ["train-1-t0", "train-1-t1"]
    assert (created["phase"], running(created)["reason"]) == ("Queued", "Queued"), running(created)
    assert "suspended by their queue" in running(created)["message"] and phases(created) == ["Pending", "Pending"]

    first = kueue_sets(kube, 0, "waiting")
    kueue_sets(kube, 1, "waiting")
    waiting = one_pass(kube)
    assert (waiting["phase"], running(waiting)["reason"]) == ("Queued", "Queued"), running(waiting)
    assert "Kueue ClusterQueue q" in running(waiting)["message"] and PENDING["message"] in running(waiting)["message"]
    assert waiting["queue"]["workload"] == first and not waiting["queue"]["admitted"]
    assert phases(waiting) == ["Pending", "Pending"]

    kueue_sets(kube, 0, "admitted")
    searching = one_pass(kube)
    assert (searching["phase"], running(searching)["reason"]) == ("Running", "Searching"), running(searching)
    assert phases(searching) == ["Running", "Pending"]
    assert searching["queue"]["workload"] == "pytorchjob-train-1-t1-abc"  # the trial still waiting

    kueue_sets(kube, 0, "preempted")
    preempted = one_pass(kube)
    assert (preempted["phase"], running(preempted)["reason"]) == ("Queued", "Preempted"), running(preempted)
    assert phases(preempted) == ["Pending", "Pending"] and preempted["queue"]["workload"] == first
    assert kube.patches == []  # not suspended: every Workload stays active


def test_a_suspended_queued_search_deactivates_its_trials_and_remakes_none():
    """Suspending a queued search deactivates its trials' Workloads (Kueue's way) and makes no trial whose
    PyTorchJob is gone: Kueue would admit it while the job is suspended. Resuming undoes both."""
    kube = new_search()
    one_pass(kube)
    admitted = kueue_sets(kube, 0, "admitted")
    kueue_sets(kube, 1, "waiting")
    one_pass(kube)
    stored_job(kube)["spec"]["runPolicy"]["suspend"] = True
    t1 = trial_jobs(kube)["train-1-t1"]
    kube.store.pop((k8s.PyTorchJob, t1["metadata"]["namespace"], "train-1-t1"))  # deleted meanwhile

    suspended = one_pass(kube)
    assert suspended["phase"] == "Suspended"
    assert sorted(trial_jobs(kube)) == ["train-1-t0"]
    assert kube.patches == [("Workload", admitted, {"spec": {"active": False}})]
    assert phases(suspended) == ["Running", "Pending"]  # t0's pods go once Kueue evicts it

    stored_job(kube)["spec"]["runPolicy"]["suspend"] = False
    resumed = one_pass(kube)
    assert sorted(trial_jobs(kube)) == ["train-1-t0", "train-1-t1"]  # made again, it resumes from its checkpoint
    assert kube.patches[-1] == ("Workload", admitted, {"spec": {"active": True}})
    assert resumed["phase"] != "Suspended"


def test_a_pass_that_starts_a_trial_takes_it_for_no_single_run(reads):
    """The pass that makes trial 2 reads no documents of the job's own prefix, shows no PyTorchJob of the job
    and counts no job-level restarts from the trials' pods (each trial's are its own)."""
    kube = new_search()
    one_pass(kube)
    kueue_sets(kube, 0, "admitted")
    kueue_sets(kube, 1, "admitted")
    trial_jobs(kube)["train-1-t0"]["status"] = {"conditions": [{"type": "Succeeded", "status": "True"}]}
    sandbox = trial_jobs(kube)["train-1-t1"]["metadata"]["namespace"]
    kube.store[(k8s.Pod, sandbox, "train-1-t1-master-0")] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "train-1-t1-master-0", "namespace": sandbox,
                     "labels": {**trial_jobs(kube)["train-1-t1"]["metadata"]["labels"]}},
        "status": {"phase": "Running", "containerStatuses": [{"restartCount": 3}]}}
    reads.clear()

    status = one_pass(kube)
    assert "train-1-t2" in trial_jobs(kube)
    assert "pytorchJob" not in status and not status.get("restarts"), status
    assert reads and all(uri.startswith(OUTPUT + "trials/t") for uri in reads), reads
    assert kube.patches == []


# ---- the tenant's GPU-hour budget ------------------------------------------------------------------

BUDGETED = {**LOOSE, "nodePools": ["cpu"], "kueue": {"clusterQueues": ["q"]}, "budget": {"gpuHours": 10, "period": "Month"}}


def budget(exhausted: bool) -> tenancy.Tenancy:
    body = {"metadata": {"name": "team-a", "generation": 1}, "spec": BUDGETED,
            "status": {"usage": {"gpuHours": 10.0 if exhausted else 1.0, "budgetExhausted": exhausted}}}
    return tenancy.Tenancy(policies=[tenancy.Policy.from_body(body)], namespace_labels=LABELS)


def budget_pass(kube: FakeKube, exhausted: bool) -> dict[str, Any]:
    return passes(kube, CFG, budget(exhausted))[0].status


def test_a_searchs_next_trials_wait_for_the_budget_and_its_running_trial_goes_on():
    """A search started within its tenant's budget: once the budget is used up, no new trial is made and a
    trial Kueue has not admitted yet has its Workload deactivated (Kueue would admit it whatever the budget),
    while the trial that trains goes on. A larger budget (or a new period) lets the search go on."""
    kube = FakeKube(job(SPEC), SECRET)
    budget_pass(kube, exhausted=False)
    assert sorted(trial_jobs(kube)) == ["train-1-t0", "train-1-t1"]
    kueue_sets(kube, 0, "admitted")
    waiting = kueue_sets(kube, 1, "waiting")

    training = budget_pass(kube, exhausted=True)
    assert (training["phase"], running(training)["reason"]) == ("Running", "Searching"), running(training)
    assert "the next trials wait: TenantPolicy team-a has used 10.0 of its 10 GPU-hours" in running(training)["message"]
    assert kube.patches == [("Workload", waiting, {"spec": {"active": False}})]  # t0 trains on, untouched

    # t0 ends (no S3 here: without a validation value, so Failed) and frees a slot
    trial_jobs(kube)["train-1-t0"]["status"] = {"conditions": [{"type": "Succeeded", "status": "True"}]}
    held = budget_pass(kube, exhausted=True)
    assert sorted(trial_jobs(kube)) == ["train-1-t0", "train-1-t1"]  # no t2
    assert phases(held) == ["Failed", "Pending"]
    assert (held["phase"], running(held)["reason"]) == ("Queued", "BudgetExhausted"), running(held)
    assert "queued trials that have not trained yet are deactivated; trials 1/3 finished" in running(held)["message"]

    released = budget_pass(kube, exhausted=False)
    assert kube.patches[-1] == ("Workload", waiting, {"spec": {"active": True}})
    assert sorted(trial_jobs(kube)) == ["train-1-t0", "train-1-t1", "train-1-t2"]
    assert running(released)["reason"] == "Queued", running(released)


def test_a_trial_that_trained_before_kueue_preempted_it_is_not_held_by_the_budget():
    kube = FakeKube(job(SPEC), SECRET)
    budget_pass(kube, exhausted=False)
    kueue_sets(kube, 0, "admitted")
    kueue_sets(kube, 1, "admitted")
    budget_pass(kube, exhausted=False)
    stored_job(kube)["status"]["search"]["trials"][0].update(step=5)  # it trained, then Kueue preempted it
    kueue_sets(kube, 0, "preempted")
    preempted = kueue_sets(kube, 1, "waiting")
    budget_pass(kube, exhausted=True)
    assert kube.patches == [("Workload", preempted, {"spec": {"active": False}})]  # t1 never ran: held; t0 not


def test_a_search_without_a_queue_waits_for_the_budget_between_trials():
    spec = {**SPEC, "runPolicy": {}}
    kube = FakeKube(job(spec), SECRET)
    budget_pass(kube, exhausted=False)
    for name in ("train-1-t0", "train-1-t1"):
        trial_jobs(kube)[name]["status"] = {"conditions": [{"type": "Succeeded", "status": "True"}]}
    held = budget_pass(kube, exhausted=True)
    assert sorted(trial_jobs(kube)) == ["train-1-t0", "train-1-t1"]  # no t2
    assert (held["phase"], running(held)["reason"]) == ("Queued", "BudgetExhausted"), running(held)
    assert running(held)["message"].startswith("the next trials wait: TenantPolicy team-a has used 10.0")
    assert "Workloads" not in running(held)["message"] and kube.patches == []
    budget_pass(kube, exhausted=False)
    assert "train-1-t2" in trial_jobs(kube)


def test_the_jobs_preemptions_count_every_trials_and_never_go_down():
    """Each trial has its own Workload, counted by Kueue: the job's preemptions are their sum (the queue the
    status shows is one trial's)."""
    kube = new_search()
    one_pass(kube)
    workloads = {}
    for number, count in ((0, 2), (1, 1)):
        name = kueue_sets(kube, number, "preempted")
        sandbox = trial_jobs(kube)[f"train-1-t{number}"]["metadata"]["namespace"]
        workloads[number] = kube.store[(k8s.Workload, sandbox, name)]
        workloads[number]["status"]["schedulingStats"] = {"evictions": [{"reason": "Preempted", "count": count}]}
    status = one_pass(kube)
    assert [t["preemptions"] for t in status["search"]["trials"]] == [2, 1]
    assert status["preemptions"] == 3
    for workload in workloads.values():  # a Workload made again (its trial's PyTorchJob was) counts from 0
        workload["status"].pop("schedulingStats")
    again = one_pass(kube)
    assert [t["preemptions"] for t in again["search"]["trials"]] == [2, 1] and again["preemptions"] == 3


def test_a_trial_pruned_just_before_an_operator_restart_is_judged_again_not_made_again(monkeypatch):
    """A pass pruned trial 1 and deleted its PyTorchJob, and the operator stopped before the status was written:
    the status still has the trial Running, without a PyTorchJob. The next pass reads what the trial reported
    and prunes it again; it is not made again (it would resume and train until read once more)."""
    from finetune_operator.builders import names
    from test_search_driver import docs

    spec = minimal_spec(resources={"gpusPerWorker": 0, "nodePool": "cpu"}, evaluation={"everySteps": 5},
                        search={**SEARCH, "pruning": {"rule": "median", "startupTrials": 1, "warmupSteps": 0}})
    kube = FakeKube(job(spec), SECRET)
    one_pass(kube)
    sandbox = trial_jobs(kube)["train-1-t1"]["metadata"]["namespace"]
    trials = stored_job(kube)["status"]["search"]["trials"]
    trials[0].update(phase="Succeeded", value=1.0, history=[{"step": 5, "value": 1.5}, {"step": 10, "value": 1.0}])
    trials[1].update(phase="Running")
    del kube.store[(k8s.PyTorchJob, sandbox, "train-1-t1")]
    reported = {names.trial_output_uri(OUTPUT, 1): docs([2.5])}
    monkeypatch.setattr(s3, "read_documents",
                        lambda endpoint, region, creds, output_uri, run_id, **_: reported.get(output_uri, RunDocuments()))
    status = one_pass(kube)
    assert phases(status)[:2] == ["Succeeded", "Pruned"] and "step 5" in status["search"]["trials"][1]["message"]
    assert sorted(trial_jobs(kube)) == ["train-1-t0", "train-1-t2"]  # the next trial took its slot
