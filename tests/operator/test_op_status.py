"""Status derivation: tables of (observation -> phase and conditions), plus transition-time rules."""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from finetune_operator import status as status_module
from finetune_operator import tenancy
from finetune_operator.status import (
    MAX_KUBELET_MESSAGE,
    POD_WAITING_REASONS,
    RUNNING_FALSE_REASONS,
    RUNNING_TRUE_REASONS,
    SANDBOX_ACTIVE,
    SANDBOX_EXPIRED,
    Observation,
    changed,
    condition,
    derive_status,
    phase,
    pod_gpu_seconds,
    rfc3339,
    safe_reason,
    set_condition,
)
from finetune_operator.api.types import MAX_COUNT, ConditionType, Phase
from finetune_operator.kueue import QueueState
from finetune_operator.validation import Problem
from finetune_trainer.config import CheckpointRecord, EvaluationResult, Progress, RunResult
from op_testdata import ROOT, job, minimal_spec, seen_earlier

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
SANDBOX = "ftj-team-a-support-bot"


def ptj(*true_conditions: str, suspend: bool = False, completion: str | None = None) -> dict:
    status = {"conditions": [{"type": t, "status": "True", "reason": f"PyTorchJob{t}", "message": f"job is {t.lower()}"}
                             for t in true_conditions]}
    if completion:
        status["completionTime"] = completion
    return {"metadata": {"name": "train-1"}, "spec": {"runPolicy": {"suspend": suspend}}, "status": status}


def unschedulable_pod(name="train-1-worker-0") -> dict:
    return {"metadata": {"name": name}, "spec": {"containers": [{"name": "pytorch"}]},
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}


