"""The search's Optuna study, rebuilt from trial records: what it asks, what it prunes, which trial is best."""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import optuna
import pytest

from finetune_operator.api.search import Search
from finetune_operator.api.types import MAX_TRIAL_HISTORY
from finetune_trainer.config import MAX_EVAL_HISTORY
from finetune_operator.search import space
from finetune_operator.search.study import (
    COMPLETE,
    FAILED,
    PRUNED,
    RUNNING,
    GridExhausted,
    TrialRecord,
    ask,
    best,
    build_study,
    compared_history,
    kept_history,
    should_prune,
    trial_seed,
)

LOG_LR = {"min": 1.0e-5, "max": 1.0e-2, "scale": "log"}
MIXED = {"learningRate": LOG_LR, "loraRank": {"values": [8, 16, 32]}, "batchSize": {"min": 4, "max": 64}}
GRID = {"loraRank": {"values": [4, 8, 16]}, "batchSize": {"values": [8, 16]}}
STRATEGIES = ["grid", "random", "tpe"]


def make_search(strategy: str = "tpe", *, seed: int = 0, trials: int = 6, parameters: dict | None = None,
                **fields: Any) -> Search:
    if parameters is None:
        parameters = GRID if strategy == "grid" else MIXED
    return Search.model_validate({"parameters": parameters, "strategy": strategy, "seed": seed,
                                  "trials": trials, **fields})


def as_status(params: dict[str, Any]) -> dict[str, float]:
    """The values as the FineTuneJob status keeps them (floats)."""
    return {name: float(value) for name, value in params.items()}


def objective(params: dict[str, Any]) -> float:
    """A made-up validation loss, best near learningRate 3e-4 and rank 16."""
    loss = 1.0 + abs(params.get("loraRank", 16) - 16) / 16 + params.get("batchSize", 8) / 100
    if "learningRate" in params:
        loss += (math.log10(params["learningRate"]) + 3.5) ** 2
    return loss


def drive(search: Search, trials: int) -> list[dict[str, Any]]:
    """Trials one after the other, the study rebuilt from the records for every ask."""
    records: list[TrialRecord] = []
    for number in range(trials):
        params = ask(search, records, number)
        records.append(TrialRecord(number, as_status(params), COMPLETE, value=objective(params),
                                   history=[(10, objective(params))]))
    return [r.params for r in records]


