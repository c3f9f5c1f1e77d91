"""A search's passes (pure): which trials start, stop, suspend and promote; their status and Events."""

from __future__ import annotations

import copy
import json
import math
from datetime import datetime, timezone

import pytest

from finetune_operator.builders import JobRef, names
from finetune_operator.builders.events import search_events
from finetune_operator.builders.run import Trial, run_objects
from finetune_operator.reconcile import View, decide
from finetune_operator.s3 import RunDocuments
from finetune_operator.search import driver
from finetune_operator.status import SANDBOX_ACTIVE, Observation, derive_status
from finetune_operator.validation import Facts, validate
from finetune_trainer.config import EvalPoint, EvaluationResult, Progress, TrainerConfig
from op_testdata import job, minimal_spec
from test_op_reconcile import ACTIVE_NS, CFG, CPU, NOW, SANDBOX_KINDS, SECRET

RATES = [1e-4, 3e-4, 1e-3, 3e-3]
SEARCH = {"parameters": {"learningRate": {"values": RATES}}, "trials": 4, "parallelism": 2, "strategy": "grid",
          "seed": 3, "pruning": {"rule": "median", "startupTrials": 1}}


def body(status=None, search=None, **spec):
    spec = minimal_spec(**{"resources": CPU, "evaluation": {"everySteps": 5, "maxPerplexityRatio": 1.0},
                           "search": search or SEARCH, **spec})
    return job(spec, status=status)


