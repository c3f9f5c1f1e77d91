"""The search space: which field each parameter sets, its distribution, the trial spec, and the
problems of a search spec (each naming its field)."""

from __future__ import annotations

from typing import Any

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from finetune_operator.api.search import Search, SearchParameters
from finetune_operator.api.types import FineTuneJobSpec, parse_spec
from finetune_operator.search import space
from op_testdata import job, minimal_spec

LOG_LR = {"min": 1.0e-5, "max": 1.0e-2, "scale": "log"}


def job_spec(search: dict[str, Any], **overrides: Any) -> FineTuneJobSpec:
    """A stored FineTuneJob spec with this search, evaluating every 10 steps (so pruning may run)."""
    return parse_spec(job(minimal_spec(**{"evaluation": {"everySteps": 10}, "search": search, **overrides}))["spec"])


def search(**parameters: dict[str, Any]) -> dict[str, Any]:
    return {"parameters": parameters}


def at(spec: FineTuneJobSpec, path: tuple[str, ...]) -> Any:
    node: Any = spec
    for key in path:
        node = getattr(node, key)
    return node


# ---- PARAMETERS ----------------------------------------------------------------------------------


def test_every_search_parameter_has_a_target_field():
    assert set(space.PARAMETERS) == set(SearchParameters.model_fields)


@pytest.mark.parametrize("name", sorted(space.PARAMETERS))
def test_parameter_sets_its_field_with_the_fields_type(name):
    target = space.PARAMETERS[name]
    method = {"type": target.methods[0]} if target.methods else {"type": "lora"}
    wanted = 1 if target.integer else 0.5  # a value every field of the kind accepts
    spec = job_spec(search(**{name: {"values": [wanted]}}), method=method)
    value = at(space.trial_spec(spec, {name: wanted}), target.path)
    assert value == wanted
    assert type(value) is (int if target.integer else float)


# ---- distributions ---------------------------------------------------------------------------------

DISTRIBUTIONS = [
    # parameter, its range, the distribution
    ("learningRate", LOG_LR, FloatDistribution(1.0e-5, 1.0e-2, log=True)),
    ("warmupRatio", {"min": 0.0, "max": 0.2}, FloatDistribution(0.0, 0.2)),
    ("batchSize", {"min": 4, "max": 64, "scale": "log"}, IntDistribution(4, 64, log=True)),
    ("maxSteps", {"min": 100, "max": 1000}, IntDistribution(100, 1000)),
    ("loraRank", {"values": [8, 16, 16.0, 32]}, CategoricalDistribution([8, 16, 32])),
    ("weightDecay", {"values": [0, 0.01]}, CategoricalDistribution([0.0, 0.01])),
]


@pytest.mark.parametrize("name, values, expected", DISTRIBUTIONS, ids=[c[0] for c in DISTRIBUTIONS])
def test_distribution_of_a_parameter(name, values, expected):
    distribution = space.distributions(Search.model_validate(search(**{name: values})))[name]
    assert distribution == expected
    if isinstance(expected, CategoricalDistribution):
        integer = space.PARAMETERS[name].integer
        assert all(type(choice) is (int if integer else float) for choice in distribution.choices)


def test_distributions_cover_exactly_the_varied_parameters():
    varied = Search.model_validate(search(learningRate=LOG_LR, loraRank={"values": [8, 16]}))
    assert set(space.distributions(varied)) == {"learningRate", "loraRank"}


# ---- planned trials --------------------------------------------------------------------------------

PLANNED = [
    # strategy, trials, parameters, planned
    ("random", 8, {"learningRate": LOG_LR}, 8),
    ("tpe", 20, {"loraRank": {"values": [8, 16]}}, 20),
    ("grid", 10, {"loraRank": {"values": [8, 16]}, "batchSize": {"values": [4, 8, 16]}}, 6),
    ("grid", 4, {"loraRank": {"values": [8, 16]}, "batchSize": {"values": [4, 8, 16]}}, 4),
    ("grid", 10, {"loraRank": {"values": [8, 8, 16]}}, 2),
]


@pytest.mark.parametrize("strategy, trials, parameters, planned", PLANNED)
def test_planned_trials(strategy, trials, parameters, planned):
    assert space.planned_trials(Search.model_validate(
        {"parameters": parameters, "strategy": strategy, "trials": trials})) == planned


# ---- trial spec ------------------------------------------------------------------------------------

TRIAL_SPECS = [
    # method of the job, trial values, expected values by path
    ({"type": "lora"}, {"learningRate": 3.0e-4, "batchSize": 16},
     {("hyperparameters", "learningRate"): 3.0e-4, ("hyperparameters", "batchSize"): 16}),
    ({"type": "lora"}, {"loraRank": 8},  # no method.lora: created with its defaults
     {("method", "lora", "rank"): 8, ("method", "lora", "alpha"): 32, ("method", "lora", "dropout"): 0.05}),
    ({"type": "dora", "lora": {"rank": 4, "alpha": 8, "targetModules": ["q_proj"]}}, {"loraAlpha": 16.0},
     {("method", "lora", "rank"): 4, ("method", "lora", "alpha"): 16.0, ("method", "lora", "targetModules"): ["q_proj"]}),
    ({"type": "prefix"}, {"virtualTokens": 30.0}, {("method", "virtualTokens"): 30}),
]


@pytest.mark.parametrize("method, params, expected", TRIAL_SPECS)
def test_trial_spec_puts_the_values_in_place(method, params, expected):
    spec = job_spec(search(**{name: {"values": [value]} for name, value in params.items()}), method=method)
    trial = space.trial_spec(spec, params)
    assert {path: at(trial, path) for path in expected} == expected


