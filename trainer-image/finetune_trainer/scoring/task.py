"""The scores of one evaluation task: each metric and check for the base model (when it was evaluated),
the tuned model, and the difference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .checks import Check
from .metrics import METRICS


def comparison(base: float | None, tuned: float) -> dict[str, float | None]:
    return {"base": base, "tuned": tuned, "delta": None if base is None else tuned - base}


@dataclass
class TaskScores:
    name: str
    rows: int
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)  # {"base", "tuned", "delta"}
    checks: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def score(self, measure: str) -> dict[str, float | None] | None:
        """The comparison of a metric or check by name; None when the task has no such score."""
        return self.metrics[measure] if measure in self.metrics else self.checks.get(measure)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows,
                "metrics": {k: dict(v) for k, v in self.metrics.items()},
                "checks": {k: dict(v) for k, v in self.checks.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskScores":
        return cls(name=data["name"], rows=data["rows"],
                   metrics={k: dict(v) for k, v in data.get("metrics", {}).items()},
                   checks={k: dict(v) for k, v in data.get("checks", {}).items()})


def score_task(name: str, references: list[str], tuned_answers: list[str], base_answers: list[str] | None,
               metrics: list[str], checks: list[Check]) -> TaskScores:
    """Scores the tuned answers (and the base answers, when given) of a task's rows against their references.
    ConfigError for an unknown metric or a check named like a metric or another check (gates name either);
    ValueError when the lists differ in length or are empty."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"task {name}: unknown metric {', '.join(unknown)} (known: {', '.join(METRICS)})")
    seen = set(metrics)
    for check in checks:
        if check.name in seen:
            raise ConfigError(f"task {name}: check {check.name} has the name of a metric or of another check")
        seen.add(check.name)
    if not references:
        raise ValueError(f"task {name}: no rows to score")
    answer_lists = {"tuned": tuned_answers, **({"base": base_answers} if base_answers is not None else {})}
    for model, answers in answer_lists.items():
        if len(answers) != len(references):
            raise ValueError(f"task {name}: {len(answers)} {model} answers for {len(references)} references")

    scores = TaskScores(name=name, rows=len(references))
    for metric_name in dict.fromkeys(metrics):
        metric = METRICS[metric_name]
        base = metric.score(base_answers, references) if base_answers is not None else None
        scores.metrics[metric_name] = comparison(base, metric.score(tuned_answers, references))
    for check in checks:
        base = check.rate(base_answers) if base_answers is not None else None
        scores.checks[check.name] = comparison(base, check.rate(tuned_answers))
    return scores
