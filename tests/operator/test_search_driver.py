"""A search's passes (pure): which trials start, stop, suspend and promote; their status and Events."""

from __future__ import annotations

import copy
import json
import math

import optuna
import pytest

from finetune_operator.api.search import Search
from finetune_operator.api.types import MAX_TRIAL_HISTORY
from finetune_operator.builders import JobRef, names
from finetune_operator.builders.events import search_events
from finetune_operator.builders.run import Trial, run_objects
from finetune_operator.reconcile import View, decide
from finetune_operator.s3 import RunDocuments
from finetune_operator.search import driver, space
from finetune_operator import tenancy
from finetune_operator.search.study import build_study
from finetune_operator.status import SANDBOX_ACTIVE, Observation, derive_status
from finetune_operator.validation import Facts, validate
from finetune_trainer.config import EvalPoint, EvaluationResult, GateResult, Progress, TrainerConfig
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
        # The trial evaluates the job's gates without failing on them: the search judges the promoted one.
        assert config.evaluation.maxPerplexityRatio == 1.0 and config.evaluation.everySteps == 5
        assert config.runtime.enforceGates is False
        volume = ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"][0]
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
        assert ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"][names.LABEL_TRIAL] == str(number)
    assert plan.search.planned == 4 and not plan.promote


def test_each_trial_checkpoints_under_its_own_prefix_of_an_explicit_checkpoint_uri():
    b = body()
    b["spec"]["checkpoint"] = {**b["spec"].get("checkpoint", {}), "uri": "s3://team-a/ckpt/bot/"}
    config_maps = [o for o in decide(view_of(b), CFG).apply if o["kind"] == "ConfigMap"]
    assert [TrainerConfig.from_json(c["data"][names.CONFIG_KEY]).checkpoint.uri for c in config_maps] == [
        "s3://team-a/ckpt/bot/trials/t0/", "s3://team-a/ckpt/bot/trials/t1/"]


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


@pytest.mark.parametrize("run_policy, remade", [
    ({}, [1]),
    ({"suspend": True}, []),
    ({"queueName": "q", "suspend": True}, []),  # Kueue would admit it while the job is suspended
], ids=["running", "suspended", "suspended in a queue"])
def test_a_trial_whose_pytorchjob_was_deleted_is_made_again_and_resumes_unless_suspended(run_policy, remade):
    b = body(status=status_with(trial_status(0, 1e-3, "Running"), trial_status(1, 3e-4, "Running")),
             runPolicy=run_policy)
    plan = decide(view_of(b, trials={0: driver.TrialRun(trial_ptj(b, 0, {"learningRate": 1e-3}, "Running"))}), CFG)
    assert applied_trials(plan) == remade
    assert plan.search.trials[1]["phase"] == "Pending"  # to be made again
    if remade:
        made = next(o for o in plan.apply if o["kind"] == "PyTorchJob")
        assert json.loads(made["metadata"]["annotations"][names.ANNOTATION_TRIAL_PARAMETERS]) == {"learningRate": 3e-4}


def test_a_bad_trial_is_pruned_its_pytorchjob_deleted_and_the_next_one_started():
    b = body(status=status_with(trial_status(0, 3e-3, "Succeeded", 1.0, [(5, 1.5), (10, 1.0)]),
                                trial_status(1, 1e-4, "Running")))
    trials = {1: driver.TrialRun(trial_ptj(b, 1, {"learningRate": 1e-4}, "Running"), docs([2.5]))}
    trials[1].pytorchjob["metadata"]["uid"] = "uid-t1"  # as observed: the delete is of that very one
    plan = decide(view_of(b, trials=trials), CFG)
    pruned = plan.search.trials[1]
    assert pruned["phase"] == "Pruned" and pruned["pruned"] and "step 5" in pruned["message"]
    assert [(d["kind"], d["metadata"]["name"], d["metadata"].get("uid")) for d in plan.delete] == [
        ("PyTorchJob", "train-1-t1", "uid-t1")]
    assert applied_trials(plan) == [2, 3]  # both slots free again


