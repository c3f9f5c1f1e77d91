"""The Optuna study of a search, rebuilt in memory from the trial records on every pass.

Nothing of Optuna's is persisted: what its samplers and pruners keep on trials (GridSampler's grid
ids, SuccessiveHalvingPruner's rung values) is recomputed here from the records alone, so a rebuilt
study asks and prunes as one driven continuously would.

A record's history is bounded (`kept_history`): every trial keeps its evaluations at the same steps
(all of its first ones, then a few per doubling of the step, and each rung's), and its latest. The
pruners compare trials at those shared steps (`compared_history`), where a rebuilt study decides
exactly as one holding every evaluation would; at other steps no other trial has a value to compare,
so neither pruner stops a trial there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from finetune_operator.api.search import PruningRule, Search, Strategy
from finetune_operator.api.types import MAX_TRIAL_HISTORY
from finetune_operator.search.space import ParamValue, distributions, grid_values

optuna.logging.set_verbosity(logging.WARNING)

RUNNING = "running"
COMPLETE = "complete"
PRUNED = "pruned"
FAILED = "failed"

_STATES = {RUNNING: TrialState.RUNNING, COMPLETE: TrialState.COMPLETE, PRUNED: TrialState.PRUNED,
           FAILED: TrialState.FAIL}


@dataclass
class TrialRecord:
    number: int
    params: dict[str, ParamValue]
    state: str  # running | complete | pruned | failed
    value: float | None = None  # the final metric (complete trials)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, metric), ascending steps


class GridExhausted(ValueError):
    """Every point of the grid is taken by a trial already."""


# ---- samplers and pruners --------------------------------------------------------------------------


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number`: a rebuilt study asks the same, and trials asked from the
    same records (parallel ones) still differ."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _tpe_startup_trials(trials: int) -> int:
    # Optuna's default (10 random trials first) would leave a small search without any model-based trial.
    return max(2, min(10, trials // 3))


def _sampler(search: Search, number: int) -> optuna.samplers.BaseSampler:
    if search.strategy == Strategy.grid.value:
        # The grid's shuffled order comes from the seed: it must be the same for every trial number.
        return optuna.samplers.GridSampler(grid_values(search), seed=search.seed)
    if search.strategy == Strategy.random.value:
        return optuna.samplers.RandomSampler(seed=trial_seed(search.seed, number))
    return optuna.samplers.TPESampler(seed=trial_seed(search.seed, number),
                                      n_startup_trials=_tpe_startup_trials(search.trials))


def _pruner(search: Search) -> optuna.pruners.BasePruner:
    pruning = search.pruning
    if pruning.rule == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruning.startupTrials, n_warmup_steps=pruning.warmupSteps)
    if pruning.rule == "successiveHalving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=pruning.minSteps,
                                                      reduction_factor=pruning.reductionFactor)
    return optuna.pruners.NopPruner()


# ---- what Optuna keeps on trials, recomputed -------------------------------------------------------


def _grid_attrs(sampler: optuna.samplers.GridSampler, params: dict[str, ParamValue]) -> dict:
    """GridSampler's attrs of a trial: its grid id (the index of its point in the sampler's shuffled
    grid) and the search space; none for a point off the grid (a trial of an earlier spec)."""
    # _param_names and _all_grids are GridSampler's internals (pinned Optuna; the grid tests cover them).
    names = sampler._param_names
    if set(params) != set(names):
        return {}
    point = tuple(params[name] for name in names)
    for grid_id, candidate in enumerate(sampler._all_grids):
        if candidate == point:
            return {"search_space": {name: list(values) for name, values in sampler._search_space.items()},
                    "grid_id": grid_id}
    return {}


def _rung_steps(search: Search, last_step: int) -> list[int]:
    pruning = search.pruning
    steps = []
    rung = 0
    while (step := pruning.minSteps * pruning.reductionFactor ** rung) <= last_step:
        steps.append(step)
        rung += 1
    return steps


def _rung_points(search: Search, history: Sequence[tuple[int, float]]) -> set[int]:
    """The steps of the evaluations the rungs are decided at (successive halving): the first at or after
    each rung's step."""
    if search.pruning.rule != PruningRule.successiveHalving.value or not history:
        return set()
    return {next(step for step, _ in history if step >= rung_step) for rung_step in _rung_steps(search, history[-1][0])}


