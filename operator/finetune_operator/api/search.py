"""spec.search: a hyperparameter search inside one FineTuneJob (typed models, part of the CRD).

Each trial is one run of the job with some hyperparameters replaced; the operator drives an Optuna
study through its ask-and-tell interface (`finetune_operator.search`), prunes bad trials from the
validation loss the trainer reports every `evaluation.everySteps` steps, and promotes the best
trial's output to `output.uri`.
"""

from __future__ import annotations

from enum import Enum

from pydantic import ConfigDict, Field

from finetune_trainer.config import ApiModel, cel

MAX_TRIALS = 100
MAX_VALUES = 64
MAX_PARALLELISM = 16


class Scale(str, Enum):
    linear = "linear"
    log = "log"


class ParameterRange(ApiModel):
    """The values one hyperparameter takes in the search: a list, or a range from min to max."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("has(self.values) != (has(self.min) || has(self.max))",
             "a search parameter has either values or a range (min and max), not both"),
            ("has(self.min) == has(self.max)", "a search range needs both min and max"),
            ("!has(self.min) || self.min < self.max", "a search range needs min < max"),
            ("!has(self.min) || self.scale != 'log' || self.min > 0.0", "a log-scale search range needs min > 0"),
            ("!has(self.values) || self.scale == 'linear'", "scale applies to ranges only, not to values"),
        )
    )
    values: list[float] | None = Field(
        default=None, min_length=1, max_length=MAX_VALUES,
        description="The values to try (a categorical choice; the grid strategy needs values).")
    min: float | None = Field(default=None, description="Lower end of the range (inclusive).")
    max: float | None = Field(default=None, description="Upper end of the range (inclusive).")
    scale: Scale = Field(default=Scale.linear,
                         description="linear: uniform between min and max; log: uniform in log space (min > 0), "
                         "as suits learning rates.")


class SearchParameters(ApiModel):
    """The hyperparameters to vary. Integer ones (epochs, maxSteps, batchSize,
    gradientAccumulationSteps, loraRank, virtualTokens) are sampled as integers; every value must be
    one the field itself allows."""

    model_config = ConfigDict(
        json_schema_extra={
            "minProperties": 1,
            **cel(("!has(self.epochs) || !has(self.maxSteps)", "search.parameters: vary epochs or maxSteps, not both")),
        }
    )
    learningRate: ParameterRange | None = Field(default=None, description="hyperparameters.learningRate (float).")
    epochs: ParameterRange | None = Field(default=None, description="hyperparameters.epochs (integer; needs "
                                          "hyperparameters.maxSteps 0, as the trainer ignores epochs otherwise).")
    maxSteps: ParameterRange | None = Field(default=None, description="hyperparameters.maxSteps (integer).")
    batchSize: ParameterRange | None = Field(default=None, description="hyperparameters.batchSize (integer).")
    gradientAccumulationSteps: ParameterRange | None = Field(
        default=None, description="hyperparameters.gradientAccumulationSteps (integer).")
    warmupRatio: ParameterRange | None = Field(default=None, description="hyperparameters.warmupRatio (float).")
    weightDecay: ParameterRange | None = Field(default=None, description="hyperparameters.weightDecay (float).")
    loraRank: ParameterRange | None = Field(default=None, description="method.lora.rank (integer; lora, qlora, dora).")
    loraAlpha: ParameterRange | None = Field(default=None, description="method.lora.alpha (float; lora, qlora, dora).")
    loraDropout: ParameterRange | None = Field(default=None,
                                               description="method.lora.dropout (float; lora, qlora, dora).")
    virtualTokens: ParameterRange | None = Field(default=None,
                                                 description="method.virtualTokens (integer; prefix, prompt).")


class Strategy(str, Enum):
    grid = "grid"
    random = "random"
    tpe = "tpe"


class PruningRule(str, Enum):
    none = "none"
    median = "median"
    successiveHalving = "successiveHalving"


class Pruning(ApiModel):
    """Early stopping of bad trials, from the validation metric each trial reports every
    evaluation.everySteps optimizer steps."""

    rule: PruningRule = Field(
        default=PruningRule.median,
        description="none; median: stop a trial whose best value so far is worse than the median of the other "
        "trials at the same step (Optuna's MedianPruner); successiveHalving: keep the best 1/reductionFactor "
        "of the trials at each rung (Optuna's SuccessiveHalvingPruner).")
    warmupSteps: int = Field(default=0, ge=0, le=10_000_000,
                             description="No trial is pruned before this optimizer step (median rule).")
    startupTrials: int = Field(default=1, ge=0, le=MAX_TRIALS,
                               description="Trials that must finish before any is pruned (median rule).")
    minSteps: int = Field(default=1, ge=1, le=10_000_000,
                          description="Step of the first rung (successiveHalving): no trial is pruned before it.")
    reductionFactor: int = Field(default=3, ge=2, le=10,
                                 description="Fraction of trials promoted at each rung is 1/reductionFactor "
                                 "(successiveHalving).")


class Metric(str, Enum):
    evalLoss = "evalLoss"
    perplexity = "perplexity"


class Direction(str, Enum):
    minimize = "minimize"
    maximize = "maximize"


class Search(ApiModel):
    """A hyperparameter search: `trials` runs of the job, each with other values of `parameters`;
    the best (by `metric`) is promoted to output.uri."""

    model_config = ConfigDict(
        json_schema_extra=cel(("self.parallelism <= self.trials", "search.parallelism must not exceed search.trials"))
    )
    parameters: SearchParameters = Field(description="The hyperparameters to vary and their values or ranges.")
    trials: int = Field(default=8, ge=1, le=MAX_TRIALS, description="How many trials to run (the grid strategy "
                        "stops earlier when its grid has fewer points).")
    parallelism: int = Field(default=1, ge=1, le=MAX_PARALLELISM,
                             description="Trials running at once (the sandbox quota allows this many runs).")
    metric: Metric = Field(default=Metric.evalLoss,
                           description="What decides: evalLoss (validation loss) or perplexity (its exponential).")
    direction: Direction = Field(default=Direction.minimize, description="minimize or maximize the metric.")
    strategy: Strategy = Field(
        default=Strategy.tpe,
        description="grid: every combination of the parameters' values; random: independent samples; tpe: "
        "Optuna's Tree-structured Parzen Estimator, model-based after a few random trials.")
    pruning: Pruning = Field(default_factory=Pruning, json_schema_extra={"default": {}},
                             description="Early stopping of bad trials (needs evaluation.everySteps > 0). A trial whose "
                             "trainer has reached its last step when its reports are read is not stopped: it completes.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1,
                      description="Seed of the sampler: the same spec and seed propose the same trials.")