@pytest.mark.parametrize("losses, step, total_steps, phase", [
    ([2.5], 5, 20, "Pruned"),  # judged at step 5 of 20: stopped early
    ([2.5], 5, 0, "Pruned"),  # no plan of steps reported (yet): judged
    ([2.5, 2.4, 2.3, 2.2], 20, 20, "Running"),  # read at its last evaluation: it has trained, and completes
    ([2.5, 2.4, 2.3], 20, 20, "Running"),  # past its last evaluation, at its last step
    ([2.5, 2.4, 2.3], 16, 20, "Pruned"),  # short of it: stopping still saves steps
], ids=["early", "no-total-yet", "at-the-last-evaluation", "at-the-last-step", "near-the-end"])
def test_a_trial_read_only_once_it_has_trained_every_step_is_not_pruned(losses, step, total_steps, phase):
    """Reports read late (here: trial 0 finished while trial 1 trained beside it) never stop a trial whose
    trainer has reached its last step: the rule would stop nothing, only lose the trial's adapter."""
    b = body(status=status_with(trial_status(0, 3e-3, "Succeeded", 1.0, [(5, 1.5), (10, 1.0), (15, 0.9), (20, 0.8)]),
                                trial_status(1, 1e-4, "Running")))
    documents = docs(losses)
    documents.progress.step, documents.progress.totalSteps = step, total_steps
    trials = {1: driver.TrialRun(trial_ptj(b, 1, {"learningRate": 1e-4}, "Running"), documents)}
    plan = decide(view_of(b, trials=trials), CFG)
    assert plan.search.trials[1]["phase"] == phase
    assert [d["kind"] for d in plan.delete] == (["PyTorchJob"] if phase == "Pruned" else [])


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
              1: driver.TrialRun(trial_ptj(b, 1, {"learningRate": 3e-4}, "Running"), docs([1.9]),
                                 gpu_pod_seconds={"pod-a": 12.0})}
    status = _status_after(b, decide(view_of(b, trials=trials), CFG))
    assert status["phase"] == "Running"
    running = conditions(status)["Running"]
    assert running["reason"] == "Searching" and "1/4" in running["message"] and "best t0" in running["message"]
    search = status["search"]
    assert search["progress"] == "1/4" and search["best"]["number"] == 0 and search["running"] == 2
    assert search["trials"][1]["gpuSeconds"] == 12.0 and status["gpuSeconds"] == 12.0


@pytest.mark.parametrize("suspend,conditions,phase", [
    (False, ["Running"], "Running"),
    (True, ["Running"], "Pending"),                 # Kueue suspended it; the training-operator has not caught up
    (True, ["Running", "Suspended"], "Pending"),
    (False, ["Running", "Suspended"], "Pending"),   # resumed in the spec; its pods are not back yet
], ids=["running", "preempted, Running not yet updated", "preempted", "being resumed"])
def test_a_suspended_trial_is_pending_and_holds_no_gpus(suspend, conditions, phase):
    b = body(status=status_with(trial_status(0, 1e-3, "Running")),
             resources={"workers": 2, "gpusPerWorker": 1, "nodePool": "a100"})
    ptj = trial_ptj(b, 0, {"learningRate": 1e-3}, suspend=suspend)
    ptj["status"] = {"conditions": [{"type": c, "status": "True"} for c in conditions]}
    status = _status_after(b, decide(view_of(b, trials={0: driver.TrialRun(ptj, docs([1.9]))}), CFG))
    assert status["search"]["trials"][0]["phase"] == phase
    assert tenancy.gpus_running(b["spec"], status) == (2 if phase == "Running" else 0)


