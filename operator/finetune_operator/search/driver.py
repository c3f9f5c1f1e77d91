"""The search's trials from what one pass observed (a pure function): their status, which to start,
which to stop, whether the search is over.

The status holds every trial the operator started (number, parameters, phase, metric history); a
trial's PyTorchJob carries its number and parameters too, so a trial created just before an
operator restart (its status not yet written) is adopted, never started twice. The Optuna study is
rebuilt from these records on every pass (`study.build_study`)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.api.search import Metric, Search
from finetune_operator.api.types import TrialPhase
from finetune_operator.builders import names as n
from finetune_operator.kueue import QueueState
from finetune_operator.s3 import RunDocuments
from finetune_operator.search import space, study
from finetune_operator.status import account_gpu_seconds, ptj_condition

FINAL = (TrialPhase.Succeeded.value, TrialPhase.Pruned.value, TrialPhase.Failed.value)
ACTIVE = (TrialPhase.Pending.value, TrialPhase.Running.value)
STATES = {TrialPhase.Pending.value: "running", TrialPhase.Running.value: "running",
          TrialPhase.Succeeded.value: "complete", TrialPhase.Pruned.value: "pruned", TrialPhase.Failed.value: "failed"}


@dataclass
class TrialRun:
    """What a pass observed of one trial: its PyTorchJob, the documents read (None: not read this
    pass), the GPU-seconds of its pods and, with a Kueue queue, what its Workload says."""

    pytorchjob: dict[str, Any] | None = None
    documents: RunDocuments | None = None
    gpu_pod_seconds: dict[str, float] = field(default_factory=dict)  # GPU time of each of its pods, by uid
    queue: QueueState | None = None  # None: no queue, or Kueue made no Workload for it (yet)


@dataclass
class SearchPlan:
    trials: list[dict[str, Any]]  # TrialStatus documents, by number
    start: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (number, parameters) to apply
    stop: list[int] = field(default_factory=list)  # trials whose PyTorchJob goes (pruned)
    planned: int = 0
    finished: bool = False  # every planned trial is final
    best: study.TrialRecord | None = None


def trial_number(ptj: dict[str, Any]) -> int | None:
    label = (ptj["metadata"].get("labels") or {}).get(n.LABEL_TRIAL, "")
    return int(label) if label.isdigit() else None


def trial_parameters(ptj: dict[str, Any]) -> dict[str, Any]:
    """The parameters a trial's PyTorchJob was made with (the operator's own annotation)."""
    try:
        params = json.loads((ptj["metadata"].get("annotations") or {}).get(n.ANNOTATION_TRIAL_PARAMETERS, "{}"))
    except ValueError:
        return {}
    return {k: v for k, v in params.items() if k in space.PARAMETERS and isinstance(v, (int, float))} \
        if isinstance(params, dict) else {}


def metric_value(metric: str, eval_loss: float | None) -> float | None:
    """The search metric from a validation loss (the trainer reports losses)."""
    if eval_loss is None or not math.isfinite(eval_loss):
        return None
    if metric == Metric.perplexity.value:
        return math.exp(min(eval_loss, 700.0))
    return eval_loss


def _history(search: Search, documents: RunDocuments) -> list[tuple[int, float]]:
    """The trial's validation metric by step, every evaluation it reported (the status keeps
    `study.kept_history` of it)."""
    points: dict[int, float] = {}
    for point in (documents.progress.evalHistory if documents.progress else []):
        value = metric_value(search.metric, point.evalLoss)
        if value is not None:
            points[point.step] = round(value, 6)
    return sorted(points.items())


def _set_history(search: Search, every_steps: int, trial: dict[str, Any], history: list[tuple[int, float]]) -> None:
    """The trial's status from the evaluations it reported (ascending steps, at least one)."""
    pick = min if search.direction == "minimize" else max
    trial["history"] = [{"step": step, "value": value} for step, value in study.kept_history(search, every_steps, history)]
    trial["step"] = history[-1][0]
    trial["bestValue"] = pick(value for _, value in history)


def _final_value(search: Search, documents: RunDocuments | None, trial: dict[str, Any]) -> float | None:
    evaluation = documents.evaluation if documents else None
    if evaluation is not None and evaluation.perplexity:
        return metric_value(search.metric, math.log(evaluation.perplexity))
    history = (_history(search, documents) if documents else None) or \
        [(p["step"], p["value"]) for p in trial.get("history") or []]
    return history[-1][1] if history else None


def records(trials: list[dict[str, Any]]) -> list[study.TrialRecord]:
    return [study.TrialRecord(number=t["number"], params=dict(t.get("parameters") or {}),
                              state=STATES[t.get("phase", TrialPhase.Pending.value)], value=t.get("value"),
                              history=[(p["step"], p["value"]) for p in t.get("history") or []])
            for t in trials]