def _rung_attrs(search: Search, history: Sequence[tuple[int, float]]) -> dict[str, float]:
    """SuccessiveHalvingPruner's completed_rung_<r> attrs: the value a trial reported at the first
    evaluation at or after the rung's step (where the pruner, asked after every report, recorded it)."""
    if not history:
        return {}
    out = {}
    for rung, rung_step in enumerate(_rung_steps(search, history[-1][0])):
        out[f"completed_rung_{rung}"] = next(value for step, value in history if step >= rung_step)
    return out


# ---- the history a record keeps ----------------------------------------------------------------------

DENSE_EVALUATIONS = 16  # a trial's first evaluations are all kept: early pruning decides at every one
SIGNIFICANT_BITS = 3  # later, evaluation numbers m * 2**e with m < 8: four per doubling of the step


def on_shared_grid(step: int, every_steps: int) -> bool:
    """Whether every trial keeps its evaluation at `step` (the n-th evaluation, n = step / everySteps):
    n <= 16, or n has at most 3 significant bits (20, 24, 28, 32, 40, 48, 56, 64, 80, ...). A rule of
    the step alone, so trials of any length keep the same steps; the gap between two kept steps is at
    most a quarter of the step."""
    if every_steps <= 0 or step <= 0 or step % every_steps:
        return False
    n = step // every_steps
    return n <= DENSE_EVALUATIONS or n % (1 << max(0, n.bit_length() - SIGNIFICANT_BITS)) == 0