def test_a_trials_gpu_time_keeps_its_pods_that_are_gone():
    """A trial preempted by Kueue comes back on new pods: their time adds to the old pods' time."""
    b = body(status=status_with(dict(trial_status(0, 1e-3, "Running"), gpuSeconds=100.0, gpuSecondsSettled=0.0,
                                     gpuPodSeconds={"old-master": 60.0, "old-worker": 40.0})))
    trials = {0: driver.TrialRun(trial_ptj(b, 0, {"learningRate": 1e-3}, "Running"), None,
                                 gpu_pod_seconds={"new-master": 6.0, "new-worker": 4.0})}
    trial = _status_after(b, decide(view_of(b, trials=trials), CFG))["search"]["trials"][0]
    assert (trial["gpuSeconds"], trial["gpuSecondsSettled"], trial["gpuPodSeconds"]) == (
        110.0, 100.0, {"new-master": 6.0, "new-worker": 4.0})


def test_a_long_trial_keeps_a_bounded_history_with_its_latest_evaluation():
    """The status keeps the evaluations every trial keeps and the latest; step and best value come from all."""
    losses = [3.0 - 0.01 * i for i in range(MAX_TRIAL_HISTORY + 18)]
    b = body(status=status_with(trial_status(0, 1e-3, "Running")))
    trials = {0: driver.TrialRun(trial_ptj(b, 0, {"learningRate": 1e-3}, "Running"), docs(losses))}
    trial = _status_after(b, decide(view_of(b, trials=trials), CFG))["search"]["trials"][0]
    steps = [p["step"] for p in trial["history"]]
    assert len(steps) <= MAX_TRIAL_HISTORY and steps[-1] == trial["step"] == 5 * len(losses)
    assert steps[:16] == [5 * n for n in range(1, 17)] and 5 * 80 in steps and 5 * 79 not in steps
    assert trial["bestValue"] == pytest.approx(min(losses), abs=1e-6)


# ---- pruning beyond the status's bound -------------------------------------------------------------

LONG = MAX_TRIAL_HISTORY + 36  # evaluations of a long trial (every 5 steps), more than the status keeps
TURNS_BAD = 80  # the evaluation at which the judged trial below turns worse than the median (a shared step)
BASELINE = [round(3.0 - 0.01 * i, 6) for i in range(LONG)]


def judged_curve(turns_bad=TURNS_BAD):
    """Better than the median of the two finished trials (BASELINE and BASELINE + 0.02) until the evaluation
    `turns_bad`, worse from there on."""
    return [round(v + (0.005 if i + 1 < turns_bad else 0.05), 6) for i, v in enumerate(BASELINE)]


def finished_long(number, lr, curve):
    """A finished trial's status as a pass wrote it from its documents."""
    b = body(status=status_with(trial_status(number, lr, "Running")))
    trials = {number: driver.TrialRun(trial_ptj(b, number, {"learningRate": lr}, "Succeeded"),
                                      docs(curve, final=curve[-1]))}
    return decide(view_of(b, trials=trials), CFG).search.trials[number]


def pass_reading(status, evaluations):
    """The status after a pass that read trial 2's progress.json with its first `evaluations` evaluations."""
    b = body(status=status, search={**SEARCH, "parallelism": 1})
    trials = {2: driver.TrialRun(trial_ptj(b, 2, {"learningRate": RATES[2]}, "Running"),
                                 docs(judged_curve()[:evaluations]))}
    plan = decide(view_of(b, trials=trials), CFG)
    return plan, _status_after(b, plan)


@pytest.mark.parametrize("reads", [
    list(range(1, LONG + 1)),  # a pass per evaluation
    [10, 40, 70, 75, 90],  # several evaluations between two reads: judged at each new one in order
], ids=["one evaluation per pass", "several per pass"])
def test_a_trial_longer_than_the_status_bound_is_pruned_where_it_turns_bad(reads):
    """Pruning judges a trial's newest evaluations against the other trials' values at the same steps, however
    long the trials are (the status kept only their first 32 evaluations, and judged a long trial at its 32nd
    step forever)."""
    status = status_with(finished_long(0, RATES[0], BASELINE),
                         finished_long(1, RATES[1], [round(v + 0.02, 6) for v in BASELINE]),
                         trial_status(2, RATES[2], "Running"))
    for evaluations in reads:
        plan, status = pass_reading(status, evaluations)
        trial = status["search"]["trials"][2]
        assert len(trial["history"]) <= MAX_TRIAL_HISTORY
        if trial["phase"] == "Pruned":
            break
    assert (trial["phase"], plan.search.stop) == ("Pruned", [2]), trial
    assert evaluations >= TURNS_BAD and trial["message"].startswith(f"pruned at step {5 * TURNS_BAD} ")
    assert trial["step"] == trial["history"][-1]["step"] == 5 * TURNS_BAD  # what it had reported then