def _observe_trial(search: Search, every_steps: int, trial: dict[str, Any], run: TrialRun | None) -> dict[str, Any]:
    """A trial that has not finished, brought up to date with what was observed."""
    trial = dict(trial)
    documents = run.documents if run else None
    if documents is not None and documents.progress is not None:
        history = _history(search, documents)
        if history:
            _set_history(search, every_steps, trial, history)
    if run is not None and run.gpu_pod_seconds:
        account_gpu_seconds(trial, run.gpu_pod_seconds)
    ptj = run.pytorchjob if run else None
    if ptj is None:
        if trial.get("phase") in ACTIVE:
            trial["phase"] = TrialPhase.Pending.value  # to be (re-)made
        return trial
    if ptj_condition(ptj, "Succeeded"):
        value = _final_value(search, documents, trial)
        if value is None and documents is None:
            return trial  # its documents are read on a later pass
        if value is None:
            trial.update(phase=TrialPhase.Failed.value, message="finished without a validation value")
        else:
            trial.update(phase=TrialPhase.Succeeded.value, value=round(value, 6))
    elif failed := ptj_condition(ptj, "Failed"):
        result = documents.result if documents else None
        message = (result.message if result and result.message else failed.get("message") or "the trial failed")
        trial.update(phase=TrialPhase.Failed.value, message=message[:1024])
    elif suspended(ptj):  # by its user, or by Kueue until it admits (again) the trial: its pods go
        trial["phase"] = TrialPhase.Pending.value  # (a Running condition may not have caught up yet)
    elif ptj_condition(ptj, "Running") or ptj_condition(ptj, "Restarting"):
        trial["phase"] = TrialPhase.Running.value
    return trial


def never_ran(trial: dict[str, Any], queue: QueueState | None) -> bool:
    """A trial Kueue has not admitted and that has not trained yet (no step, no GPU-second): like a run not
    started, it waits for its tenant's budget. A trial preempted after it trained resumes whatever the budget."""
    return queue is not None and not queue.admitted and not trial.get("step") and not trial.get("gpuSeconds")


def suspended(ptj: dict[str, Any]) -> bool:
    return ptj_condition(ptj, "Suspended") is not None or bool(((ptj.get("spec") or {}).get("runPolicy") or {}).get("suspend"))


def _new_history(search: Search, recorded: dict[str, Any], run: TrialRun | None) -> list[tuple[int, float]]:
    """Every evaluation the trial reported, when this pass read one newer than its status records; else []."""
    documents = run.documents if run else None
    history = _history(search, documents) if documents is not None and documents.progress is not None else []
    return history if history and history[-1][0] > int(recorded.get("step") or 0) else []


def _trained_every_step(run: TrialRun | None) -> bool:
    """The trial's trainer reached its last step (by its progress.json): stopping it would save nothing, so
    no rule prunes it and it completes with its final evaluation."""
    progress = run.documents.progress if run and run.documents else None
    if progress is None or progress.totalSteps <= 0:
        return False
    last_evaluation = progress.evalHistory[-1].step if progress.evalHistory else 0
    return max(progress.step, last_evaluation) >= progress.totalSteps


def _pruned_at(search: Search, every_steps: int, trials: dict[int, dict[str, Any]], number: int,
               history: list[tuple[int, float]], since: int) -> int | None:
    """The first of the trial's evaluations after step `since` at which the pruning rule stops it, judged
    as a study driven continuously would have judged it on reporting that evaluation: the trial with
    every evaluation up to it, the others with the evaluations every trial keeps."""
    others = [dataclasses.replace(r, history=study.compared_history(search, every_steps, r.history))
              for r in records(sorted(trials.values(), key=lambda t: t["number"])) if r.number != number]
    params = dict(trials[number].get("parameters") or {})
    compared = {step for step, _ in study.compared_history(search, every_steps, history)}
    for index, (step, _) in enumerate(history):
        # Elsewhere no other trial has a value at the step: neither pruner stops a trial there.
        if step <= since or step not in compared:
            continue
        judged = study.TrialRecord(number=number, params=params, state=study.RUNNING, history=history[:index + 1])
        if study.should_prune(search, [*others, judged], number):
            return step
    return None


