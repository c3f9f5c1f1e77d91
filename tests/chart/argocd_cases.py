"""The test cases of the Argo CD health check, generated from the operator's own code.

Every object in argocd/resource_customizations/finetune.dev/FineTuneJob/testdata/ carries a status
that finetune_operator.status.derive_status wrote for an Observation (what one reconcile pass saw:
PyTorchJob conditions with the training-operator's messages, Kueue's Workload, pods, the trainer's
documents, validation problems from the validation code). Each case states the health Argo CD must
show and which words of the status it shows, so a change of the status code either keeps every case
or shows up as a diff of the committed files (tests/chart/test_argocd_health.py compares them).

    python -m tests.chart.argocd_cases      (make argocd-testdata)

writes testdata/<health>_<case>.yaml (upstream's naming), health_test.yaml (upstream's format) and
argocd/argocd-cm-patch.yaml (health.lua verbatim).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from finetune_operator.config import OperatorConfig
from finetune_operator.kueue import queue_state
from finetune_operator.status import SANDBOX_ACTIVE, SANDBOX_EXPIRED, Observation, condition, derive_status
from finetune_operator.builders.names import CREDENTIAL_KEYS
from finetune_operator.validation import Facts, S3Check, validate
from finetune_trainer import exit_codes
from finetune_trainer.config import CheckpointRecord, Progress, RunResult
from finetune_trainer.errors import EvaluationGateFailed
from finetune_trainer.scoring.gates import PerplexityGate, evaluate_gates
from tests.chart.chartkit import ARGOCD
from tests.operator.op_testdata import job, minimal_spec, seen_earlier

CHECK_DIR = ARGOCD / "resource_customizations" / "finetune.dev" / "FineTuneJob"
HEALTH_LUA = CHECK_DIR / "health.lua"
HEALTH_TEST = CHECK_DIR / "health_test.yaml"
TESTDATA = CHECK_DIR / "testdata"
ARGOCD_CM_PATCH = ARGOCD / "argocd-cm-patch.yaml"
HEALTH_KEY = "resource.customizations.health.finetune.dev_FineTuneJob"

NOW = datetime(2026, 11, 21, 10, 0, 0, tzinfo=timezone.utc)
STARTED = "2026-11-21T08:00:00Z"
CFG = OperatorConfig.model_validate({"trainerImage": "registry.example.com/ml/trainer:1",
                                     "nodePools": {"h100": {"gpusPerNode": 8}}, "defaultNodePool": "h100"})
SANDBOX = "ftj-team-a-support-bot-0b7c6f2e"
PTJ = "support-bot-1"
CLUSTER_QUEUE = "team-a-gpus"


# ---- what a reconcile pass sees, as the components write it ----------------------------------------


def pytorchjob(*true_conditions: tuple[str, str], suspend: bool = False) -> dict[str, Any]:
    """The run's PyTorchJob; conditions (type, message) as training-operator v1.9 writes them
    (reason: PyTorchJob + type)."""
    conditions = [{"type": type_, "status": "True", "reason": f"PyTorchJob{type_}", "message": message}
                  for type_, message in (("Created", f"PyTorchJob {PTJ} is created."), *true_conditions)]
    return {"metadata": {"name": PTJ, "namespace": SANDBOX, "uid": "5d1e0c4a-7777-4888-9999-aaaabbbbcccc"},
            "spec": {"runPolicy": {"suspend": suspend}},
            "status": {"startTime": STARTED, "conditions": conditions}}


RUNNING = ("Running", f"PyTorchJob {SANDBOX}/{PTJ} is running.")
RESTARTING = ("Restarting", f"PyTorchJob {PTJ} is restarting because 1 Worker replica(s) failed.")
FAILED = ("Failed", f"PyTorchJob {PTJ} is failed because 1 Master replica(s) failed.")
SUCCEEDED = ("Succeeded", f"PyTorchJob {SANDBOX}/{PTJ} successfully completed.")
SUSPENDED = ("Suspended", f"PyTorchJob {PTJ} is suspended.")


def pod(name: str, phase: str = "Running", exit_code: int | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {"startedAt": STARTED}}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "finishedAt": "2026-11-21T09:58:00Z"}}
    return {"metadata": {"name": name, "namespace": SANDBOX},
            "spec": {"containers": [{"name": "pytorch", "resources": {"limits": {"nvidia.com/gpu": "8"}}}]},
            "status": {"phase": phase, "startTime": STARTED,
                       "containerStatuses": [{"name": "pytorch", "restartCount": 0, "state": state}]}}


def unschedulable(name: str) -> dict[str, Any]:
    """A pod kube-scheduler cannot place (its PodScheduled condition, its message format)."""
    return {"metadata": {"name": name, "namespace": SANDBOX}, "spec": {"containers": [{"name": "pytorch"}]},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/4 nodes are available: 1 node(s) had untolerated taint "
                           "{node-role.kubernetes.io/control-plane: }, "
                           "3 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available: 1 Preemption is not "
                           "helpful for scheduling, 3 No preemption victims found for incoming pod."}]}}


MASTER, WORKER = f"{PTJ}-master-0", f"{PTJ}-worker-0"


def progress(step: int, total: int = 600, updated: str = "2026-11-21T09:59:50Z") -> Progress:
    """progress.json as the trainer writes it."""
    checkpoint = CheckpointRecord(step=100, uri="s3://team-a/models/support-bot/1/checkpoints/step-00000100/",
                                  time="2026-11-21T09:30:00Z")
    return Progress(stage="sft", step=step, totalSteps=total, epoch=round(step / total * 2, 3), loss=1.83,
                    learningRate=0.0002, tokensPerSecond=5120.0, etaSeconds=(total - step) * 1.5, updatedAt=updated,
                    checkpoints=[checkpoint])


def kueue_pending_workload() -> dict[str, Any]:
    """Kueue's Workload of a run waiting for quota (the flavor assigner's message)."""
    return {"metadata": {"name": f"pytorchjob-{PTJ}-3f2a1", "namespace": SANDBOX},
            "status": {"conditions": [{
                "type": "QuotaReserved", "status": "False", "reason": "Pending",
                "message": "couldn't assign flavors to pod set master: insufficient unused quota for nvidia.com/gpu "
                           "in flavor h100, 8 more needed"}]}}


def evaluation_gate_result() -> RunResult:
    """result.json after the evaluation gate refused the tuned model (the trainer's message format)."""
    [outcome] = evaluate_gates({"base": 12.41, "tuned": 16.26}, None, [], [PerplexityGate(1.2)])
    return RunResult(succeeded=False, reason=EvaluationGateFailed().reason, message=outcome.message)


def observation(**kw: Any) -> Observation:
    return Observation(**{"now": NOW, "sandbox": SANDBOX, "sandbox_state": SANDBOX_ACTIVE, "applied": True,
                          "stall_after_seconds": CFG.progressStallSeconds, **kw})


def written(observed: Observation, spec: dict[str, Any] | None = None, generation: int = 1,
            previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The FineTuneJob with the status the operator writes after this pass."""
    body = job(spec or minimal_spec(), generation=generation, status=previous, defaults=False)
    body["status"] = derive_status(body, observed, CFG.retryableExitCodes)
    return body


def validation_problems(raw_spec: dict[str, Any], facts: Facts) -> Observation:
    _, problems = validate(raw_spec, CFG, facts)
    return observation(problems=problems, applied=False, sandbox_state="absent")


# ---- the cases ----------------------------------------------------------------------------------


def cond_message(type_: str, suffix: str = "") -> Callable[[dict[str, Any]], str]:
    return lambda obj: condition(obj["status"], type_)["message"] + suffix


def fixed(message: str) -> Callable[[dict[str, Any]], str]:
    return lambda obj: message


@dataclass(frozen=True)
class Case:
    name: str  # testdata/<health>_<name>.yaml
    obj: Callable[[], dict[str, Any]]
    # The health Argo CD must show for the object, and the words it shows.
    expect: Callable[[dict[str, Any]], tuple[str, str]]

    def render(self) -> tuple[str, dict[str, Any], dict[str, str]]:
        obj = self.obj()
        obj["metadata"]["name"] = self.name.replace("_", "-")
        health, message = self.expect(obj)
        return f"{health.lower()}_{self.name}.yaml", obj, {"status": health, "message": message}


def expect(health: str, message: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], tuple[str, str]]:
    return lambda obj: (health, message(obj))


def transient_or_permanent(obj: dict[str, Any]) -> tuple[str, str]:
    """A validation problem: transient (Validated=Unknown) keeps the job Progressing with it; a
    permanent one (Validated=False, then Stalled=True) is Degraded."""
    if condition(obj["status"], "Validated")["status"] == "False":
        return "Degraded", cond_message("Stalled")(obj)
    return "Progressing", cond_message("Reconciling")(obj)


def status_behind() -> dict[str, Any]:
    """A finished job whose spec Argo CD just changed (generation 2), before the operator saw it."""
    obj = succeeded()
    obj["metadata"]["generation"] = 2
    return obj


def finished_then_edited() -> dict[str, Any]:
    """The pass after a spec edit (same runId) on a finished job whose sandbox expired: the operator
    restates the run's outcome for generation 2, so the job stays Healthy."""
    done = succeeded()
    expired = observation(sandbox_state=SANDBOX_EXPIRED, applied=False, now=NOW + timedelta(days=1))
    return written(expired, minimal_spec(runPolicy={"ttlSecondsAfterFinished": 3600}), generation=2,
                   previous=done["status"])


def condition_behind() -> dict[str, Any]:
    """That status with its Succeeded condition one generation behind, as an older operator that did
    not restate finished outcomes left it: the check waits rather than trust it."""
    obj = finished_then_edited()
    for c in obj["status"]["conditions"]:
        if c["type"] == "Succeeded":
            c["observedGeneration"] = 1
    return obj


def phase_only(build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """The object without conditions: status.phase is all a check can go by."""
    def without_conditions() -> dict[str, Any]:
        obj = build()
        obj["status"].pop("conditions")
        return obj
    return without_conditions


def training() -> dict[str, Any]:
    return written(observation(pytorchjob=pytorchjob(RUNNING), pods=[pod(MASTER), pod(WORKER)], progress=progress(150)))


def succeeded() -> dict[str, Any]:
    return written(observation(pytorchjob=pytorchjob(SUCCEEDED),
                               pods=[pod(MASTER, "Succeeded", 0), pod(WORKER, "Succeeded", 0)],
                               progress=progress(600), result=RunResult(
                                   succeeded=True, reason="Succeeded", message="trained 600 steps",
                                   adapterUri="s3://team-a/models/support-bot/1/adapter/")))


def trainer_failed() -> dict[str, Any]:
    return written(observation(pytorchjob=pytorchjob(FAILED), pods=[pod(MASTER, "Failed", 1), pod(WORKER)],
                               progress=progress(320)))


def suspended() -> dict[str, Any]:
    return written(observation(pytorchjob=pytorchjob(SUSPENDED, suspend=True), progress=progress(200)),
                   minimal_spec(runPolicy={"suspend": True}))


def progress_stalled() -> dict[str, Any]:
    observed = observation(pytorchjob=pytorchjob(RUNNING), pods=[pod(MASTER), pod(WORKER)],
                           progress=progress(150, updated="2026-11-21T09:20:00Z"))
    return written(observed, previous=seen_earlier(job(minimal_spec()), observed, 7200)["status"])


def queued() -> dict[str, Any]:
    return written(observation(pytorchjob=pytorchjob(SUSPENDED, suspend=True),
                               queue=queue_state(kueue_pending_workload(), CLUSTER_QUEUE)),
                   minimal_spec(runPolicy={"queueName": CLUSTER_QUEUE}))


# A spec the CRD schema admits and the operator refuses (a cross-field rule).
INVALID = minimal_spec(evaluation={"compareToBase": False, "maxPerplexityRatio": 1.2})
INVALID_PAUSED = {**INVALID, "runPolicy": {"suspend": True}}

CASES = [
    Case("no_status", lambda: job(minimal_spec(), defaults=False),
         expect("Progressing", fixed("Waiting for the operator to pick up the job"))),
    Case("validating", lambda: written(validation_problems(minimal_spec(), Facts(
        secret_found=True, secret_keys=frozenset(CREDENTIAL_KEYS), secret_opted_in=True,
        s3={"spec.model.uri": S3Check(exists=None, error="connect timeout after 10s")}))),
         expect("Progressing", cond_message("Reconciling"))),
    Case("missing_secret", lambda: written(validation_problems(minimal_spec(), Facts(secret_found=False))),
         transient_or_permanent),
    Case("invalid_spec", lambda: written(validation_problems(INVALID, Facts()), INVALID),
         expect("Degraded", cond_message("Stalled"))),
    # Suspended comes before Stalled (kstatus, which reads Stalled, says Failed here).
    Case("paused_with_invalid_spec", lambda: written(validation_problems(INVALID_PAUSED, Facts()), INVALID_PAUSED),
         expect("Suspended", cond_message("Suspended"))),
    Case("not_started", lambda: written(observation()), expect("Progressing", cond_message("Reconciling"))),
    Case("queued", queued, expect("Progressing", cond_message("Reconciling"))),
    Case("unschedulable", lambda: written(observation(pytorchjob=pytorchjob(RUNNING),
                                                      pods=[pod(MASTER), unschedulable(WORKER)])),
         expect("Progressing", cond_message("Reconciling"))),
    Case("starting", lambda: written(observation(pytorchjob=pytorchjob())),
         expect("Progressing", cond_message("Reconciling"))),
    Case("training", training, expect("Progressing", cond_message("Reconciling", " (25%)"))),
    Case("training_without_progress", lambda: written(observation(
        pytorchjob=pytorchjob(RUNNING), pods=[pod(MASTER), pod(WORKER)], now=NOW.replace(hour=8, minute=5))),
         expect("Progressing", cond_message("Reconciling"))),
    Case("restarting", lambda: written(observation(
        pytorchjob=pytorchjob(RESTARTING), progress=progress(200),
        pods=[pod(MASTER), pod(WORKER, "Failed", exit_codes.UNEXPECTED_ERROR)])),
         expect("Progressing", cond_message("Reconciling", " (33.3%)"))),
    Case("spec_changed_during_run", lambda: written(observation(
        pytorchjob=pytorchjob(RUNNING), pods=[pod(MASTER), pod(WORKER)], progress=progress(150), spec_drift=True),
        generation=2), expect("Progressing", cond_message("Reconciling", " (25%)"))),
    Case("progress_stalled", progress_stalled, expect("Degraded", cond_message("Stalled"))),
    Case("succeeded", succeeded, expect("Healthy", cond_message("Succeeded"))),
    Case("trainer_failed", trainer_failed, expect("Degraded", cond_message("Failed"))),
    Case("evaluation_gate", lambda: written(observation(
        pytorchjob=pytorchjob(FAILED), pods=[pod(MASTER, "Failed", exit_codes.EVALUATION_GATE_FAILED), pod(WORKER)],
        progress=progress(600), result=evaluation_gate_result())), expect("Degraded", cond_message("Failed"))),
    Case("suspended", suspended, expect("Suspended", cond_message("Suspended"))),
    Case("status_generation_behind", status_behind,
         expect("Progressing", fixed("Waiting for the operator to observe generation 2"))),
    Case("spec_edited_after_finish", finished_then_edited, expect("Healthy", cond_message("Succeeded"))),
    Case("condition_generation_behind", condition_behind,
         expect("Progressing", fixed("Condition Succeeded describes generation 1, the spec is at generation 2"))),
    Case("phase_only_succeeded", phase_only(succeeded), expect("Healthy", fixed("The fine-tuning run succeeded"))),
    Case("phase_only_failed", phase_only(trainer_failed), expect("Degraded", fixed("The fine-tuning run failed"))),
    Case("phase_only_suspended", phase_only(suspended), expect("Suspended", fixed("The fine-tuning run is suspended"))),
    Case("phase_only_stalled", phase_only(progress_stalled),
         expect("Degraded", fixed("The fine-tuning job is stalled"))),
    Case("phase_only_running", phase_only(training),
         expect("Progressing", fixed("Phase Running (25%)"))),
    Case("phase_only_queued", phase_only(queued), expect("Progressing", fixed("Phase Queued"))),
]


# ---- the files ----------------------------------------------------------------------------------


def dump(document: Any) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1000)


ARGOCD_CM_PATCH_HEADER = """\
# Patch for Argo CD's argocd-cm ConfigMap: the FineTuneJob health check, which needs no
# resource.customizations.useOpenLibs (it uses no string or math library).
# Generated by `make argocd-testdata` from resource_customizations/finetune.dev/FineTuneJob/health.lua,
# which it holds verbatim (a test checks it).
#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file argocd/argocd-cm-patch.yaml
"""


def argocd_cm_patch(script: str) -> str:
    body = dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "argocd-cm", "namespace": "argocd"}})
    indented = "".join(f"    {line}" if line.strip() else line for line in script.splitlines(keepends=True))
    return f"{ARGOCD_CM_PATCH_HEADER}{body}data:\n  {HEALTH_KEY}: |\n{indented}"


def render() -> dict[Path, str]:
    """Every generated file: path -> content."""
    files: dict[Path, str] = {}
    tests = []
    for case in CASES:
        filename, obj, health = case.render()
        files[TESTDATA / filename] = dump(obj)
        tests.append({"healthStatus": health, "inputPath": f"testdata/{filename}"})
    files[HEALTH_TEST] = dump({"tests": tests})
    files[ARGOCD_CM_PATCH] = argocd_cm_patch(HEALTH_LUA.read_text())
    return files


def generated_on_disk() -> dict[Path, str]:
    """What the generator owns on disk now (to compare with render())."""
    paths = [*sorted(TESTDATA.glob("*")), HEALTH_TEST, ARGOCD_CM_PATCH]
    return {p: p.read_text() for p in paths if p.is_file()}


def write() -> None:
    files = render()
    TESTDATA.mkdir(parents=True, exist_ok=True)
    for stale in set(TESTDATA.glob("*")) - set(files):
        stale.unlink()
    for path, content in files.items():
        path.write_text(content)
    print(f"wrote {len(files)} files ({len(CASES)} cases) under {ARGOCD}", file=sys.stderr)


if __name__ == "__main__":
    write()