# ---- ask -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_seed_same_trials(strategy):
    assert drive(make_search(strategy, seed=7), 6) == drive(make_search(strategy, seed=7), 6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_other_seed_other_trials(strategy):
    assert drive(make_search(strategy, seed=7), 6) != drive(make_search(strategy, seed=8), 6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_asking_twice_gives_the_same(strategy):
    search = make_search(strategy, seed=3)
    first, second = drive(search, 2)
    records = [TrialRecord(0, first, COMPLETE, value=1.2, history=[(10, 1.5), (20, 1.2)]),
               TrialRecord(1, second, FAILED)]
    records.append(TrialRecord(2, as_status(ask(search, records, 2)), RUNNING, history=[(10, 1.4)]))
    assert ask(search, records, 3) == ask(search, records, 3)


@pytest.mark.parametrize("strategy", ["random", "tpe"])
def test_parallel_asks_differ(strategy):
    search = make_search(strategy, seed=5)
    finished = [TrialRecord(n, as_status(p), COMPLETE, value=objective(p))
                for n, p in enumerate(drive(search, 3))]
    third = ask(search, finished, 3)
    fourth = ask(search, finished + [TrialRecord(3, as_status(third), RUNNING)], 4)
    assert third != fourth


def test_per_trial_seeds_differ_and_repeat():
    assert trial_seed(0, 1) == trial_seed(0, 1)
    assert len({trial_seed(seed, number) for seed in range(3) for number in range(10)}) == 30


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rebuilt_study_asks_what_a_continuously_driven_one_does(strategy):
    search = make_search(strategy, seed=11)
    distributions = space.distributions(search)
    live = build_study(search, [])
    asked = []
    for number in range(6):
        if strategy == "random":  # the grid sampler keeps one seed; the others are seeded per trial
            live.sampler = optuna.samplers.RandomSampler(seed=trial_seed(search.seed, number))
        if strategy == "tpe":  # (2 random trials first: a third of the 6 trials)
            live.sampler = optuna.samplers.TPESampler(seed=trial_seed(search.seed, number), n_startup_trials=2)
        trial = live.ask(distributions)
        asked.append(as_status(trial.params))
        if number < 5:  # telling the grid's last point calls study.stop(), refused outside optimize()
            live.tell(trial, objective(trial.params))
    assert drive(search, 6) == asked


@pytest.mark.parametrize("parameters", [
    {"loraRank": {"values": [8]}},
    GRID,
    {"loraRank": {"values": [4, 8]}, "batchSize": {"values": [8, 16]}, "warmupRatio": {"values": [0.0, 0.1]}},
    {"learningRate": {"values": [1.0e-4, 3.0e-4, 1.0e-3]}, "loraRank": {"values": [8, 8, 16]}},
], ids=["one point", "3x2", "2x2x2", "duplicate values"])
@pytest.mark.parametrize("seed", [0, 42])
def test_grid_covers_every_point_once_across_parallel_asks(parameters, seed):
    search = make_search("grid", seed=seed, trials=20, parameters=parameters)
    records: list[TrialRecord] = []
    for number in range(space.planned_trials(search)):  # all running at once: none finished
        records.append(TrialRecord(number, as_status(ask(search, records, number)), RUNNING))
    points = {tuple(sorted(r.params.items())) for r in records}
    axes = space.grid_values(search)
    expected = {tuple(sorted(zip(axes, map(float, point)))) for point in itertools.product(*axes.values())}
    assert len(records) == len(points) and points == expected
    with pytest.raises(GridExhausted):
        ask(search, records, len(records))


def test_grid_skips_points_of_finished_trials_of_every_kind():
    search = make_search("grid", seed=1)
    states = [COMPLETE, FAILED, PRUNED, RUNNING, COMPLETE, FAILED]
    records: list[TrialRecord] = []
    for number, state in enumerate(states):
        params = ask(search, records, number)
        records.append(TrialRecord(number, as_status(params), state, value=1.0 if state == COMPLETE else None,
                                   history=[(10, 1.0)] if state != FAILED else []))
    assert len({tuple(sorted(r.params.items())) for r in records}) == len(states)


def test_grid_of_another_order_is_not_repeated():
    """Records of an earlier grid order (the seed was changed mid-search) still hold their points."""
    earlier = make_search("grid", seed=1)
    records = [TrialRecord(n, as_status(p), COMPLETE, value=1.0) for n, p in enumerate(drive(earlier, 3))]
    later = make_search("grid", seed=2)
    for number in range(3, 6):
        records.append(TrialRecord(number, as_status(ask(later, records, number)), RUNNING))
    assert len({tuple(sorted(r.params.items())) for r in records}) == 6


def test_ask_needs_the_records_of_every_earlier_trial():
    search = make_search("random")
    with pytest.raises(ValueError, match="trials 0..2"):
        ask(search, [TrialRecord(0, {}, COMPLETE, value=1.0), TrialRecord(2, {}, COMPLETE, value=1.0)], 3)


def test_asked_values_have_their_fields_types():
    params = ask(make_search("random", parameters=MIXED), [], 0)
    assert type(params["learningRate"]) is float
    assert type(params["loraRank"]) is int and params["loraRank"] in (8, 16, 32)
    assert type(params["batchSize"]) is int and 4 <= params["batchSize"] <= 64


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("rule", ["none", "median", "successiveHalving"])
def test_no_warnings(strategy, rule):
    search = make_search(strategy, trials=8, pruning={"rule": rule, "minSteps": 10})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = [TrialRecord(n, as_status(p), COMPLETE, value=objective(p), history=[(10, 1.0), (20, 0.9)])
                   for n, p in enumerate(drive(search, 4))]
        records.append(TrialRecord(4, as_status(ask(search, records, 4)), RUNNING, history=[(10, 1.1)]))
        should_prune(search, records, 4)


# ---- pruning ---------------------------------------------------------------------------------------

LR = {"learningRate": 1.0e-3}
# Three finished trials: the median is 1.0 at step 10 and 0.8 at step 20.
FINISHED = [
    TrialRecord(0, LR, COMPLETE, value=0.8, history=[(10, 1.0), (20, 0.8)]),
    TrialRecord(1, LR, COMPLETE, value=1.0, history=[(10, 1.2), (20, 1.0)]),
    TrialRecord(2, LR, COMPLETE, value=0.7, history=[(10, 0.9), (20, 0.7)]),
]
NOT_FINISHED = [
    TrialRecord(0, LR, PRUNED, history=[(10, 1.0)]),
    TrialRecord(1, LR, FAILED),
    TrialRecord(2, LR, RUNNING, history=[(10, 0.9)]),
]

PRUNING = [
    # name, pruning, direction, the others, the judged trial's history, pruned
    ("median: worse than the median", {"rule": "median"}, "minimize", FINISHED, [(10, 1.5)], True),
    ("median: better than the median", {"rule": "median"}, "minimize", FINISHED, [(10, 0.95)], False),
    ("median: its best value counts", {"rule": "median"}, "minimize", FINISHED, [(10, 0.5), (20, 0.9)], False),
    ("median: worse later", {"rule": "median"}, "minimize", FINISHED, [(10, 0.95), (20, 0.85)], True),
    ("median: in warmup", {"rule": "median", "warmupSteps": 20}, "minimize", FINISHED, [(10, 1.5)], False),
    ("median: after warmup", {"rule": "median", "warmupSteps": 20}, "minimize", FINISHED, [(10, 1.5), (20, 1.5)],
     True),
    ("median: too few finished trials", {"rule": "median", "startupTrials": 4}, "minimize", FINISHED, [(10, 1.5)],
     False),
    ("median: enough finished trials", {"rule": "median", "startupTrials": 3}, "minimize", FINISHED, [(10, 1.5)],
     True),
    ("median: only finished trials count", {"rule": "median", "startupTrials": 0}, "minimize", NOT_FINISHED,
     [(10, 1.5)], False),
    ("median: maximize", {"rule": "median"}, "maximize", FINISHED, [(10, 1.5)], False),
    ("median: maximize, worse", {"rule": "median"}, "maximize", FINISHED, [(10, 0.5)], True),
    ("none", {"rule": "none"}, "minimize", FINISHED, [(10, 100.0)], False),
    # successive halving with rungs at steps 10, 20, 40; the others' rung values: 1.0, 1.2, 0.9 and 0.8, 1.0, 0.7
    ("halving: before the first rung", {"rule": "successiveHalving", "minSteps": 10, "reductionFactor": 2},
     "minimize", FINISHED, [(5, 5.0)], False),
    ("halving: not in the best half at rung 0", {"rule": "successiveHalving", "minSteps": 10, "reductionFactor": 2},
     "minimize", FINISHED, [(10, 1.1)], True),
    ("halving: in the best half at rung 0", {"rule": "successiveHalving", "minSteps": 10, "reductionFactor": 2},
     "minimize", FINISHED, [(10, 0.95)], False),
    ("halving: not in the best half at rung 1", {"rule": "successiveHalving", "minSteps": 10, "reductionFactor": 2},
     "minimize", FINISHED, [(10, 0.95), (20, 2.0)], True),
    ("halving: in the best half at rung 1", {"rule": "successiveHalving", "minSteps": 10, "reductionFactor": 2},
     "minimize", FINISHED, [(10, 0.95), (20, 0.75)], False),
    ("halving: a passed rung is not judged again", {"rule": "successiveHalving", "minSteps": 10,
                                                    "reductionFactor": 2},
     "minimize", FINISHED, [(10, 1.5), (20, 0.6)], False),
    ("halving: maximize", {"rule": "successiveHalving", "minSteps": 10, "reductionFactor": 2},
     "maximize", FINISHED, [(10, 1.1)], False),
]


@pytest.mark.parametrize("pruning, direction, others, history, pruned", [c[1:] for c in PRUNING],
                         ids=[c[0] for c in PRUNING])
def test_pruning_decision(pruning, direction, others, history, pruned):
    search = make_search("random", parameters={"learningRate": LOG_LR}, pruning=pruning, direction=direction)
    judged = TrialRecord(3, LR, RUNNING, history=history)
    assert should_prune(search, [*others, judged], 3) is pruned


@pytest.mark.parametrize("state, history", [(RUNNING, []), (COMPLETE, [(10, 9.0)]), (PRUNED, [(10, 9.0)])])
def test_only_a_running_trial_with_a_history_is_pruned(state, history):
    search = make_search("random", parameters={"learningRate": LOG_LR}, pruning={"rule": "median"})
    judged = TrialRecord(3, LR, state, value=9.0 if state == COMPLETE else None, history=history)
    assert should_prune(search, [*FINISHED, judged], 3) is False


CURVES = [  # validation loss every 10 steps of trials run one after the other
    [1.0, 0.8, 0.7, 0.65, 0.6, 0.58, 0.57, 0.56, 0.55],
    [1.1, 0.9, 0.85, 0.8, 0.78, 0.75, 0.74, 0.73, 0.72],
    [0.9, 0.7, 0.6, 0.55, 0.5, 0.48, 0.47, 0.46, 0.45],
    [1.3, 1.2, 1.1, 1.0, 0.95, 0.9, 0.88, 0.87, 0.86],
    [0.95, 0.75, 0.62, 0.57, 0.52, 0.49, 0.48, 0.47, 0.46],
    [1.05, 0.85, 0.64, 0.52, 0.47, 0.44, 0.43, 0.42, 0.41],
    [0.98, 0.79, 0.69, 0.66, 0.64, 0.62, 0.61, 0.6, 0.59],
]


@pytest.mark.parametrize("pruning", [
    {"rule": "median", "startupTrials": 1, "warmupSteps": 20},
    {"rule": "successiveHalving", "minSteps": 10, "reductionFactor": 2},
    {"rule": "successiveHalving", "minSteps": 20, "reductionFactor": 3},
], ids=["median", "halving by 2", "halving by 3"])
def test_pruning_from_records_decides_as_a_continuously_driven_study(pruning):
    search = make_search("random", parameters={"learningRate": LOG_LR}, pruning=pruning)
    live = build_study(search, [])
    records: list[TrialRecord] = []
    live_decisions, rebuilt_decisions = [], []
    for number, curve in enumerate(CURVES):
        trial = live.ask({"learningRate": space.distributions(search)["learningRate"]})
        record = TrialRecord(number, as_status(trial.params), RUNNING)
        records.append(record)
        for step, loss in zip(itertools.count(10, 10), curve):
            trial.report(loss, step)
            record.history.append((step, loss))
            live_decisions.append(trial.should_prune())
            rebuilt_decisions.append(should_prune(search, records, number))
            if live_decisions[-1]:
                live.tell(trial, state=optuna.trial.TrialState.PRUNED)
                record.state = PRUNED
                break
        else:
            live.tell(trial, curve[-1])
            record.state, record.value = COMPLETE, curve[-1]
    assert rebuilt_decisions == live_decisions
    assert any(live_decisions)  # the curves do prune something


# ---- best ------------------------------------------------------------------------------------------

RECORDS = [
    TrialRecord(0, LR, COMPLETE, value=0.9),
    TrialRecord(1, LR, PRUNED, history=[(10, 0.1)]),
    TrialRecord(2, LR, COMPLETE, value=0.7),
    TrialRecord(3, LR, FAILED),
    TrialRecord(4, LR, COMPLETE, value=0.7),
    TrialRecord(5, LR, RUNNING, history=[(10, 0.05)]),
    TrialRecord(6, LR, COMPLETE, value=1.4),
    TrialRecord(7, LR, COMPLETE, value=float("nan")),
]

BEST = [
    # direction, records, best number (None: no trial)
    ("minimize", RECORDS, 2),  # 2 and 4 tie: the lower number
    ("maximize", RECORDS, 6),
    ("minimize", [r for r in RECORDS if r.state != COMPLETE], None),
    ("maximize", [], None),
]


@pytest.mark.parametrize("direction, records, number", BEST)
def test_best(direction, records, number):
    found = best(make_search("random", direction=direction), records)
    assert (found.number if found else None) == number


# ---- the history a record keeps ----------------------------------------------------------------------

HALVING = {"rule": "successiveHalving", "minSteps": 25, "reductionFactor": 3}
KEPT = [
    # name, pruning, everySteps, evaluation steps reported, the steps kept
    ("short: all", {"rule": "median"}, 10, range(10, 170, 10), list(range(10, 170, 10))),
    ("long: the first 16, then four per doubling, and the latest", {"rule": "median"}, 10, range(10, 1010, 10),
     [*range(10, 170, 10), 200, 240, 280, 320, 400, 480, 560, 640, 800, 960, 1000]),
    ("another everySteps: the same evaluations", {"rule": "median"}, 3, range(3, 303, 3),
     [*range(3, 51, 3), 60, 72, 84, 96, 120, 144, 168, 192, 240, 288, 300]),
    ("successive halving: each rung's first evaluation too", HALVING, 10, range(10, 1010, 10),
     [*range(10, 170, 10), 200, 230, 240, 280, 320, 400, 480, 560, 640, 680, 800, 960, 1000]),
    ("an evaluation off the schedule (another everySteps): only as the latest", {"rule": "median"}, 10,
     [10, 20, 25], [10, 20, 25]),
]


@pytest.mark.parametrize("pruning, every, steps, kept", [c[1:] for c in KEPT], ids=[c[0] for c in KEPT])
def test_kept_history(pruning, every, steps, kept):
    search = make_search("random", pruning=pruning)
    history = [(step, 1.0 / step) for step in steps]
    assert [step for step, _ in kept_history(search, every, history)] == kept
    assert kept_history(search, every, history)[-1] == history[-1]


@pytest.mark.parametrize("pruning", [{"rule": "median"}, HALVING, {"rule": "successiveHalving", "minSteps": 7,
                                                                    "reductionFactor": 2}])
def test_trials_of_any_length_keep_the_same_steps(pruning):
    search = make_search("random", pruning=pruning)
    full = [(step, 1.0) for step in range(5, 5 * 700, 5)]
    compared = [{step for step, _ in compared_history(search, 5, full[:length])} for length in (20, 90, 333, 699)]
    for shorter, longer in itertools.pairwise(compared):
        assert shorter == {step for step in longer if step <= max(shorter)}


@pytest.mark.parametrize("every, first, pruning", [
    (1, 1, {"rule": "successiveHalving", "minSteps": 1, "reductionFactor": 3}),
    (10, 1, {"rule": "successiveHalving", "minSteps": 150, "reductionFactor": 2}),
    (7, 1, {"rule": "median"}),
    (5, 2001, {"rule": "successiveHalving", "minSteps": 33, "reductionFactor": 2}),
])
def test_a_kept_history_fits_the_status_whatever_the_trainer_reports(every, first, pruning):
    """The trainer keeps a trial's latest MAX_EVAL_HISTORY evaluations; the status fewer than 50 of them."""
    search = make_search("random", pruning=pruning)
    history = [(every * n, 1.0) for n in range(first, first + MAX_EVAL_HISTORY)]
    assert len(kept_history(search, every, history)) < 50 <= MAX_TRIAL_HISTORY
