"""kstatus (sigs.k8s.io/cli-utils, as Flux, kpt and Helm 4's --wait read objects) on FineTuneJobs whose
status the operator's own status code wrote, in every state a job can be in.

kstatus runs as the real library, through the harness in e2e/runtimes/kstatus/ (`make cluster-build`)."""

from __future__ import annotations

import copy
import json

import pytest

from e2e.localcluster import kstatus
from finetune_operator.api import crd
from finetune_operator.status import condition, derive_status
from finetune_operator.validation import Problem
from finetune_trainer.config import RunResult
from op_testdata import job, minimal_spec, seen_earlier
from test_op_status import PROGRESS, obs, pod, ptj, unschedulable_pod

CURRENT, IN_PROGRESS, FAILED = "Current", "InProgress", "Failed"


def ftj(observation, *, generation: int = 1, seen_before: bool = False, **spec) -> dict:
    """A FineTuneJob as the API server returns it after the operator wrote its status (and, if
    seen_before, one an hour earlier from the same observation)."""
    obj = job(minimal_spec(**spec), generation=generation)
    if seen_before:
        obj = seen_earlier(obj, observation, retryable_exit_codes=[137])
    obj["status"] = derive_status(obj, observation, [137])
    return json.loads(json.dumps(obj))


def with_generation(obj: dict, generation: int) -> dict:
    """The object after a spec edit the operator has not reconciled yet."""
    edited = copy.deepcopy(obj)
    edited["metadata"]["generation"] = generation
    return edited


RUNNING = ptj("Created", "Running")
STALE = PROGRESS.model_copy(update={"updatedAt": "2026-01-01T11:00:00Z"})

# name, the FineTuneJob, kstatus's status, the condition of the job whose reason and message kstatus shows
# (None: kstatus's own words).
CASES = [
    ("validating", ftj(obs(problems=[Problem("S3Unreachable", "spec.model.uri: cannot check s3://models/: timeout")],
                           applied=False)), IN_PROGRESS, "Reconciling"),
    ("sandbox being created", ftj(obs()), IN_PROGRESS, "Reconciling"),
    ("starting", ftj(obs(pytorchjob=ptj("Created"))), IN_PROGRESS, "Reconciling"),
    ("queued by Kueue", ftj(obs(pytorchjob=ptj("Created", "Suspended", suspend=True))), IN_PROGRESS, "Reconciling"),
    ("held by the tenant's budget", ftj(obs(hold=Problem("BudgetExhausted", "team-a used 100 of 100 GPU-hours"),
                                            sandbox_state="absent", applied=False)), IN_PROGRESS, "Reconciling"),
    ("unschedulable", ftj(obs(pytorchjob=RUNNING, pods=[pod(), unschedulable_pod()])), IN_PROGRESS, "Reconciling"),
    ("running", ftj(obs(pytorchjob=RUNNING, pods=[pod()], progress=PROGRESS)), IN_PROGRESS, "Reconciling"),
    ("restarting", ftj(obs(pytorchjob=ptj("Created", "Restarting"), pods=[pod(phase="Failed", exit_code=137)])),
     IN_PROGRESS, "Reconciling"),
    ("progress stalled", ftj(obs(pytorchjob=RUNNING, pods=[pod()], progress=STALE, stall_after_seconds=900),
                              seen_before=True),
     FAILED, "Stalled"),
    ("succeeded", ftj(obs(pytorchjob=ptj("Created", "Succeeded", completion="2026-01-01T11:58:00Z"),
                          pods=[pod(phase="Succeeded", exit_code=0)],
                          result=RunResult(succeeded=True, adapterUri="s3://team-a/models/support-bot/adapter/"))),
     CURRENT, None),
    ("failed", ftj(obs(pytorchjob=ptj("Created", "Failed"), pods=[pod(phase="Failed", exit_code=3)],
                       result=RunResult(succeeded=False, reason="EvaluationGateFailed", message="ratio 1.3 > 1.0"))),
     FAILED, "Stalled"),
    ("invalid spec", ftj(obs(problems=[Problem("UnknownNodePool", "spec.resources.nodePool: unknown pool 'h100'")],
                             applied=False, sandbox_state="absent")), FAILED, "Stalled"),
    ("policy violation", ftj(obs(problems=[Problem("ImageNotAllowed", "spec.image: 'evil.io/x' is not from an allowed "
                                                   "registry prefix (registry.local/)")],
                                 applied=False, sandbox_state="absent")), FAILED, "Stalled"),
    # A missing Secret needs the tenant to act (create it): stalled until then, and the job starts by itself
    # once it exists (e2e: test_a_job_waiting_for_its_secret_starts_once_the_secret_exists).
    ("missing Secret", ftj(obs(problems=[Problem("SecretNotFound", "spec.credentials.secretName: Secret "
                                                 "'s3-credentials' not found in the job's namespace")],
                               applied=False, sandbox_state="absent")), FAILED, "Stalled"),
    # Suspended has not reached its outcome: kstatus reads Ready=False as in progress (helm --wait keeps
    # waiting, as for a queued job); Argo CD shows it Suspended.
    ("suspended", ftj(obs(pytorchjob=ptj("Created", "Suspended", suspend=True)), runPolicy={"suspend": True}),
     IN_PROGRESS, None),
]


