"""What the evaluation report is made of: one ReportInput, JSON-ready (to_dict / from_dict).

Every part is normalised when the ReportInput is built, from the constructor or from a JSON
document: unknown keys are left out, missing ones take their empty value, numbers that are not
finite become None (JSON has no NaN or infinity) and history points that are not [step, value]
pairs are dropped. Strings are kept as they are: they come from a tenant's data and the renderer
escapes them, this module does not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

HISTORY_SERIES = ("train", "validation", "learningRate")


class Comparison(TypedDict):
    base: float | None
    tuned: float | None
    delta: float | None


class TaskEntry(TypedDict):
    """The shape of scoring.task.TaskScores.to_dict()."""
    name: str
    rows: int
    metrics: dict[str, Comparison]
    checks: dict[str, Comparison]


class GateEntry(TypedDict):
    name: str
    metric: str
    value: float | None
    limit: float | None
    passed: bool
    message: str


class Sample(TypedDict):
    task: str
    prompt: str
    reference: str
    base: str | None
    tuned: str


def finite(value: Any) -> float | None:
    """A real number as a float; None for anything else (bools, strings, NaN, infinities)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _sequence(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _numbers(value: Any, keys: tuple[str, ...]) -> dict[str, float | None]:
    value = _mapping(value)
    return {key: finite(value.get(key)) for key in keys}


def _comparisons(value: Any) -> dict[str, Comparison]:
    return {str(name): _numbers(scores, ("base", "tuned", "delta")) for name, scores in _mapping(value).items()}


def _task(value: Any) -> TaskEntry:
    value = _mapping(value)
    rows = value.get("rows")
    return {"name": _text(value.get("name")),
            "rows": rows if isinstance(rows, int) and not isinstance(rows, bool) else 0,
            "metrics": _comparisons(value.get("metrics")),
            "checks": _comparisons(value.get("checks"))}


def _gate(value: Any) -> GateEntry:
    value = _mapping(value)
    return {"name": _text(value.get("name")), "metric": _text(value.get("metric")),
            "value": finite(value.get("value")), "limit": finite(value.get("limit")),
            "passed": value.get("passed") is True, "message": _text(value.get("message"))}


def _points(value: Any) -> list[list]:
    points = []
    for point in _sequence(value):
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            continue
        step, y = finite(point[0]), finite(point[1])
        if step is not None and y is not None:
            points.append([int(step), y])
    return points


def _history(value: Any) -> dict[str, list[list]]:
    value = _mapping(value)
    return {series: _points(value.get(series)) for series in HISTORY_SERIES}


def _sample(value: Any) -> Sample:
    value = _mapping(value)
    return {"task": _text(value.get("task")), "prompt": _text(value.get("prompt")),
            "reference": _text(value.get("reference")), "base": _optional_text(value.get("base")),
            "tuned": _text(value.get("tuned"))}


def _empty_perplexity() -> dict[str, float | None]:
    return {"base": None, "tuned": None, "ratio": None}


@dataclass
class ReportInput:
    job: str
    runId: str
    modelUri: str
    outputUri: str
    rejected: bool = False
    rejectedReasons: list[str] = field(default_factory=list)
    perplexity: dict[str, float | None] = field(default_factory=_empty_perplexity)  # base, tuned, ratio
    general: dict[str, float | None] | None = None  # base, tuned, rise (tuned/base - 1)
    tasks: list[TaskEntry] = field(default_factory=list)
    gates: list[GateEntry] = field(default_factory=list)
    history: dict[str, list[list]] = field(default_factory=dict)  # series -> [[step, value], ...]
    data: dict = field(default_factory=dict)  # the data report, rendered as a flattened name/value table
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.job, self.runId = _text(self.job), _text(self.runId)
        self.modelUri, self.outputUri = _text(self.modelUri), _text(self.outputUri)
        self.rejected = self.rejected is True
        self.rejectedReasons = [_text(reason) for reason in _sequence(self.rejectedReasons)]
        self.perplexity = _numbers(self.perplexity, ("base", "tuned", "ratio"))
        self.general = _numbers(self.general, ("base", "tuned", "rise")) if isinstance(self.general, dict) else None
        self.tasks = [_task(task) for task in _sequence(self.tasks)]
        self.gates = [_gate(gate) for gate in _sequence(self.gates)]
        self.history = _history(self.history)
        self.data = dict(_mapping(self.data))
        self.samples = [_sample(sample) for sample in _sequence(self.samples)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> ReportInput:
        document = _mapping(document)
        identity = {"job": "", "runId": "", "modelUri": "", "outputUri": ""}
        return cls(**{**identity, **{name: document[name] for name in cls.__dataclass_fields__ if name in document}})