def test_a_trial_is_judged_once_per_evaluation():
    """A pass that reads nothing new does not judge the trial again (another trial may have finished since)."""
    status = status_with(finished_long(0, RATES[0], [round(v + 0.01, 6) for v in BASELINE]),
                         trial_status(1, RATES[1], "Running"), trial_status(2, RATES[2], "Running"))
    _, status = pass_reading(status, 10)  # better than trial 0, the only finished one
    assert status["search"]["trials"][2]["phase"] == "Running"
    worse = [round(v - 0.5, 6) for v in BASELINE]  # trial 1 finishes far better: the median drops
    status["search"]["trials"][1] = finished_long(1, RATES[1], worse)
    plan, again = pass_reading(status, 10)
    assert again["search"]["trials"][2]["phase"] == "Running" and plan.search.stop == []
    plan, later = pass_reading(again, 11)
    assert later["search"]["trials"][2]["phase"] == "Pruned" and plan.search.stop == [2]


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


def test_a_promoted_trial_that_failed_a_task_or_forgetting_gate_fails_the_search():
    """Every gate the trial's trainer recorded decides, not only the perplexity ratio."""
    b = body(status=status_with(trial_status(0, 1e-3, "Succeeded", 1.2), trial_status(1, 3e-4, "Succeeded", 1.6),
                                trial_status(2, 1e-4, "Pruned"), trial_status(3, 3e-3, "Failed")))
    gates = [GateResult(name="perplexity maxRatio", passed=True),
             GateResult(name="task helpdesk minScore", metric="rougeL", value=0.12, limit=0.3, passed=False,
                        message="task helpdesk: rougeL 0.12 is below the limit 0.3"),
             GateResult(name="general maxPerplexityRise", passed=False,
                        message="general perplexity rose 40% (20 -> 28), above the limit 10%")]
    promotion = driver.Promotion(promoted=True, report_uri="s3://b/o/runs/1/search-report.md", documents=RunDocuments(
        evaluation=EvaluationResult(basePerplexity=20.0, perplexity=math.exp(1.2), gates=gates)))
    status = _status_after(b, decide(view_of(b), CFG), promotion)
    failed = conditions(status)["Failed"]
    assert (status["phase"], failed["reason"]) == ("Failed", "EvaluationGateFailed")
    assert failed["message"].startswith("task helpdesk: rougeL 0.12 is below the limit 0.3; general perplexity rose "
                                        "40% (20 -> 28), above the limit 10%; best trial t0")


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


RUN_1_RESULTS = [("Succeeded", 1.2), ("Succeeded", 1.6), ("Pruned", None), ("Failed", None)]


def run_1_search_status():
    """The status of run 1's search: over, its best trial promoted (the search report written)."""
    status = status_with(*(trial_status(i, lr, phase, value) for i, (lr, (phase, value)) in
                           enumerate(zip(RATES, RUN_1_RESULTS))),
                         metric="evalLoss", planned=4, progress="4/4", promoted=True,
                         best={"number": 0, "value": 1.2, "parameters": {"learningRate": RATES[0]}},
                         reportUri="s3://team-a/models/support-bot/runs/1/search-report.md")
    status["conditions"] = [{"type": "Succeeded", "status": "True", "reason": "Completed", "message": "best trial t0"}]
    return status