def trial_ptj(b, number, params, condition=None, suspend=False, spec_hash=None):
    """A trial's PyTorchJob as the operator made it, as read back with a condition of the training-operator."""
    ptj = copy.deepcopy(run_objects(JobRef.from_body(b), CFG, Trial(number, params))[1])
    ptj["spec"]["runPolicy"]["suspend"] = suspend
    if spec_hash:
        ptj["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH] = spec_hash
    if condition:
        ptj["status"] = {"conditions": [{"type": condition, "status": "True"}]}
    return ptj


def docs(losses, final=None):
    """A trial's documents: validation losses at steps 5, 10, ...; its final evaluation."""
    history = [EvalPoint(step=5 * (i + 1), evalLoss=v) for i, v in enumerate(losses)]
    evaluation = EvaluationResult(basePerplexity=20.0, perplexity=math.exp(final)) if final is not None else None
    return RunDocuments(progress=Progress(step=history[-1].step if history else 0, evalHistory=history),
                        evaluation=evaluation)


def view_of(b, trials=None, **kw):
    spec, problems = validate(b["spec"], CFG, Facts())
    assert not problems, problems
    return View(body=b, now=NOW, spec=spec, problems=[], secret=SECRET, namespace=ACTIVE_NS, trials=trials or {}, **kw)


def trial_status(number, lr, phase, value=None, history=()):
    out = {"number": number, "parameters": {"learningRate": lr}, "phase": phase,
           "history": [{"step": s, "value": v} for s, v in history]}
    if value is not None:
        out["value"] = value
    return out


def status_with(*trials, **extra):
    return {"runId": "1", "search": {"trials": list(trials), **extra}}


def applied_trials(plan):
    return sorted(int(o["metadata"]["labels"][names.LABEL_TRIAL]) for o in plan.apply if o["kind"] == "PyTorchJob")


def test_a_new_search_makes_the_sandbox_and_its_first_parallelism_trials():
    plan = decide(view_of(body()), CFG)
    assert [o["kind"] for o in plan.apply] == SANDBOX_KINDS + ["ConfigMap", "PyTorchJob"] * 2
    assert applied_trials(plan) == [0, 1]
    quota = next(o for o in plan.apply if o["kind"] == "ResourceQuota")
    assert quota["spec"]["hard"]["pods"] == "4"  # two trials at once, twice for overlapping restarts
    ptjs = [o for o in plan.apply if o["kind"] == "PyTorchJob"]
    assert [p["metadata"]["name"] for p in ptjs] == ["train-1-t0", "train-1-t1"]
    config_maps = [o for o in plan.apply if o["kind"] == "ConfigMap"]
    assert [c["metadata"]["name"] for c in config_maps] == ["trainer-config-1-t0", "trainer-config-1-t1"]
    for number, (ptj, cm) in enumerate(zip(ptjs, config_maps)):
        params = json.loads(ptj["metadata"]["annotations"][names.ANNOTATION_TRIAL_PARAMETERS])
        config = TrainerConfig.from_json(cm["data"][names.CONFIG_KEY])
        assert config.hyperparameters.learningRate == params["learningRate"] and params["learningRate"] in RATES
        assert config.output.uri.endswith(f"/trials/t{number}/")
        assert config.evaluation.maxPerplexityRatio is None and config.evaluation.everySteps == 5
        volume = ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"][0]
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
        assert ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"][names.LABEL_TRIAL] == str(number)
    assert plan.search.planned == 4 and not plan.promote


def test_trial_parameters_are_the_same_on_every_pass():
    first, second = decide(view_of(body()), CFG), decide(view_of(body()), CFG)
    assert first.search.start == second.search.start


def test_a_finished_trial_makes_room_for_the_next_and_running_ones_are_left_alone():
    b = body(status=status_with(trial_status(0, 1e-3, "Running"), trial_status(1, 3e-3, "Running")))
    trials = {0: driver.TrialRun(trial_ptj(b, 0, {"learningRate": 1e-3}, "Succeeded"), docs([2.0, 1.5], final=1.4)),
              1: driver.TrialRun(trial_ptj(b, 1, {"learningRate": 3e-3}, "Running"), docs([1.9]))}
    plan = decide(view_of(b, trials=trials), CFG)
    assert applied_trials(plan) == [2]
    by_number = {t["number"]: t for t in plan.search.trials}
    assert by_number[0]["phase"] == "Succeeded" and by_number[0]["value"] == pytest.approx(1.4)
    assert by_number[1]["phase"] == "Running" and by_number[1]["step"] == 5
    assert by_number[2]["parameters"]["learningRate"] not in (1e-3, 3e-3)  # the grid never repeats a point


def test_a_trial_made_before_an_operator_restart_is_adopted_not_made_again():
    b = body(status=status_with(trial_status(0, 1e-3, "Running")))  # trial 1's status was never written
    trials = {0: driver.TrialRun(trial_ptj(b, 0, {"learningRate": 1e-3}, "Running")),
              1: driver.TrialRun(trial_ptj(b, 1, {"learningRate": 3e-4}))}
    plan = decide(view_of(b, trials=trials), CFG)
    assert applied_trials(plan) == []
    assert [(t["number"], t["parameters"]) for t in plan.search.trials] == [(0, {"learningRate": 1e-3}),
                                                                           (1, {"learningRate": 3e-4})]


def test_a_trial_whose_pytorchjob_was_deleted_is_made_again_and_resumes():
    b = body(status=status_with(trial_status(0, 1e-3, "Running"), trial_status(1, 3e-4, "Running")))
    plan = decide(view_of(b, trials={0: driver.TrialRun(trial_ptj(b, 0, {"learningRate": 1e-3}, "Running"))}), CFG)
    assert applied_trials(plan) == [1]
    made = next(o for o in plan.apply if o["kind"] == "PyTorchJob")
    assert json.loads(made["metadata"]["annotations"][names.ANNOTATION_TRIAL_PARAMETERS]) == {"learningRate": 3e-4}


def test_a_bad_trial_is_pruned_its_pytorchjob_deleted_and_the_next_one_started():
    b = body(status=status_with(trial_status(0, 3e-3, "Succeeded", 1.0, [(5, 1.5), (10, 1.0)]),
                                trial_status(1, 1e-4, "Running")))
    trials = {1: driver.TrialRun(trial_ptj(b, 1, {"learningRate": 1e-4}, "Running"), docs([2.5]))}
    plan = decide(view_of(b, trials=trials), CFG)
    pruned = plan.search.trials[1]
    assert pruned["phase"] == "Pruned" and pruned["pruned"] and "step 5" in pruned["message"]
    assert [(d["kind"], d["metadata"]["name"]) for d in plan.delete] == [("PyTorchJob", "train-1-t1")]
    assert applied_trials(plan) == [2, 3]  # both slots free again


def test_suspending_a_search_suspends_its_running_trials_and_starts_none():
    b = body(status=status_with(trial_status(0, 1e-3, "Running"), trial_status(1, 3e-4, "Succeeded", 1.2)),
             runPolicy={"suspend": True})
    trials = {0: driver.TrialRun(trial_ptj(b, 0, {"learningRate": 1e-3}, "Running")),
              1: driver.TrialRun(trial_ptj(b, 1, {"learningRate": 3e-4}, "Succeeded"))}
    plan = decide(view_of(b, trials=trials), CFG)
    assert plan.trial_suspend == ["train-1-t0"] and applied_trials(plan) == []
    resumed = body(status=b["status"])
    trials[0] = driver.TrialRun(trial_ptj(resumed, 0, {"learningRate": 1e-3}, suspend=True))
    assert decide(view_of(resumed, trials=trials), CFG).trial_suspend == ["train-1-t0"]


def test_a_spec_changed_during_the_search_is_reported_and_starts_no_trial():
    b = body(status=status_with(trial_status(0, 1e-3, "Succeeded", 1.2)))
    trials = {0: driver.TrialRun(trial_ptj(b, 0, {"learningRate": 1e-3}, "Succeeded", spec_hash="0123456789abcdef"))}
    plan = decide(view_of(b, trials=trials), CFG)
    assert plan.spec_drift and applied_trials(plan) == []


def test_when_every_trial_is_over_the_best_is_promoted():
    b = body(status=status_with(*(trial_status(i, lr, "Succeeded", v) for i, (lr, v) in
                                  enumerate(zip(RATES[:3], [1.5, 1.1, 1.3]))), trial_status(3, RATES[3], "Running")))
    trials = {3: driver.TrialRun(trial_ptj(b, 3, {"learningRate": RATES[3]}, "Failed"), RunDocuments())}
    plan = decide(view_of(b, trials=trials), CFG)
    assert plan.search.finished and plan.promote and plan.search.best.number == 1
    assert plan.search.trials[3]["phase"] == "Failed"


def _status_after(b, plan, promotion=None):
    spec = validate(b["spec"], CFG, Facts())[0]
    obs = Observation(now=NOW, sandbox="s", sandbox_state=SANDBOX_ACTIVE, applied=True,
                      search=driver.observe(spec, plan.search, b.get("status") or {}, promotion))
    return derive_status(b, obs)


def conditions(status):
    return {c["type"]: c for c in status["conditions"]}


def test_the_status_of_a_running_search():
    b = body(status=status_with(trial_status(0, 1e-3, "Running"), trial_status(1, 3e-4, "Running")))
    trials = {0: driver.TrialRun(trial_ptj(b, 0, {"learningRate": 1e-3}, "Succeeded"), docs([2.0], final=1.4)),
              1: driver.TrialRun(trial_ptj(b, 1, {"learningRate": 3e-4}, "Running"), docs([1.9]), gpu_seconds=12.0)}
    status = _status_after(b, decide(view_of(b, trials=trials), CFG))
    assert status["phase"] == "Running"
    running = conditions(status)["Running"]
    assert running["reason"] == "Searching" and "1/4" in running["message"] and "best t0" in running["message"]
    search = status["search"]
    assert search["progress"] == "1/4" and search["best"]["number"] == 0 and search["running"] == 2
    assert search["trials"][1]["gpuSeconds"] == 12.0 and status["gpuSeconds"] == 12.0


@pytest.mark.parametrize("ratio_limit, outcome, reason", [
    (1.0, "Succeeded", "Completed"),
    (0.01, "Failed", "EvaluationGateFailed"),
])
def test_a_promoted_search_succeeds_or_fails_its_gate(ratio_limit, outcome, reason):
    b = body(status=status_with(trial_status(0, 1e-3, "Succeeded", 1.2), trial_status(1, 3e-4, "Succeeded", 1.6),
                                trial_status(2, 1e-4, "Pruned"), trial_status(3, 3e-3, "Failed")),
             evaluation={"everySteps": 5, "maxPerplexityRatio": ratio_limit})
    plan = decide(view_of(b), CFG)
    promotion = driver.Promotion(promoted=True, report_uri="s3://b/o/runs/1/search-report.md",
                                 documents=RunDocuments(evaluation=EvaluationResult(basePerplexity=20.0,
                                                                                     perplexity=math.exp(1.2))))
    status = _status_after(b, plan, promotion)
    assert status["phase"] == outcome
    cond = conditions(status)[outcome]
    assert (cond["reason"] == reason) and "t0" in cond["message"], cond
    if outcome == "Failed":
        assert "maxPerplexityRatio 0.01" in cond["message"]
    assert status["search"]["promoted"] and status["search"]["reportUri"].endswith("search-report.md")


def test_a_search_without_a_single_value_fails():
    b = body(status=status_with(*(trial_status(i, lr, "Failed") for i, lr in enumerate(RATES))))
    status = _status_after(b, decide(view_of(b), CFG))
    assert status["phase"] == "Failed" and conditions(status)["Failed"]["reason"] == "SearchFailed"


def test_a_promotion_that_could_not_finish_is_reported_and_tried_again():
    b = body(status=status_with(*(trial_status(i, lr, "Succeeded", 1.0 + i) for i, lr in enumerate(RATES))))
    plan = decide(view_of(b), CFG)
    status = _status_after(b, plan, driver.Promotion(error="promoting trial 0: S3 said no"))
    running = conditions(status)["Running"]
    assert running["reason"] == "Promoting" and "S3 said no" in running["message"] and status["phase"] != "Succeeded"
    assert decide(view_of(body(status=status)), CFG).promote


def test_events_of_a_search():
    old = status_with(trial_status(0, 1e-3, "Running"), metric="evalLoss")
    new = status_with(trial_status(0, 1e-3, "Pruned"), trial_status(1, 3e-4, "Pending"), metric="evalLoss")
    new["search"]["trials"][0]["message"] = "pruned at step 5"
    assert [(t, r) for t, r, _ in search_events(old, new)] == [("Normal", "TrialPruned"), ("Normal", "TrialStarted")]
    done = status_with(trial_status(0, 1e-3, "Pruned"), trial_status(1, 3e-4, "Succeeded", 1.25), metric="evalLoss",
                       promoted=True, best={"number": 1, "value": 1.25}, reportUri="s3://b/r.md")
    events = search_events(new, done)
    assert [r for _, r, _ in events] == ["TrialSucceeded", "BestTrialPromoted"]
    assert "1.25" in events[0][2] and "s3://b/r.md" in events[1][2]
    assert search_events(done, done) == []


def test_a_trial_finished_without_documents_waits_for_them():
    b = body(status=status_with(trial_status(0, 1e-3, "Running")))
    trials = {0: driver.TrialRun(trial_ptj(b, 0, {"learningRate": 1e-3}, "Succeeded"), documents=None)}
    plan = decide(view_of(b, trials=trials), CFG)
    assert plan.search.trials[0]["phase"] == "Running"


def test_a_trial_lost_before_it_was_recorded_counts_as_failed_and_numbers_stay_dense():
    b = body(status=status_with(trial_status(0, 1e-3, "Succeeded", 1.2)))
    trials = {2: driver.TrialRun(trial_ptj(b, 2, {"learningRate": 3e-4}, "Running"))}  # t1 was made, then deleted
    plan = decide(view_of(b, trials=trials), CFG)
    assert [(t["number"], t["phase"]) for t in plan.search.trials] == [(0, "Succeeded"), (1, "Failed"), (2, "Running"),
                                                                       (3, "Pending")]
    assert applied_trials(plan) == [3]