def plan_search(search: Search, previous: dict[str, Any], observed: dict[int, TrialRun], may_start: bool, *,
                every_steps: int) -> SearchPlan:
    """The trials after this pass. `previous`: status.search; `observed`: trial number -> what was seen
    (a number absent: no PyTorchJob); `may_start`: new trials may be started (not suspended, the spec
    unchanged, the tenant's policy allows it; trials without their PyTorchJob are (re-)made only then:
    a suspended queued search must give Kueue nothing to admit); `every_steps`: evaluation.everySteps
    (which evaluations the status keeps)."""
    trials = {t["number"]: dict(t) for t in previous.get("trials") or []}
    for number, run in observed.items():  # made before a restart, its status never written: adopted
        if number not in trials and run.pytorchjob is not None:
            trials[number] = {"number": number, "parameters": trial_parameters(run.pytorchjob),
                              "phase": TrialPhase.Pending.value}
    for number in range(max(trials, default=-1)):  # numbers are dense: a trial lost unrecorded is a failed one
        trials.setdefault(number, {"number": number, "parameters": {}, "phase": TrialPhase.Failed.value,
                                   "message": "its PyTorchJob was deleted before its status was recorded"})
    reported: dict[int, tuple[list[tuple[int, float]], int]] = {}  # evaluations new this pass, the step before
    for number, trial in trials.items():
        if trial.get("phase") not in FINAL:
            if history := _new_history(search, trial, observed.get(number)):
                reported[number] = (history, int(trial.get("step") or 0))
            trials[number] = _observe_trial(search, every_steps, trial, observed.get(number))

    plan = SearchPlan(trials=[], planned=space.planned_trials(search))
    # A trial is judged when it reports, at each new evaluation (as Optuna's should_prune after each
    # report): not again on later passes, when other trials may have finished meanwhile. A trial
    # suspended since (Pending) is judged too: its new evaluations are not read twice. A trial read at its
    # last step is not: it has trained (reports read late, as when a trial finished while another ran beside it).
    for number, (history, since) in sorted(reported.items()):
        trial = trials[number]
        if trial.get("phase") not in ACTIVE or _trained_every_step(observed.get(number)):
            continue
        step = _pruned_at(search, every_steps, trials, number, history, since)
        if step is None:
            continue
        history = [p for p in history if p[0] <= step]  # what it had reported when the rule stopped it
        _set_history(search, every_steps, trial, history)
        trial.update(phase=TrialPhase.Pruned.value, pruned=True,
                     message=f"pruned at step {step} ({search.metric} {history[-1][1]:.4g}) by the "
                             f"{search.pruning.rule} rule")
        plan.stop.append(number)

    for number, trial in sorted(trials.items()):
        missing = observed.get(number) is None or observed[number].pytorchjob is None
        if may_start and trial.get("phase") in ACTIVE and missing:
            plan.start.append((number, trial["parameters"]))  # not made yet, or deleted: (re-)made, it resumes
    active = sum(1 for t in trials.values() if t.get("phase") in ACTIVE)
    while may_start and active < search.parallelism and len(trials) < plan.planned:
        number = len(trials)
        params = study.ask(search, records(sorted(trials.values(), key=lambda t: t["number"])), number)
        trials[number] = {"number": number, "parameters": params, "phase": TrialPhase.Pending.value}
        plan.start.append((number, params))
        active += 1

    plan.trials = [trials[k] for k in sorted(trials)]
    plan.finished = len(trials) >= plan.planned and all(t.get("phase") in FINAL for t in trials.values())
    plan.best = study.best(search, records(plan.trials))
    return plan


def summary(search: Search, plan: SearchPlan, previous: dict[str, Any]) -> dict[str, Any]:
    """status.search from the plan (promotion and report fields carried over from `previous`)."""
    count = lambda phase: sum(1 for t in plan.trials if t.get("phase") == phase)  # noqa: E731
    done = sum(1 for t in plan.trials if t.get("phase") in FINAL)
    out: dict[str, Any] = {
        "metric": search.metric,
        "progress": f"{done}/{plan.planned}",
        "planned": plan.planned,
        "running": count(TrialPhase.Running.value) + count(TrialPhase.Pending.value),
        "succeeded": count(TrialPhase.Succeeded.value),
        "pruned": count(TrialPhase.Pruned.value),
        "failed": count(TrialPhase.Failed.value),
        "trials": plan.trials,
        "promoted": bool(previous.get("promoted")),
    }
    if plan.best is not None and plan.best.value is not None:
        out["best"] = {"number": plan.best.number, "value": plan.best.value, "parameters": plan.best.params}
    if previous.get("reportUri"):
        out["reportUri"] = previous["reportUri"]
    return out


def describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


@dataclass
class Promotion:
    """What promoting the best trial did: copied and reported, or why not (tried again next pass)."""

    promoted: bool = False
    report_uri: str = ""
    documents: RunDocuments | None = None
    error: str = ""