def run_1_trial_ptjs():
    """Run 1's trial PyTorchJobs as a pass lists them in the sandbox (the job's uid label, runId 1)."""
    run_1 = body(status=run_1_search_status())
    out = []
    for number, (lr, (phase, _)) in enumerate(zip(RATES, RUN_1_RESULTS)):
        ptj = trial_ptj(run_1, number, {"learningRate": lr}, "Failed" if phase != "Succeeded" else "Succeeded")
        ptj["metadata"]["uid"] = f"uid-run-1-t{number}"
        out.append(ptj)
    return out


def test_a_new_run_id_deletes_the_old_trials_then_starts_a_fresh_search():
    """spec.runId 1 -> 2 after a search: run 1's trial PyTorchJobs and their ConfigMaps (trainer-config-1-tN, not the
    plain run's trainer-config-1) are deleted first; then run 2's search starts at trial 0, as a new search
    would, and its status has nothing of run 1's trials, best or promotion."""
    b = body(status=run_1_search_status(), runId="2")
    old = run_1_trial_ptjs()
    assert {p["metadata"]["labels"][names.LABEL_RUN_ID] for p in old} == {"1"}

    # Pass 1: run 1's objects are still in the sandbox: deleted (each PyTorchJob by its uid), nothing started.
    replacing = decide(view_of(b, other_runs=old), CFG)
    assert [(d["kind"], d["metadata"]["name"], d["metadata"].get("uid")) for d in replacing.delete] == [
        x for n in range(4) for x in (("PyTorchJob", f"train-1-t{n}", f"uid-run-1-t{n}"),
                                      ("ConfigMap", f"trainer-config-1-t{n}", None))]
    assert all(d["metadata"]["namespace"] == replacing.sandbox for d in replacing.delete)
    assert applied_trials(replacing) == [] and replacing.search is None
    assert replacing.replacing_run == "1"  # one run, however many trial jobs it had

    # Pass 2: run 1's objects are gone; the status may still be run 1's (the replacing pass's status write lost, or
    # run 1's sandbox removed after its TTL): run 2 is a fresh search all the same.
    fresh = decide(view_of(body(runId="2")), CFG)  # what a brand-new search of run 2 starts
    spec = validate(b["spec"], CFG, Facts())[0]
    for namespace in (ACTIVE_NS, None):
        view = View(body=b, now=NOW, spec=spec, problems=[], secret=SECRET, namespace=namespace)
        plan = decide(view, CFG)
        assert applied_trials(plan) == [0, 1], f"sandbox {'kept' if namespace else 'removed'}"
        assert [o["metadata"]["name"] for o in plan.apply if o["kind"] == "PyTorchJob"] == ["train-2-t0", "train-2-t1"]
        assert [o["metadata"]["name"] for o in plan.apply if o["kind"] == "ConfigMap"] == [
            "trainer-config-2-t0", "trainer-config-2-t1"]
        assert plan.search.start == fresh.search.start
        assert [(t["number"], t["phase"]) for t in plan.search.trials] == [(0, "Pending"), (1, "Pending")]
        assert not plan.search.finished and not plan.promote and plan.delete == []

        status = _status_after(b, plan)
        search = status["search"]
        assert status["runId"] == "2" and status["phase"] not in ("Succeeded", "Failed")
        assert [(t["number"], t["phase"], t["parameters"]) for t in search["trials"]] == [
            (n, "Pending", p) for n, p in fresh.search.start]
        assert all("value" not in t and not t.get("history") for t in search["trials"])
        assert search["promoted"] is False and "reportUri" not in search and "best" not in search
        assert (search["progress"], search["succeeded"], search["pruned"], search["failed"]) == ("0/4", 0, 0, 0)

    # The status written by the replacing pass is already run 2's, without run 1's search.
    replaced = derive_status(b, Observation(now=NOW, sandbox=replacing.sandbox, sandbox_state=SANDBOX_ACTIVE,
                                            applied=True, replacing_run=replacing.replacing_run))
    assert replaced["runId"] == "2" and "search" not in replaced
    after = decide(view_of(body(status=replaced, runId="2")), CFG)
    assert applied_trials(after) == [0, 1] and after.search.start == fresh.search.start