def values(case) -> tuple:
    return case.values if hasattr(case, "marks") else case


BY_NAME = {values(c)[0]: values(c)[1] for c in CASES}


@pytest.mark.parametrize("name,obj,expected,explaining", CASES, ids=[values(c)[0] for c in CASES])
def test_kstatus_of_each_state(name, obj, expected, explaining):
    result = kstatus.compute_one(obj)
    assert result.status == expected, result
    if explaining is None:
        return
    # kstatus shows the operator's own words: the reason and message of the condition it acted on.
    words = condition(obj["status"], explaining)
    assert words["status"] == "True"
    assert result.message == words["message"] == condition(obj["status"], "Ready")["message"]
    assert [(c.type, c.status, c.reason, c.message) for c in result.conditions] == [
        (explaining, "True", words["reason"], words["message"])]


def test_a_job_the_operator_has_not_seen_yet_is_in_progress():
    """As the API server serves it before the operator's first write: the CRD defaults
    `status: {observedGeneration: 0}` (without it kstatus would call the bare object Current)."""
    unseen = job()
    unseen["status"] = crd.openapi_schema()["properties"]["status"]["default"]
    result = kstatus.compute_one(unseen)
    assert result.status == IN_PROGRESS, result
    assert kstatus.compute_one(job()).status == CURRENT  # what the default prevents


def test_a_job_whose_edit_the_operator_has_not_seen_is_in_progress():
    result = kstatus.compute_one(with_generation(BY_NAME["running"], 2))
    assert (result.status, result.message) == (
        IN_PROGRESS, "FineTuneJob generation is 2, but latest observed generation is 1")
    assert [c.reason for c in result.conditions] == ["LatestGenerationNotObserved"]


def test_the_messages_are_the_operators():
    """The states users wait on read, in kstatus, as the operator wrote them."""
    messages = {name: kstatus.compute_one(BY_NAME[name]).message
                for name in ("unschedulable", "progress stalled", "failed")}
    assert messages == {
        "unschedulable": "pod train-1-worker-0: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        "progress stalled": "no progress reported for 3600s (last: step 50 at 2026-01-01T11:00:00Z); threshold 900s",
        "failed": "ratio 1.3 > 1.0 (trainer exit code 3, not retryable)",
    }


def test_many_objects_in_one_list_keep_their_order():
    names = [f"job-{i}" for i in range(len(BY_NAME))]
    listed = {"apiVersion": "v1", "kind": "List",
              "items": [dict(o, metadata=dict(o["metadata"], name=n)) for o, n in zip(BY_NAME.values(), names)]}
    assert [r.name for r in kstatus.compute([listed])] == names