@dataclass
class SearchObservation:
    """The search as derive_status needs it."""

    status: dict[str, Any]
    running: bool = False  # a trial's pods train
    active: bool = False  # a trial has not finished
    outcome: tuple[str, str, str] | None = None  # (Succeeded|Failed, reason, message) once the search is over
    waiting: str = ""  # why the search has not finished although no trial is active
    queued: bool = False  # every active trial waits for Kueue to admit it
    queue: QueueState | None = None  # what Kueue says of the first waiting trial (else the first active one)


def _waits_for_admission(trial: dict[str, Any], run: TrialRun | None, made: set[int]) -> bool:
    """A queued trial Kueue has not admitted: its Workload says so, or (none made yet) its PyTorchJob is
    suspended, or its PyTorchJob is made in this pass (suspended, for Kueue to admit)."""
    if trial.get("phase") != TrialPhase.Pending.value:
        return False
    ptj = run.pytorchjob if run else None
    if ptj is None:
        return trial["number"] in made
    if run.queue is not None:
        return not run.queue.admitted
    return suspended(ptj)


def _queue_observation(obs: SearchObservation, plan: SearchPlan, observed: dict[int, TrialRun]) -> None:
    made = {number for number, _ in plan.start}
    active = [(t, observed.get(t["number"])) for t in plan.trials if t.get("phase") in ACTIVE]
    waiting = [(t, run) for t, run in active if _waits_for_admission(t, run, made)]
    obs.queued = bool(active) and len(waiting) == len(active)
    known = [run.queue for _, run in waiting if run and run.queue] or [run.queue for _, run in active if run and run.queue]
    obs.queue = known[0] if known else None


def gate(spec, documents: RunDocuments | None) -> tuple[bool, str]:
    """The job's evaluation gates on the promoted trial's evaluation: (passed, message). The trial's
    trainer evaluated every gate (perplexity ratio, tasks, forgetting) without failing on them; an
    evaluation without gate results (a trainer before they were recorded) is judged by the ratio."""
    evaluation = documents.evaluation if documents else None
    if evaluation is not None and evaluation.gates:
        failed = [g.message for g in evaluation.gates if not g.passed]
        return not failed, "; ".join(failed)
    limit = spec.evaluation.maxPerplexityRatio
    if limit is None or evaluation is None or not evaluation.basePerplexity or evaluation.perplexity is None:
        return True, ""
    ratio = evaluation.perplexity / evaluation.basePerplexity
    if ratio <= limit:
        return True, ""
    return False, (f"tuned perplexity {evaluation.perplexity:.4g} is {ratio:.3g}x the base perplexity "
                   f"{evaluation.basePerplexity:.4g}, above evaluation.maxPerplexityRatio {limit}")


def observe(spec, plan: SearchPlan, previous_status: dict[str, Any], promotion: Promotion | None,
            observed: dict[int, TrialRun] | None = None) -> SearchObservation:
    """The search's status and outcome after this pass; `observed` as for plan_search (with each trial's
    Workload where the job has a Kueue queue)."""
    search = spec.search
    previous = previous_status.get("search") or {} if previous_status.get("runId") == spec.runId else {}
    for trial in plan.trials:  # Kueue's count of each trial's Workload, never going down
        run = (observed or {}).get(trial["number"])
        if run is not None and run.queue is not None:
            trial["preemptions"] = max(int(trial.get("preemptions") or 0), run.queue.preemptions)
    status = summary(search, plan, previous)
    if promotion is not None and promotion.promoted:
        status["promoted"] = True
        status["reportUri"] = promotion.report_uri
    obs = SearchObservation(status=status,
                            running=any(t.get("phase") == TrialPhase.Running.value for t in plan.trials),
                            active=any(t.get("phase") in ACTIVE for t in plan.trials))
    if spec.runPolicy.queueName:
        _queue_observation(obs, plan, observed or {})
    if not plan.finished:
        return obs
    counts = f"{status['succeeded']} succeeded, {status['pruned']} pruned, {status['failed']} failed"
    best = plan.best
    if best is None:
        obs.outcome = ("Failed", "SearchFailed", f"no trial finished with a {search.metric} ({counts})")
        return obs
    if promotion is not None and promotion.error:
        obs.waiting = promotion.error
        return obs
    if not status.get("promoted"):
        obs.waiting = f"promoting trial {best.number}"
        return obs
    about = (f"best trial t{best.number} ({describe(best.params)}) {search.metric} {best.value:.4g} of "
             f"{len(plan.trials)} trials ({counts}), promoted to {spec.output.uri}")
    if promotion is not None:  # the promoting pass: the gate on the promoted evaluation
        passed, why = gate(spec, promotion.documents)
        obs.outcome = ("Succeeded", "Completed", about) if passed else ("Failed", "EvaluationGateFailed", f"{why}; {about}")
    return obs