def long_curves():
    """Validation losses of trials run one after the other, LONG evaluations each: some better than the others
    early and worse from an evaluation on (the one in the comment), some better or worse throughout."""
    def curve(offset=0.0, worse_from=None):
        return [round(0.5 + 1.5 * math.exp(-0.03 * i) + offset + (0.002 * (i - worse_from) if worse_from else 0.0), 6)
                for i in range(LONG)]

    return [curve(), curve(-0.01), curve(worse_from=75), curve(worse_from=70), curve(worse_from=40), curve(0.05),
            curve(-0.03), curve(worse_from=98)]


def shared_evaluation(n):
    """The evaluations every trial keeps: the first 16, then four per doubling (20, 24, 28, 32, 40, ...)."""
    return n <= 16 or n % (1 << max(0, n.bit_length() - 3)) == 0


def ptj_with(condition):
    return {"metadata": {"name": "t"}, "status": {"conditions": [{"type": condition, "status": "True"}]}}


def docs_every(every, losses, final=None):
    history = [EvalPoint(step=every * (i + 1), evalLoss=v) for i, v in enumerate(losses)]
    return RunDocuments(progress=Progress(step=history[-1].step, evalHistory=history),
                        evaluation=EvaluationResult(perplexity=math.exp(final)) if final is not None else None)


@pytest.mark.parametrize("pruning", [
    {"rule": "median", "startupTrials": 1, "warmupSteps": 20},
    {"rule": "successiveHalving", "minSteps": 30, "reductionFactor": 2},
    {"rule": "successiveHalving", "minSteps": 30, "reductionFactor": 3},
], ids=["median", "halving by 2", "halving by 3"])
def test_long_trials_are_pruned_as_a_continuously_driven_study_prunes_them(pruning):
    """Trials of LONG evaluations, one pass per evaluation, the status (bounded) the only memory between passes:
    each trial is pruned where an Optuna study holding every evaluation, asked after every report, prunes it --
    at the steps every trial keeps (successive halving decides only at its rungs, which are kept too; a median
    off those steps has no other trial's value to compare)."""
    every = 10
    search = Search.model_validate({"parameters": {"learningRate": {"min": 1e-5, "max": 1e-2, "scale": "log"}},
                                    "strategy": "random", "trials": 8, "parallelism": 1, "pruning": pruning})
    live = build_study(search, [])
    previous: dict = {"trials": []}
    live_pruned, rebuilt_pruned = [], []
    for number, curve in enumerate(long_curves()):
        trial = live.ask(space.distributions(search))
        pruned_at = None
        for n, loss in enumerate(curve, start=1):
            trial.report(loss, every * n)
            if trial.should_prune():
                if pruning["rule"] == "median" and not shared_evaluation(n):
                    continue  # no finished trial kept a value at this step: not pruned here
                pruned_at = every * n
                break
        live.tell(trial, state=optuna.trial.TrialState.PRUNED) if pruned_at else live.tell(trial, curve[-1])
        live_pruned.append(pruned_at)

        previous["trials"].append({"number": number, "parameters": trial.params, "phase": "Pending"})
        for n in range(1, LONG + 1):
            last = n == LONG
            run = driver.TrialRun(ptj_with("Succeeded" if last else "Running"),
                                  docs_every(every, curve[:n], final=curve[-1] if last else None))
            plan = driver.plan_search(search, previous, {number: run}, may_start=False, every_steps=every)
            previous = driver.summary(search, plan, previous)
            recorded = previous["trials"][number]
            assert len(recorded["history"]) <= MAX_TRIAL_HISTORY and recorded["step"] <= every * n
            if recorded["phase"] != "Running":
                break
        rebuilt_pruned.append(recorded["step"] if recorded["phase"] == "Pruned" else None)
    assert rebuilt_pruned == live_pruned
    assert any(step and step > every * MAX_TRIAL_HISTORY for step in live_pruned), live_pruned  # pruned late too