def compared_history(search: Search, every_steps: int, history: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """The evaluations of a history that other trials keep too (the shared grid and the rungs): what the
    pruners compare a trial with."""
    rungs = _rung_points(search, history)
    return [(step, value) for step, value in history if step in rungs or on_shared_grid(step, every_steps)]


def kept_history(search: Search, every_steps: int, history: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """What a trial's record keeps of its history (ascending steps): the compared evaluations and the
    latest. At most MAX_TRIAL_HISTORY: the trainer keeps a trial's latest 1000 evaluations, of which
    fewer than 50 are kept; past the bound the oldest would go."""
    if not history:
        return []
    compared = compared_history(search, every_steps, history)
    kept = compared if compared and compared[-1] == history[-1] else [*compared, history[-1]]
    return list(kept[-MAX_TRIAL_HISTORY:])


# ---- the study -------------------------------------------------------------------------------------


def _fitting_params(params: dict[str, ParamValue], dists: dict[str, BaseDistribution]) -> dict[str, ParamValue]:
    """The record's values that the current space holds, in its types (status keeps 16 as 16.0); a
    value the space no longer holds (the spec changed) is left out rather than refused."""
    out = {}
    for name, value in params.items():
        dist = dists.get(name)
        if dist is None:
            continue
        try:
            internal = dist.to_internal_repr(value)
        except ValueError:  # not one of a categorical's choices
            continue
        if dist._contains(internal):
            out[name] = dist.to_external_repr(internal)
    return out


def _frozen(search: Search, record: TrialRecord, dists: dict[str, BaseDistribution],
            sampler: optuna.samplers.BaseSampler, rung_history: Sequence[tuple[int, float]]) -> FrozenTrial:
    params = _fitting_params(record.params, dists)
    state = _STATES[record.state]
    value = None
    if state == TrialState.COMPLETE:
        value = record.value
        if value is None or not math.isfinite(value):
            state = TrialState.FAIL  # no usable result: Optuna's tell() fails such a trial too
    elif state == TrialState.PRUNED and record.history:
        value = record.history[-1][1]  # as Optuna's tell() values a pruned trial
    if value is not None and not math.isfinite(value):
        value = None
    system_attrs = {}
    if isinstance(sampler, optuna.samplers.GridSampler):
        system_attrs.update(_grid_attrs(sampler, params))
    if search.pruning.rule == "successiveHalving":
        system_attrs.update(_rung_attrs(search, rung_history))
    return create_trial(state=state, value=value, params=params,
                        distributions={name: dists[name] for name in params},
                        intermediate_values=dict(record.history), system_attrs=system_attrs)


def _study(search: Search, records: Sequence[TrialRecord], number: int,
           judged: int | None = None) -> optuna.Study:
    """The study with the records added in number order (Optuna numbers them 0, 1, ... again).
    `judged`: the running trial a pruning decision is for; its rungs are the ones it passed before
    its latest report (the pruner decides the latest one)."""
    dists = distributions(search)
    sampler = _sampler(search, number)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=sampler,
                                pruner=_pruner(search), direction=search.direction)
    for record in sorted(records, key=lambda r: r.number):
        rung_history = record.history[:-1] if record.number == judged else record.history
        study.add_trial(_frozen(search, record, dists, sampler, rung_history))
    return study


def build_study(search: Search, records: Sequence[TrialRecord]) -> optuna.Study:
    """An in-memory study holding the records, its sampler seeded for the next trial (len(records))."""
    return _study(search, records, len(records))


def _check_numbers(records: Sequence[TrialRecord], number: int) -> None:
    numbers = sorted(r.number for r in records)
    if numbers != list(range(number)):
        raise ValueError(f"asking for trial {number} needs the records of trials 0..{number - 1}, "
                         f"got {numbers}")


def ask(search: Search, records: Sequence[TrialRecord], number: int) -> dict[str, ParamValue]:
    """The values of trial `number`, given the records of every trial before it (running ones too).
    The same spec, seed and records give the same values; the grid never repeats a point (raises
    GridExhausted when no point is left: plan with planned_trials)."""
    _check_numbers(records, number)
    study = _study(search, records, number)
    if isinstance(study.sampler, optuna.samplers.GridSampler):
        return _grid_point(search, study, records)
    return study.ask(distributions(search)).params


def _grid_point(search: Search, study: optuna.Study, records: Sequence[TrialRecord]) -> dict[str, ParamValue]:
    """GridSampler's point for the next trial, or -- when a trial holds that point already (records of
    an earlier grid order) -- the first free point in the grid's order."""
    sampler = study.sampler
    dists = distributions(search)
    taken = {_grid_attrs(sampler, _fitting_params(r.params, dists)).get("grid_id") for r in records}
    free = [grid_id for grid_id in range(len(sampler._all_grids)) if grid_id not in taken]
    if not free:
        raise GridExhausted(f"every one of the {len(sampler._all_grids)} grid points has a trial")
    asked = study.ask(dists).params
    if _grid_attrs(sampler, asked)["grid_id"] in taken:
        return dict(zip(sampler._param_names, sampler._all_grids[free[0]]))
    return asked


def should_prune(search: Search, records: Sequence[TrialRecord], number: int) -> bool:
    """Whether the pruning rule stops running trial `number` (one of the records) at its latest
    evaluation, judged against the other trials' records (give the judged one every evaluation it
    reported and the others their `compared_history`)."""
    record = next((r for r in records if r.number == number), None)
    if record is None or record.state != RUNNING or not record.history:
        return False
    study = _study(search, records, number, judged=number)
    index = sorted(r.number for r in records).index(number)
    trial = study.get_trials(deepcopy=False)[index]
    return bool(study.pruner.prune(study, trial))


def best(search: Search, records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The complete trial with the best value for the search's direction (ties: the lowest number)."""
    finished = [r for r in records if r.state == COMPLETE and r.value is not None and math.isfinite(r.value)]
    if not finished:
        return None
    sign = 1 if search.direction == "minimize" else -1
    return min(finished, key=lambda r: (sign * r.value, r.number))