def test_trial_spec_leaves_everything_else_unchanged():
    spec = job_spec(search(learningRate=LOG_LR), hyperparameters={"epochs": 3, "seed": 7})
    trial = space.trial_spec(spec, {"learningRate": 5.0e-4})
    changed = trial.model_dump()
    changed["hyperparameters"]["learningRate"] = spec.hyperparameters.learningRate
    assert changed == spec.model_dump()
    assert spec.hyperparameters.learningRate == 2.0e-4  # the job's own spec is not touched


# ---- problems --------------------------------------------------------------------------------------

PROBLEMS = [
    # name, search, other spec fields, the fields the problems name (in order), a phrase of the first
    ("log learning rate", search(learningRate=LOG_LR), {}, [], ""),
    ("lora values", search(loraRank={"values": [8, 16]}, loraDropout={"min": 0.0, "max": 0.2}), {}, [], ""),
    ("virtual tokens on prefix", search(virtualTokens={"min": 8, "max": 64}), {"method": {"type": "prefix"}}, [], ""),
    ("grid of values", {**search(loraRank={"values": [8, 16]}, batchSize={"values": [4, 8]}), "strategy": "grid"},
     {}, [], ""),
    ("no pruning, no periodic evaluation", {**search(learningRate=LOG_LR), "pruning": {"rule": "none"}},
     {"evaluation": {"everySteps": 0}}, [], ""),
    ("learning rate above 1", search(learningRate={"min": 0.1, "max": 2.0}), {},
     ["spec.search.parameters.learningRate"], "spec.hyperparameters.learningRate"),
    ("learning rate of 0", search(learningRate={"values": [0, 1.0e-4]}), {},
     ["spec.search.parameters.learningRate"], "0.0 is not allowed"),
    ("fractional rank", search(loraRank={"values": [8, 8.5]}), {},
     ["spec.search.parameters.loraRank"], "integer, got 8.5"),
    ("fractional range end", search(batchSize={"min": 1.5, "max": 8}), {},
     ["spec.search.parameters.batchSize"], "integer, got 1.5"),
    ("rank 0", search(loraRank={"values": [0, 8]}), {}, ["spec.search.parameters.loraRank"], "spec.method.lora.rank"),
    ("dropout of 1", search(loraDropout={"min": 0.0, "max": 1.0}), {},
     ["spec.search.parameters.loraDropout"], "spec.method.lora.dropout"),
    ("both ends out of bounds", search(virtualTokens={"min": 0, "max": 1000}), {"method": {"type": "prompt"}},
     ["spec.search.parameters.virtualTokens", "spec.search.parameters.virtualTokens"], "spec.method.virtualTokens"),
    ("lora rank on full fine-tuning", search(loraRank={"values": [8, 16]}), {"method": {"type": "full"}},
     ["spec.search.parameters.loraRank"], "lora, qlora or dora"),
    ("virtual tokens on lora", search(virtualTokens={"values": [10, 20]}), {},
     ["spec.search.parameters.virtualTokens"], "prefix or prompt"),
    ("grid over a range", {**search(learningRate=LOG_LR, loraRank={"values": [8]}), "strategy": "grid"}, {},
     ["spec.search.parameters.learningRate"], "needs values"),
    ("median pruning without periodic evaluation", search(learningRate=LOG_LR), {"evaluation": {"everySteps": 0}},
     ["spec.search.pruning.rule"], "spec.evaluation.everySteps > 0"),
    ("with stages", search(learningRate=LOG_LR),
     {"datasets": [], "stages": [{"name": "a", "datasets": [{"uri": "s3://team-a/data/a.jsonl"}]}]},
     ["spec.search"], "spec.stages"),
    ("epochs and maxSteps", search(epochs={"values": [1, 2]}, maxSteps={"values": [100, 200]}), {},
     ["spec.search.parameters"], "epochs or maxSteps"),
    ("epochs while maxSteps decides", search(epochs={"min": 1, "max": 4}), {"hyperparameters": {"maxSteps": 100}},
     ["spec.search.parameters.epochs"], "ignores epochs when spec.hyperparameters.maxSteps > 0"),
    ("maxSteps over the job's maxSteps", search(maxSteps={"values": [50, 200]}), {"hyperparameters": {"maxSteps": 100}},
     [], ""),
    ("values and a range", search(weightDecay={"values": [0.0], "min": 0.0, "max": 0.1}), {},
     ["spec.search.parameters.weightDecay"], "not both"),
    ("min not below max", search(weightDecay={"min": 0.1, "max": 0.1}), {},
     ["spec.search.parameters.weightDecay"], "min < max"),
    ("log scale from 0", search(weightDecay={"min": 0.0, "max": 0.1, "scale": "log"}), {},
     ["spec.search.parameters.weightDecay"], "min > 0"),
    ("log scale on values", search(weightDecay={"values": [0.1], "scale": "log"}), {},
     ["spec.search.parameters.weightDecay"], "ranges only"),
    ("parallelism above trials", {**search(learningRate=LOG_LR), "trials": 2, "parallelism": 4}, {},
     ["spec.search.parallelism"], "must not exceed"),
    ("nothing varied", search(), {}, ["spec.search.parameters"], "at least one"),
]


@pytest.mark.parametrize("search_, overrides, fields, phrase", [c[1:] for c in PROBLEMS], ids=[c[0] for c in PROBLEMS])
def test_problems_name_the_field(search_, overrides, fields, phrase):
    found = space.problems(job_spec(search_, **overrides))
    assert [p.message.split(": ")[0] for p in found] == fields
    assert all(p.reason == "InvalidSpec" for p in found)
    if found:
        assert phrase in found[0].message


def test_no_search_no_problems():
    assert space.problems(parse_spec(job(minimal_spec())["spec"])) == []