def waiting_pod(reason: str, message: str = "", name="train-1-worker-0", start="2026-01-01T11:55:00Z",
                init: bool = False) -> dict:
    """A placed pod whose container (or init container) the kubelet keeps waiting."""
    waiting = {"name": "init-pytorch" if init else "pytorch", "restartCount": 0,
               "state": {"waiting": {"reason": reason, **({"message": message} if message else {})}}}
    running = {"name": "pytorch", "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}}
    statuses = {"initContainerStatuses": [waiting], "containerStatuses": [running]} if init else \
        {"containerStatuses": [waiting]}
    return {"metadata": {"name": name}, "spec": {"containers": [{"name": "pytorch"}]},
            "status": {"phase": "Pending", "startTime": start, **statuses}}


PULL_ERROR = 'Back-off pulling image "registry.example/team-a/trainer:v2"'


def pod(phase="Running", gpus=8, start="2026-01-01T11:00:00Z", restarts=0, exit_code=None):
    cs = {"name": "pytorch", "restartCount": restarts, "state": {"running": {}}}
    if exit_code is not None:
        cs["state"] = {"terminated": {"exitCode": exit_code, "finishedAt": "2026-01-01T11:30:00Z"}}
    return {"spec": {"containers": [{"name": "pytorch", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
            "status": {"phase": phase, "startTime": start, "containerStatuses": [cs]}}


def obs(**kw) -> Observation:
    base = dict(now=NOW, sandbox=SANDBOX, sandbox_state=SANDBOX_ACTIVE, applied=True)
    base.update(kw)
    return Observation(**base)


PROGRESS = Progress(step=50, totalSteps=200, epoch=0.25, loss=1.2340000001, tokensPerSecond=1500.04, etaSeconds=600.4,
                    updatedAt="2026-01-01T11:59:58Z", resumedFromStep=40,
                    checkpoints=[CheckpointRecord(step=40, uri="s3://team-a/ckpt/1/step-00000040/", time="t")])

CASES = [
    # name, observation, spec overrides, expected phase, {condition: status}
    ("invalid spec", obs(problems=[Problem("UnknownNodePool", "spec.resources.nodePool: unknown")], applied=False,
                         sandbox_state="absent"), {},
     "Pending", {"Validated": "False", "SandboxReady": "False", "Running": "False"}),
    ("S3 unreachable is not a verdict", obs(problems=[Problem("S3Unreachable", "spec.model.uri: timeout")], applied=False),
     {}, "Validating", {"Validated": "Unknown"}),
    ("sandbox ready, run not yet created", obs(), {}, "Pending", {"Validated": "True", "SandboxReady": "True"}),
    ("created, pods not running", obs(pytorchjob=ptj("Created")), {}, "Queued", {"Running": "False"}),
    ("queued by kueue", obs(pytorchjob=ptj("Created", "Suspended", suspend=True)), {}, "Queued", {"Running": "False", "Suspended": "False"}),
    ("running", obs(pytorchjob=ptj("Created", "Running"), pods=[pod()], progress=PROGRESS), {}, "Running",
     {"Running": "True", "Succeeded": "False", "Failed": "False"}),
    ("restarting", obs(pytorchjob=ptj("Created", "Restarting"), pods=[pod(phase="Failed", exit_code=137)]), {}, "Queued",
     {"Running": "False"}),
    ("suspended by the user", obs(pytorchjob=ptj("Created", "Suspended", suspend=True)), {"runPolicy": {"suspend": True}},
     "Suspended", {"Suspended": "True", "Running": "False"}),
    ("succeeded", obs(pytorchjob=ptj("Created", "Succeeded", completion="2026-01-01T11:58:00Z"), pods=[pod(phase="Succeeded", exit_code=0)],
                      result=RunResult(succeeded=True, adapterUri="s3://team-a/models/support-bot/adapter/"),
                      evaluation=EvaluationResult(basePerplexity=20.0, perplexity=12.5)), {},
     "Succeeded", {"Succeeded": "True", "Failed": "False", "Running": "False"}),
    ("failed by the evaluation gate", obs(pytorchjob=ptj("Created", "Failed"), pods=[pod(phase="Failed", exit_code=3)],
                                          result=RunResult(succeeded=False, reason="EvaluationGateFailed", message="ratio 1.3 > 1.0")),
     {}, "Failed", {"Failed": "True", "Succeeded": "False"}),
    ("spec changed during the run", obs(pytorchjob=ptj("Created", "Running"), spec_drift=True), {}, "Running",
     {"UpToDate": "False", "Running": "True"}),
    ("replacing an old run", obs(replacing_run="1"), {"runId": "2"}, "Pending", {"Running": "False"}),
    ("a worker the scheduler cannot place", obs(pytorchjob=ptj("Created", "Running"), pods=[pod(), unschedulable_pod()]),
     {}, "Pending", {"Running": "False"}),
    ("a worker that cannot pull its image", obs(pytorchjob=ptj("Created", "Running"), pods=[
        pod(), waiting_pod("ImagePullBackOff", PULL_ERROR)], progress=PROGRESS), {}, "Pending", {"Running": "False"}),
    ("the master's container config is broken", obs(pytorchjob=ptj("Created"), pods=[
        waiting_pod("CreateContainerConfigError", 'secret "creds" not found', name="train-1-master-0")]), {},
     "Pending", {"Running": "False"}),
    ("a worker creating its container for too long", obs(pytorchjob=ptj("Created", "Running"), pods=[
        pod(), waiting_pod("ContainerCreating", start="2026-01-01T11:40:00Z")]), {}, "Pending", {"Running": "False"}),
    ("progress stalled", obs(pytorchjob=ptj("Created", "Running"), pods=[pod()], stall_after_seconds=60,
                             progress=PROGRESS.model_copy(update={"updatedAt": "2026-01-01T11:00:00Z"})), {},
     "Stalled", {"Running": "True"}),
]

# The conditions kstatus reads, per case of CASES: (Ready, Reconciling, Stalled, the reason they give).
KSTATUS = {
    "invalid spec": ("False", "False", "True", "UnknownNodePool"),
    "S3 unreachable is not a verdict": ("False", "True", "False", "S3Unreachable"),
    "sandbox ready, run not yet created": ("False", "True", "False", "NotStarted"),
    "created, pods not running": ("False", "True", "False", "Starting"),
    "queued by kueue": ("False", "True", "False", "Queued"),
    "running": ("False", "True", "False", "Training"),
    "restarting": ("False", "True", "False", "Restarting"),
    "suspended by the user": ("False", "False", "False", "SuspendedByUser"),
    "succeeded": ("True", "False", "False", "Succeeded"),
    "failed by the evaluation gate": ("False", "False", "True", "EvaluationGateFailed"),
    "spec changed during the run": ("False", "True", "False", "Training"),
    "replacing an old run": ("False", "True", "False", "ReplacingRun"),
    "a worker the scheduler cannot place": ("False", "True", "False", "Unschedulable"),
    "a worker that cannot pull its image": ("False", "True", "False", "ImagePullBackOff"),
    "the master's container config is broken": ("False", "True", "False", "CreateContainerConfigError"),
    "a worker creating its container for too long": ("False", "True", "False", "ContainerCreating"),
    "progress stalled": ("False", "False", "True", "ProgressStalled"),
}

# Cases the operator has seen before (an hour earlier, the same observation): a run stalls only after
# it has been running for longer than the threshold.
SEEN_EARLIER = {"progress stalled"}


def derived(name: str, observation: Observation, overrides: dict) -> dict:
    body = job(minimal_spec(**overrides))
    if name in SEEN_EARLIER:
        body = seen_earlier(body, observation, retryable_exit_codes=[137])
    return derive_status(body, observation, [137])


@pytest.mark.parametrize("name,observation,overrides,phase,conditions", CASES, ids=[c[0] for c in CASES])
def test_derive_status(name, observation, overrides, phase, conditions):
    status = derived(name, observation, overrides)
    assert status["phase"] == phase
    got = {c["type"]: c["status"] for c in status["conditions"]}
    assert {k: got.get(k) for k in conditions} == conditions
    for c in status["conditions"]:
        assert c["observedGeneration"] == 1 and c["lastTransitionTime"] and c["reason"]


def test_every_case_has_its_kstatus_conditions():
    assert set(KSTATUS) == {c[0] for c in CASES}


@pytest.mark.parametrize("name,observation,overrides", [c[:3] for c in CASES], ids=[c[0] for c in CASES])
def test_kstatus_conditions(name, observation, overrides):
    status = derived(name, observation, overrides)
    ready, reconciling, stalled, reason = KSTATUS[name]
    got = {c["type"]: c for c in status["conditions"]}
    assert (got["Ready"]["status"], got["Reconciling"]["status"], got["Stalled"]["status"]) == (ready, reconciling, stalled)
    assert got["Ready"]["reason"] == reason
    # The condition that explains the state carries the same words as Ready.
    explaining = got["Stalled"] if stalled == "True" else got["Reconciling"] if reconciling == "True" else None
    if explaining is not None:
        assert (explaining["reason"], explaining["message"]) == (reason, got["Ready"]["message"])
    assert [c["type"] for c in status["conditions"]][-3:] == ["Ready", "Reconciling", "Stalled"]


def test_an_unschedulable_pod_is_named_with_the_schedulers_message():
    status = derive_status(job(), CASES[[c[0] for c in CASES].index("a worker the scheduler cannot place")][1])
    assert condition(status, "Running")["message"] == (
        "pod train-1-worker-0: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    assert condition(status, "Ready")["message"] == condition(status, "Running")["message"]


WORKER = "pod train-1-worker-0 container pytorch"


@pytest.mark.parametrize("pods,shown", [
    # A worker that cannot start keeps a run from training, whatever its PyTorchJob says.
    ([pod(), waiting_pod("ImagePullBackOff", PULL_ERROR)], ("ImagePullBackOff", f"{WORKER}: ImagePullBackOff: {PULL_ERROR}")),
    ([pod(), waiting_pod("ErrImagePull", "rpc error: code = NotFound")],
     ("ErrImagePull", f"{WORKER}: ErrImagePull: rpc error: code = NotFound")),
    ([pod(), waiting_pod("CrashLoopBackOff", "back-off 5m0s restarting failed container")],
     ("CrashLoopBackOff", f"{WORKER}: CrashLoopBackOff: back-off 5m0s restarting failed container")),
    ([pod(), waiting_pod("CreateContainerConfigError", "couldn't find key X in Secret", init=True)],
     ("CreateContainerConfigError", "pod train-1-worker-0 container init-pytorch: CreateContainerConfigError: "
                                    "couldn't find key X in Secret")),
    # Creating a container is how every pod starts: reported only after SLOW_START_SECONDS (600 s).
    ([pod(), waiting_pod("ContainerCreating", start="2026-01-01T11:55:00Z")], None),
    ([pod(), waiting_pod("ContainerCreating", start="2026-01-01T11:49:00Z")],
     ("ContainerCreating", f"{WORKER}: ContainerCreating since 2026-01-01T11:49:00Z")),
    ([pod(), waiting_pod("PodInitializing", start="2026-01-01T11:55:00Z")], None),  # its init containers run
    ([pod(), waiting_pod("PodInitializing", start="2026-01-01T11:49:00Z")],
     ("PodInitializing", f"{WORKER}: PodInitializing since 2026-01-01T11:49:00Z")),
    # The kubelet's message on one line, cut; a reason not in the list is not reported.
    ([waiting_pod("ErrImagePull", "line one\nline two\x1b[31m" + "x" * 2000)],
     ("ErrImagePull", f"{WORKER}: ErrImagePull: line one line two [31m" + "x" * (MAX_KUBELET_MESSAGE - 22))),
    ([waiting_pod("SomethingNew", "unknown")], None),
    ([pod(phase="Failed", exit_code=137), waiting_pod("ImagePullBackOff", PULL_ERROR) | {"status": {"phase": "Failed"}}],
     None),
])
def test_a_container_that_cannot_start_is_named_with_the_kubelets_reason(pods, shown):
    running = obs(pytorchjob=ptj("Created", "Running"), pods=pods, progress=PROGRESS)
    status = derive_status(job(), running)
    got = condition(status, "Running")
    if shown is None:
        assert (status["phase"], got["status"], got["reason"]) == ("Running", "True", "Training")
        return
    assert (status["phase"], got["status"], (got["reason"], got["message"])) == ("Pending", "False", shown)
    assert (condition(status, "Ready")["reason"], condition(status, "Reconciling")["status"]) == (shown[0], "True")


def test_every_pod_waiting_reason_is_a_condition_reason_and_pending():
    for reason in POD_WAITING_REASONS:
        assert safe_reason(reason, "") == reason
        assert phase([{"type": "Validated", "status": "True"}, {"type": "Running", "status": "False", "reason": reason}],
                     run_exists=True).value == "Pending"


def test_a_run_that_never_reported_progress_stalls_from_its_start():
    started = ptj("Created", "Running")
    started["status"]["startTime"] = "2026-01-01T11:00:00Z"
    observation = obs(pytorchjob=started, pods=[pod()], stall_after_seconds=900)
    assert derive_status(job(), observation)["phase"] == "Running"  # not stalled the moment it starts running
    status = derive_status(seen_earlier(job(), observation), observation)
    assert status["phase"] == "Stalled"
    assert condition(status, "Stalled")["message"] == (
        "no progress reported for 3600s (none since the run started running at 2026-01-01T11:00:00Z); threshold 900s")


def test_no_sandbox_is_named_before_one_exists():
    invalid = derive_status(job(), CASES[0][1])
    assert "sandboxNamespace" not in invalid
    assert derive_status(job(), obs())["sandboxNamespace"] == SANDBOX


def test_running_status_has_progress_and_checkpoints():
    status = derive_status(job(), obs(pytorchjob=ptj("Created", "Running"), pods=[pod()], progress=PROGRESS))
    assert status["progress"] == {"step": 50, "totalSteps": 200, "epoch": 0.25, "percent": 25.0, "loss": 1.234,
                                  "tokensPerSecond": 1500.0, "etaSeconds": 600, "updatedAt": "2026-01-01T11:59:58Z"}
    assert status["latestCheckpoint"] == "s3://team-a/ckpt/1/step-00000040/" and status["resumedFromStep"] == 40
    assert status["gpuSeconds"] == 3600 * 8 and status["startTime"]
    assert "step 50/200" in condition(status, "Running")["message"]


@pytest.mark.parametrize("updated,stall,reason", [
    ("2026-01-01T11:59:58Z", 900, "Training"),
    ("2026-01-01T11:00:00Z", 900, "ProgressStalled"),
    ("2026-01-01T11:00:00Z", 0, "Training"),  # disabled
    ("", 900, "ProgressStalled"),  # no timestamp: judged from when the run started running
])
def test_stalled_progress(updated, stall, reason):
    progress = PROGRESS.model_copy(update={"updatedAt": updated})
    observation = obs(pytorchjob=ptj("Created", "Running"), progress=progress, stall_after_seconds=stall)
    status = derive_status(seen_earlier(job(), observation), observation)
    running = condition(status, "Running")
    assert running["status"] == "True" and running["reason"] == reason
    if reason == "ProgressStalled":
        assert "3600s" in running["message"]


INTERRUPTIONS = {
    "suspended by the user": (obs(pytorchjob=ptj("Created", "Suspended", suspend=True)), {"runPolicy": {"suspend": True}},
                              "Suspended"),
    "preempted by Kueue": (obs(pytorchjob=ptj("Created", "Suspended", suspend=True), queue=QueueState(
        workload="pytorchjob-train-1", cluster_queue="team-a", admitted=False, reason="Preempted",
        message="preempted to accommodate a higher priority workload", preemptions=1, evicted_by_preemption=True)),
        {}, "Preempted"),
    "pods restarting": (obs(pytorchjob=ptj("Created", "Restarting"), pods=[pod(phase="Failed", exit_code=137)]), {},
                        "Restarting"),
}


@pytest.mark.parametrize("name", INTERRUPTIONS)
def test_a_run_that_runs_again_gets_a_fresh_stall_window(name):
    """Progress written before a suspension, preemption or restart does not make the resumed run stalled;
    it stalls a threshold after it runs again without reporting."""
    interruption, overrides, reason = INTERRUPTIONS[name]
    stale = PROGRESS.model_copy(update={"updatedAt": rfc3339(NOW - timedelta(hours=3))})
    running = obs(pytorchjob=ptj("Created", "Running"), pods=[pod()], progress=stale, stall_after_seconds=900)
    body = job(status=derive_status(job(), replace(running, now=NOW - timedelta(hours=3))))
    body = job(minimal_spec(**overrides), status=derive_status(
        job(minimal_spec(**overrides), status=body["status"]), replace(interruption, now=NOW - timedelta(hours=2))))
    assert condition(body["status"], "Running")["reason"] == reason

    resumed = derive_status(job(status=body["status"]), running)
    assert (resumed["phase"], condition(resumed, "Running")["reason"]) == ("Running", "Training")
    assert condition(resumed, "Running")["lastTransitionTime"] == rfc3339(NOW)

    later = derive_status(job(status=resumed), replace(running, now=NOW + timedelta(seconds=901)))
    assert later["phase"] == "Stalled"
    assert condition(later, "Running")["message"] == (
        f"no progress reported for 901s (none since the run started running at {rfc3339(NOW)}); threshold 900s")


def with_uid(p: dict, uid: str) -> dict:
    return dict(p, metadata={"name": "train-1-master-0", "uid": uid})


def test_gpu_time_of_pods_that_are_gone_is_kept():
    """8 GPUs for an hour, preempted (pods deleted), then 30 minutes on a new pod of the same name: 1.5 h,
    not the longest stretch alone."""
    running = obs(pytorchjob=ptj("Created", "Running"), pods=[with_uid(pod(start="2026-01-01T11:00:00Z"), "a")])
    first = derive_status(job(), running)
    assert first["gpuSeconds"] == 3600 * 8
    preempted = derive_status(job(status=first), obs(now=NOW + timedelta(minutes=10), pytorchjob=ptj(
        "Created", "Suspended", suspend=True)))
    assert preempted["gpuSeconds"] == 3600 * 8
    readmitted = replace(running, now=NOW + timedelta(hours=1),
                         pods=[with_uid(pod(start="2026-01-01T12:30:00Z"), "b")])
    again = derive_status(job(status=preempted), readmitted)
    assert (again["gpuSeconds"], again["gpuSecondsSettled"], again["gpuPodSeconds"]) == (
        3600 * 8 * 1.5, 3600 * 8, {"b": 1800 * 8})
    # A pod seen again is not counted twice, and a run of a new runId starts from zero.
    assert derive_status(job(status=again), readmitted)["gpuSeconds"] == 3600 * 8 * 1.5
    rerun = derive_status(job(minimal_spec(runId="2"), status=again, generation=2), obs())
    assert (rerun["gpuSeconds"], rerun["gpuSecondsSettled"], rerun["gpuPodSeconds"]) == (0, 0, {})


def test_failure_message_names_reason_and_exit_code():
    status = derive_status(job(), CASES[9][1], [137])
    failed = condition(status, "Failed")
    assert failed["reason"] == "EvaluationGateFailed"
    assert "ratio 1.3 > 1.0" in failed["message"] and "exit code 3, not retryable" in failed["message"]


def test_succeeded_keeps_outputs_and_completion_time():
    status = derive_status(job(), CASES[8][1])
    assert status["output"] == {"adapterUri": "s3://team-a/models/support-bot/adapter/"}
    assert status["evaluation"] == {"basePerplexity": 20.0, "perplexity": 12.5}
    assert status["completionTime"] == "2026-01-01T11:58:00Z"


def test_finished_status_survives_the_sandbox_going_away():
    done = derive_status(job(), CASES[8][1])
    later = derive_status(job(status=done), obs(sandbox_state=SANDBOX_EXPIRED, applied=False, now=NOW + timedelta(hours=1)))
    assert later["phase"] == "Succeeded" and later["output"] == done["output"]
    assert condition(later, "SandboxReady")["reason"] == "DeletedAfterTTL"


def test_finished_run_without_its_sandbox():
    done = derive_status(job(), CASES[8][1])
    later = derive_status(job(status=done), obs(sandbox_state="absent", applied=False))
    assert later["phase"] == "Succeeded" and condition(later, "SandboxReady")["reason"] == "Deleted"


def test_lastTransitionTime_changes_only_when_status_flips():
    first = derive_status(job(), obs(pytorchjob=ptj("Created", "Running"), progress=PROGRESS))
    later = NOW + timedelta(minutes=5)
    second = derive_status(job(status=first), obs(now=later, pytorchjob=ptj("Created", "Running"),
                                                  progress=PROGRESS.model_copy(update={"step": 60})))
    assert condition(second, "Running")["lastTransitionTime"] == condition(first, "Running")["lastTransitionTime"]
    assert condition(second, "Running")["message"] != condition(first, "Running")["message"]
    third = derive_status(job(status=second), obs(now=later, pytorchjob=ptj("Created", "Succeeded")))
    assert condition(third, "Running")["lastTransitionTime"] == "2026-01-01T12:05:00Z"


def test_a_new_run_id_resets_run_scoped_fields():
    done = derive_status(job(), CASES[8][1])
    rerun = derive_status(job(minimal_spec(runId="2"), status=done, generation=2), obs())
    assert rerun["runId"] == "2" and rerun["phase"] == "Pending"
    assert "output" not in rerun and "completionTime" not in rerun
    assert condition(rerun, "Succeeded")["status"] == "False"


@pytest.mark.parametrize("document", [
    '{"step": 5, "totalSteps": 10, "loss": NaN}',
    '{"step": 5, "etaSeconds": Infinity}',
    '{"step": 100000000000000000000}',
    '{"step": -1}',
    '{"checkpoints": [' + ",".join(['{"step": 1, "uri": "s3://b/k", "time": ""}'] * 1001) + ']}',
])
def test_documents_out_of_bounds_are_refused(document):
    with pytest.raises(ValueError):
        Progress.model_validate_json(document)


@pytest.mark.parametrize("eta, shown", [(1e300, MAX_COUNT), (-5.0, 0), (600.4, 600)])
def test_an_eta_from_the_trainer_stays_within_what_the_status_schema_accepts(eta, shown):
    """The trainer's progress.json is the tenant's to write: an integer of 301 digits would make the API
    server refuse the whole status write on every pass."""
    progress = Progress.model_validate_json(f'{{"step": 5, "totalSteps": 10, "etaSeconds": {eta!r}}}')
    status = derive_status(job(), obs(pytorchjob=ptj("Created", "Running"), pods=[pod()], progress=progress))
    assert status["progress"]["etaSeconds"] == shown


def test_long_strings_of_a_document_are_cut():
    result = RunResult.model_validate({"succeeded": False, "reason": "R" * 10_000, "message": "m" * 100_000,
                                       "adapterUri": "s3://b/" + "k" * 10_000})
    assert (len(result.reason), len(result.message), len(result.adapterUri)) == (256, 2048, 2048)


@pytest.mark.parametrize("reason, shown", [
    ("OutOfMemory", "OutOfMemory"), ("not a reason at all", "Failed"), ("R" * 2000, "Failed"), ("", "PyTorchJobFailed"),
    ("<script>", "Failed"),
])
def test_a_failure_reason_from_the_trainer_becomes_a_valid_condition_reason(reason, shown):
    status = derive_status(job(), obs(pytorchjob=ptj("Created", "Running", "Failed"),
                                      result=RunResult(succeeded=False, reason=reason, message="boom")))
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == shown


def test_progress_is_carried_over_when_not_read():
    first = derive_status(job(), obs(pytorchjob=ptj("Created", "Running"), progress=PROGRESS))
    second = derive_status(job(status=first), obs(pytorchjob=ptj("Created", "Running")))
    assert second["progress"] == first["progress"]
    assert not changed(first, second)


@pytest.mark.parametrize("before,value,flips", [("True", True, False), ("False", True, True), ("Unknown", None, False)])
def test_set_condition_transition(before, value, flips):
    conds = [{"type": "Running", "status": before, "lastTransitionTime": "2025-12-31T00:00:00Z"}]
    (new,) = set_condition(conds, "Running", value, "R", "m", 3, NOW)
    assert (new["lastTransitionTime"] == "2026-01-01T12:00:00Z") == flips
    assert new["observedGeneration"] == 3


def test_gpu_seconds_count_finished_pods_until_they_ended():
    pods = [pod(phase="Succeeded", gpus=2, exit_code=0), pod(gpus=0)]
    assert pod_gpu_seconds(pods, "nvidia.com/gpu", NOW) == 1800 * 2


def _exit_event(pod: str, code: int, count: int = 1) -> dict:
    return {"reason": "ExitedWithCode", "message": f"Pod: ftj-a-b.{pod} exited with code {code}", "count": count}


@pytest.mark.parametrize("events,expected", [
    ([], 0),
    ([_exit_event("train-1-worker-0", 137)], 1),
    ([_exit_event("train-1-worker-0", 137, count=3)], 3),                               # the same event repeated
    ([_exit_event("train-1-worker-0", 143), _exit_event("train-1-master-0", 170)], 2),   # preempted + unexpected
    ([_exit_event("train-1-worker-0", 3)], 0),                                          # permanent: no restart
    ([{"reason": "ExitedWithCode", "message": "garbled"}], 0),
])
def test_restarts_are_counted_from_the_training_operators_exit_events(events, expected):
    from finetune_operator.status import restarts_from_events

    assert restarts_from_events(events, [130, 137, 143]) == expected


def test_a_finished_outcome_is_restated_for_a_new_generation():
    """After the sandbox went away, a spec edit (same runId) must not leave Succeeded at an old generation."""
    done = job()
    done["status"] = derive_status(done, CASES[[c[0] for c in CASES].index("succeeded")][1])
    done["metadata"]["generation"] = 2
    status = derive_status(done, obs(sandbox_state="absent"))
    succeeded = condition(status, "Succeeded")
    assert (succeeded["status"], succeeded["observedGeneration"]) == ("True", 2)
    assert succeeded["lastTransitionTime"] == condition(done["status"], "Succeeded")["lastTransitionTime"]
    assert status["phase"] == "Succeeded" and condition(status, "Ready")["status"] == "True"


# ---- docs/api.md says what the status code does ---------------------------------------------------

def _constants(node: ast.expr) -> set[str]:
    """The values a reason expression can take: a constant, or either side of `a if c else b`."""
    if isinstance(node, ast.IfExp):
        return _constants(node.body) | _constants(node.orelse)
    if ast.unparse(node) in ("obs.hold.reason", "hold.reason"):  # why the tenant's run (or trial) may not start yet
        return {tenancy.BUDGET_EXHAUSTED, tenancy.RUNNING_JOB_LIMIT}
    assert isinstance(node, ast.Constant), f"a Running reason this test cannot read: {ast.unparse(node)}"
    return {node.value}


def running_reasons_in_the_code() -> set[tuple[bool, str]]:
    """(status, reason) of every Running condition status.py can set, read from its source."""
    tree = ast.parse(Path(status_module.__file__).read_text())
    functions = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    found: set[tuple[bool, str]] = set()
    for call in ast.walk(tree):
        if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "put" and ast.unparse(call.args[0]) == "C.Running"):
            continue
        value, *rest = call.args[1:]
        if isinstance(value, ast.Starred):  # put(C.Running, *_search_running(search, queue))
            found |= {(r.value.elts[0].value, reason) for r in ast.walk(functions[value.value.func.id])
                      if isinstance(r, ast.Return) for reason in _constants(r.value.elts[1])}
        elif isinstance(rest[0], ast.Starred):  # put(C.Running, False, *waiting): a pod's waiting container
            found |= {(value.value, reason) for reason in POD_WAITING_REASONS}
        else:
            found |= {(value.value, reason) for reason in _constants(rest[0])}
    return found


def documented(header: str) -> list[list[list[str]]]:
    """The rows of the table of docs/api.md with this header: each cell's `code` words."""
    lines = (ROOT / "docs" / "api.md").read_text().split(header + "\n", 1)[1].splitlines()[1:]
    rows = itertools.takewhile(lambda line: line.startswith("|"), lines)
    return [[re.findall(r"`([^`]+)`", cell) or [cell.strip()] for cell in row.strip("|").split(" | ")] for row in rows]


RUNNING_REASONS = {(True, r) for r in RUNNING_TRUE_REASONS} | {(False, r) for r in RUNNING_FALSE_REASONS}


def test_the_registry_of_running_reasons_is_what_the_code_sets():
    assert running_reasons_in_the_code() == RUNNING_REASONS


def first_column(rows: list[list[list[str]]]) -> set[str]:
    return {row[0][0] for row in rows}


@pytest.mark.parametrize("header,documents,expected", [
    ("| `Running` reason | status | when |", lambda rows: {(row[1][0] == "True", r) for row in rows for r in row[0]},
     RUNNING_REASONS),
    ("| condition | True when |", first_column, {c.value for c in ConditionType}),
    ("| phase | when |", first_column, {p.value for p in Phase}),
], ids=["running reasons", "conditions", "phases"])
def test_docs_api_lists_every_condition_phase_and_running_reason_of_the_code(header, documents, expected):
    assert documents(documented(header)) == expected
