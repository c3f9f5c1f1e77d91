"""Gates as data, and their verdicts: each gate gives one outcome per limit it sets, failed when what it
limits was not measured.

* TaskGate: a task's metric or check (by name) must reach minScore (the tuned score) and/or gain at least
  minGain over the base model (tuned - base; needs the base model's answers);
* GeneralGate: the perplexity of the general text set may rise by at most maxPerplexityRise, a fraction
  (0.1: 10%), rise = tuned / base - 1 (the forgetting check);
* PerplexityGate: validation perplexity tuned / base at most maxRatio.

An outcome's name says which gate and limit ("task support minScore"), its metric what was measured, its
value the measurement (the gain for minGain) and its message all of it in words.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Union

from ..errors import ConfigError
from .task import TaskScores


@dataclass(frozen=True)
class TaskGate:
    task: str
    metric: str  # a metric or check name
    minScore: float | None = None
    minGain: float | None = None

    def __post_init__(self) -> None:
        if self.minScore is None and self.minGain is None:
            raise ConfigError(f"gate on task {self.task} {self.metric}: give minScore, minGain or both")


@dataclass(frozen=True)
class GeneralGate:
    maxPerplexityRise: float


@dataclass(frozen=True)
class PerplexityGate:
    maxRatio: float


Gate = Union[TaskGate, GeneralGate, PerplexityGate]


@dataclass(frozen=True)
class GateOutcome:
    name: str
    metric: str
    value: float | None
    limit: float
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _on_limit(value: float, limit: float) -> bool:
    """Equal up to float rounding: 11 / 10 - 1 is 0.10000000000000009, which is a rise of 10%."""
    return math.isclose(value, limit, rel_tol=1e-9, abs_tol=1e-12)


def _reaches(value: float, limit: float, at_most: bool = False) -> bool:
    """value >= limit (value <= limit with at_most), a value on the limit passing."""
    if _on_limit(value, limit):
        return True
    return value <= limit if at_most else value >= limit


def _pair(value: float, limit: float, digits: int, scale: float = 1.0, suffix: str = "",
          sign: str = "") -> tuple[str, str]:
    """value and limit as text, with more digits when the rounding would make them look equal."""
    for places in range(digits, digits + 4):
        shown = f"{value * scale:{sign}.{places}f}{suffix}", f"{limit * scale:{sign}.{places}f}{suffix}"
        if shown[0] != shown[1] or _on_limit(value, limit):
            break
    return shown


def _ppl(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def _task_outcomes(gate: TaskGate, tasks: dict[str, TaskScores]) -> list[GateOutcome]:
    limits = [(kind, limit) for kind, limit in (("minScore", gate.minScore), ("minGain", gate.minGain))
              if limit is not None]
    subject = f"task {gate.task}"

    def failed(kind: str, limit: float, message: str) -> GateOutcome:
        return GateOutcome(f"{subject} {kind}", gate.metric, None, limit, False, message)

    task = tasks.get(gate.task)
    if task is None:
        known = ", ".join(tasks) or "none"
        return [failed(k, v, f"{subject} was not evaluated (tasks evaluated: {known})") for k, v in limits]
    score = task.score(gate.metric)
    if score is None:
        known = ", ".join([*task.metrics, *task.checks]) or "none"
        return [failed(k, v, f"{subject}: {gate.metric} was not scored (scored: {known})") for k, v in limits]

    out = []
    for kind, limit in limits:
        if kind == "minScore":
            value = score["tuned"]
            shown, least = _pair(value, limit, 3)
            passed = _reaches(value, limit)
            message = (f"{subject}: {gate.metric} {shown} is "
                       f"{'at least' if passed else 'below'} the minimum {least}")
        else:
            value = score["delta"]
            if value is None:
                out.append(failed(kind, limit, f"{subject}: {gate.metric} gain needs the base model's score, "
                                               "which was not measured"))
                continue
            shown, least = _pair(value, limit, 3, sign="+")
            passed = _reaches(value, limit)
            message = (f"{subject}: {gate.metric} gain {shown} ({score['base']:.3f} -> {score['tuned']:.3f}) is "
                       f"{'at least' if passed else 'below'} the minimum {least}")
        out.append(GateOutcome(f"{subject} {kind}", gate.metric, value, limit, passed, message))
    return out


def _measured(values: dict | None) -> tuple[float, float] | None:
    base, tuned = (values or {}).get("base"), (values or {}).get("tuned")
    if base is None or tuned is None or base <= 0:
        return None
    return base, tuned


def _general_outcome(gate: GeneralGate, general: dict | None) -> GateOutcome:
    name, metric, limit = "general maxPerplexityRise", "general perplexity", gate.maxPerplexityRise
    measured = _measured(general)
    if measured is None:
        return GateOutcome(name, metric, None, limit, False,
                           "general perplexity was not measured for both the base and the tuned model")
    base, tuned = measured
    rise = tuned / base - 1
    shown, most = _pair(abs(rise) if rise < 0 else rise, limit, 1, 100, "%")
    passed = _reaches(rise, limit, at_most=True)
    verb = "fell" if rise < 0 else "rose"
    message = (f"general perplexity {verb} {shown} ({_ppl(base)} -> {_ppl(tuned)}), "
               f"{'within' if passed else 'above'} the limit {most}")
    return GateOutcome(name, metric, rise, limit, passed, message)


def _perplexity_outcome(gate: PerplexityGate, perplexity: dict | None) -> GateOutcome:
    name, metric, limit = "perplexity maxRatio", "perplexity ratio", gate.maxRatio
    measured = _measured(perplexity)
    if measured is None:
        return GateOutcome(name, metric, None, limit, False,
                           "validation perplexity was not measured for both the base and the tuned model")
    base, tuned = measured
    ratio = tuned / base
    shown, most = _pair(ratio, limit, 2)
    passed = _reaches(ratio, limit, at_most=True)
    message = (f"validation perplexity ratio {shown} ({_ppl(base)} -> {_ppl(tuned)}) is "
               f"{'within' if passed else 'above'} the limit {most}")
    return GateOutcome(name, metric, ratio, limit, passed, message)


def evaluate_gates(perplexity: dict | None, general: dict | None, tasks: list[TaskScores],
                   gates: list[Gate]) -> list[GateOutcome]:
    """The outcomes of the gates, in their order. perplexity and general: {"base", "tuned", ...} (None when
    not measured); a gate on something not measured fails."""
    by_name = {task.name: task for task in tasks}
    outcomes: list[GateOutcome] = []
    for gate in gates:
        if isinstance(gate, TaskGate):
            outcomes += _task_outcomes(gate, by_name)
        elif isinstance(gate, GeneralGate):
            outcomes.append(_general_outcome(gate, general))
        elif isinstance(gate, PerplexityGate):
            outcomes.append(_perplexity_outcome(gate, perplexity))
        else:
            raise TypeError(f"not a gate: {gate!r}")
    return outcomes
