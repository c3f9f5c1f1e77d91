"""The search space of spec.search: which spec field each parameter sets, its Optuna distribution,
the spec of one trial, and the problems of a search spec (each naming its field)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import ValidationError

from finetune_operator.api.search import ParameterRange, Search, Strategy
from finetune_operator.api.types import EPOCHS_WITH_MAX_STEPS, FineTuneJobSpec
from finetune_operator.problems import Problem

ParamValue = float | int

LORA_METHODS = ("lora", "qlora", "dora")
VIRTUAL_TOKEN_METHODS = ("prefix", "prompt")


@dataclass(frozen=True)
class ParameterSpec:
    path: tuple[str, ...]  # where the value goes in FineTuneJobSpec
    integer: bool
    methods: tuple[str, ...] = ()  # the method types the field applies to; empty: every one

    @property
    def field(self) -> str:
        return "spec." + ".".join(self.path)


PARAMETERS: dict[str, ParameterSpec] = {
    "learningRate": ParameterSpec(("hyperparameters", "learningRate"), integer=False),
    "epochs": ParameterSpec(("hyperparameters", "epochs"), integer=True),
    "maxSteps": ParameterSpec(("hyperparameters", "maxSteps"), integer=True),
    "batchSize": ParameterSpec(("hyperparameters", "batchSize"), integer=True),
    "gradientAccumulationSteps": ParameterSpec(("hyperparameters", "gradientAccumulationSteps"), integer=True),
    "warmupRatio": ParameterSpec(("hyperparameters", "warmupRatio"), integer=False),
    "weightDecay": ParameterSpec(("hyperparameters", "weightDecay"), integer=False),
    "loraRank": ParameterSpec(("method", "lora", "rank"), integer=True, methods=LORA_METHODS),
    "loraAlpha": ParameterSpec(("method", "lora", "alpha"), integer=False, methods=LORA_METHODS),
    "loraDropout": ParameterSpec(("method", "lora", "dropout"), integer=False, methods=LORA_METHODS),
    "virtualTokens": ParameterSpec(("method", "virtualTokens"), integer=True, methods=VIRTUAL_TOKEN_METHODS),
}


def ranges(search: Search) -> dict[str, ParameterRange]:
    """The parameters the search varies, by name."""
    return {name: getattr(search.parameters, name) for name in PARAMETERS
            if getattr(search.parameters, name) is not None}


def _typed(name: str, value: float) -> ParamValue:
    return int(value) if PARAMETERS[name].integer else float(value)


def _distinct(values: list[ParamValue]) -> list[ParamValue]:
    return list(dict.fromkeys(values))


def grid_values(search: Search) -> dict[str, list[ParamValue]]:
    """Every parameter's values (distinct, in the order written) -- the grid's axes. Ranges have none."""
    return {name: _distinct([_typed(name, v) for v in r.values])
            for name, r in ranges(search).items() if r.values is not None}


def distributions(search: Search) -> dict[str, BaseDistribution]:
    """The Optuna distribution of every parameter of a valid search (see `problems`)."""
    out: dict[str, BaseDistribution] = {}
    axes = grid_values(search)
    for name, r in ranges(search).items():
        log = r.scale == "log"
        if name in axes:
            out[name] = CategoricalDistribution(axes[name])
        elif PARAMETERS[name].integer:
            out[name] = IntDistribution(int(r.min), int(r.max), log=log)
        else:
            out[name] = FloatDistribution(r.min, r.max, log=log)
    return out


def planned_trials(search: Search) -> int:
    """search.trials, or the grid's size when the grid has fewer points."""
    if search.strategy != Strategy.grid.value:
        return search.trials
    return min(search.trials, math.prod(len(values) for values in grid_values(search).values()))


def trial_spec(spec: FineTuneJobSpec, params: dict[str, ParamValue]) -> FineTuneJobSpec:
    """The spec with the trial's values in place (method.lora with its defaults when absent), validated
    by the models: raises pydantic.ValidationError for a value the field does not accept."""
    document = spec.model_dump(mode="json", exclude_none=True)
    for name, value in params.items():
        *parents, leaf = PARAMETERS[name].path
        node = document
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = _typed(name, value)
    return FineTuneJobSpec.model_validate(document)


# ---- problems ------------------------------------------------------------------------------------


def _problem(name: str, message: str) -> Problem:
    return Problem("InvalidSpec", f"spec.search.parameters.{name}: {message}")


def _range_problems(name: str, r: ParameterRange) -> list[Problem]:
    """The ParameterRange rules of the CRD (CEL), again: a spec stored without them must not reach Optuna."""
    if (r.values is None) == (r.min is None and r.max is None):
        return [_problem(name, "set either values or a range (min and max), not both")]
    if r.values is not None:
        if r.scale != "linear":
            return [_problem(name, "scale applies to ranges only, not to values")]
        return []
    if r.min is None or r.max is None:
        return [_problem(name, "a range needs both min and max")]
    if not r.min < r.max:
        return [_problem(name, f"a range needs min < max, got min {r.min} and max {r.max}")]
    if r.scale == "log" and r.min <= 0:
        return [_problem(name, f"a log-scale range needs min > 0, got {r.min}")]
    return []


def _ends(r: ParameterRange) -> list[float]:
    return list(r.values) if r.values is not None else [r.min, r.max]


def _value_problems(spec: FineTuneJobSpec, name: str, r: ParameterRange) -> list[Problem]:
    """Every value (or both range ends) must be one the target field accepts: the field's own model
    decides, so its bounds live in one place."""
    target = PARAMETERS[name]
    out = []
    for value in _ends(r):
        if not math.isfinite(value):
            out.append(_problem(name, f"{value} is not a finite number"))
            continue
        if target.integer and not float(value).is_integer():
            out.append(_problem(name, f"{target.field} is an integer, got {value}"))
            continue
        try:
            trial_spec(spec, {name: value})
        except ValidationError as exc:
            reasons = "; ".join(e["msg"] for e in exc.errors())
            out.append(_problem(name, f"{_typed(name, value)} is not allowed for {target.field}: {reasons}"))
    return out


def _method_problems(spec: FineTuneJobSpec, name: str) -> list[Problem]:
    methods = PARAMETERS[name].methods
    if methods and spec.method.type not in methods:
        return [_problem(name, f"needs spec.method.type {', '.join(methods[:-1])} or {methods[-1]}, "
                               f"got {spec.method.type}")]
    return []


def _parameter_problems(spec: FineTuneJobSpec, search: Search) -> list[Problem]:
    out = []
    for name, r in ranges(search).items():
        if found := _range_problems(name, r) + _method_problems(spec, name):
            out += found
            continue
        out += _value_problems(spec, name, r)
        if search.strategy == Strategy.grid.value and r.values is None:
            out.append(_problem(name, "the grid strategy needs values (a list), not a range"))
    return out


def _epochs_problems(spec: FineTuneJobSpec, search: Search) -> list[Problem]:
    """Epochs searched while the job's maxSteps decides the length: every trial would train the same."""
    if search.parameters.epochs is not None and spec.hyperparameters.maxSteps > 0:
        return [Problem("InvalidSpec", EPOCHS_WITH_MAX_STEPS)]
    return []


def _search_problems(spec: FineTuneJobSpec, search: Search) -> list[Problem]:
    out = _epochs_problems(spec, search)
    varied = ranges(search)
    if not varied:
        out.append(Problem("InvalidSpec", "spec.search.parameters: vary at least one hyperparameter"))
    if "epochs" in varied and "maxSteps" in varied:
        out.append(Problem("InvalidSpec", "spec.search.parameters: vary epochs or maxSteps, not both"))
    if search.parallelism > search.trials:
        out.append(Problem("InvalidSpec", f"spec.search.parallelism: {search.parallelism} must not exceed "
                                          f"spec.search.trials ({search.trials})"))
    if search.pruning.rule != "none" and spec.evaluation.everySteps <= 0:
        out.append(Problem("InvalidSpec", f"spec.search.pruning.rule: {search.pruning.rule} needs "
                                          "spec.evaluation.everySteps > 0 (the validation loss it prunes on), "
                                          "or rule none"))
    if spec.stages:
        out.append(Problem("InvalidSpec", "spec.search: cannot be combined with spec.stages (a search tunes one "
                                          "training run; search a stage as a job of its own)"))
    return out


def problems(spec: FineTuneJobSpec) -> list[Problem]:
    """What makes spec.search unusable, each message naming its field; empty for a valid search (or none)."""
    if spec.search is None:
        return []
    return _search_problems(spec, spec.search) + _parameter_problems(spec, spec.search)

