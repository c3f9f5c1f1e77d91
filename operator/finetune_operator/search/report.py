"""The search report: a JSON document of every trial, a Markdown summary, and a plot of the
validation metric per trial (pure functions; promote.write_report puts them in S3).

The status is read leniently, like every status: a trial that does not validate is left out of the
report rather than failing it, and a value that is not a finite number is written as null (JSON has
no NaN or infinity).
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any

from pydantic import ValidationError

from finetune_operator.api.search import Search, SearchParameters
from finetune_operator.api.types import BestTrialStatus, TrialStatus
from finetune_operator.builders.names import trial_output_uri

log = logging.getLogger(__name__)

PLOT_FILE = "search-validation.png"
PARAMETER_ORDER = tuple(SearchParameters.model_fields)
MAX_LEGEND_TRIALS = 12  # beyond this a legend hides the plot: only the best trial is named
_MARKDOWN_SPECIAL = "\\`*_[]<>|#!"


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _name(choice: Any) -> str:
    """An enum field's value (the API models keep enum values as plain strings)."""
    return str(getattr(choice, "value", choice))


def _trials(status_search: dict) -> list[TrialStatus]:
    trials = []
    for raw in status_search.get("trials") or []:
        try:
            trials.append(TrialStatus.model_validate(raw))
        except ValidationError as exc:
            log.warning("search report: leaving out a trial that does not validate: %s", str(exc)[:300])
    return sorted(trials, key=lambda t: t.number)


def _best(status_search: dict) -> BestTrialStatus | None:
    try:
        return BestTrialStatus.model_validate(status_search["best"]) if status_search.get("best") else None
    except ValidationError as exc:
        log.warning("search report: ignoring a best trial that does not validate: %s", str(exc)[:300])
        return None


def _parameters(values: dict[str, float]) -> dict[str, float | None]:
    return {name: _finite(value) for name, value in values.items()}


def _trial(trial: TrialStatus) -> dict[str, Any]:
    return {
        "number": trial.number,
        "parameters": _parameters(trial.parameters),
        "phase": trial.phase,
        "value": _finite(trial.value),
        "bestValue": _finite(trial.bestValue),
        "step": trial.step,
        "pruned": trial.pruned,
        "gpuSeconds": _finite(trial.gpuSeconds),
        "message": trial.message,
        "history": [{"step": p.step, "value": _finite(p.value)} for p in trial.history],
    }


def _parameter_names(search: Search, trials: list[dict[str, Any]]) -> list[str]:
    """The searched parameters in the API's order, then any other name a trial carries."""
    names = {name for t in trials for name in t["parameters"]}
    names.update(name for name in PARAMETER_ORDER if getattr(search.parameters, name) is not None)
    return [n for n in PARAMETER_ORDER if n in names] + sorted(names - set(PARAMETER_ORDER))


def report_document(job_name: str, run_id: str, search: Search, status_search: dict, promoted_uri: str) -> dict:
    """The JSON-ready report. `promoted_uri` is where the best trial's output went (output.uri; ""
    when nothing was promoted); the trial's own prefix under it is `promotedFrom`."""
    trials = [_trial(t) for t in _trials(status_search)]
    best = _best(status_search)
    promoted = best is not None and bool(promoted_uri)
    counts = {phase: sum(t["phase"] == phase for t in trials)
              for phase in ("Pending", "Running", "Succeeded", "Pruned", "Failed")}
    return {
        "job": job_name,
        "runId": run_id,
        "metric": _name(search.metric),
        "direction": _name(search.direction),
        "strategy": _name(search.strategy),
        "seed": search.seed,
        "planned": status_search.get("planned") if isinstance(status_search.get("planned"), int) else len(trials),
        "parallelism": search.parallelism,
        "pruning": search.pruning.model_dump(mode="json"),
        "space": search.parameters.model_dump(mode="json", exclude_none=True),
        "parameters": _parameter_names(search, trials),
        "counts": counts,
        "trials": trials,
        "best": ({"number": best.number, "value": _finite(best.value), "parameters": _parameters(best.parameters)}
                 if best is not None else None),
        "promotedFrom": trial_output_uri(promoted_uri, best.number) if promoted else None,
        "promotedTo": promoted_uri if promoted else None,
    }


# ---- Markdown ----------------------------------------------------------------------------------


def _escape(text: str) -> str:
    """Text from the status or the spec, safe in a Markdown table cell or paragraph."""
    text = " ".join(str(text).split())
    return "".join("\\" + c if c in _MARKDOWN_SPECIAL else c for c in text)


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _assignments(parameters: dict[str, Any]) -> str:
    return ", ".join(f"{_escape(name)} = {_number(value)}" for name, value in parameters.items())


def markdown(document: dict) -> str:
    metric = _escape(document["metric"])
    names = document["parameters"]
    counts = document["counts"]
    lines = [
        f"# Hyperparameter search of {_escape(document['job'])} (run {_escape(document['runId'])})",
        "",
        f"{len(document['trials'])} of {document['planned']} planned trials: "
        f"{counts['Succeeded']} succeeded, {counts['Pruned']} pruned, {counts['Failed']} failed, "
        f"{counts['Running'] + counts['Pending']} running. Metric: {metric} ({_escape(document['direction'])}); "
        f"strategy: {_escape(document['strategy'])}; seed: {document['seed']}.",
        "",
        "| Trial | " + " | ".join(_escape(n) for n in names) + f" | Phase | {metric} | Step |",
        "|---:|" + "---:|" * len(names) + "---|---:|---:|",
    ]
    best = document["best"]
    for trial in document["trials"]:
        number = f"{trial['number']} (best)" if best and best["number"] == trial["number"] else str(trial["number"])
        cells = [number, *(_number(trial["parameters"].get(n)) for n in names), _escape(trial["phase"]),
                 _number(trial["value"]), str(trial["step"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Best trial", ""]
    if best is None:
        lines.append("No trial finished with a value: nothing was promoted.")
    else:
        lines.append(f"Trial {best['number']}: {metric} = {_number(best['value'])} with "
                     f"{_assignments(best['parameters']) or 'the job’s own hyperparameters'}.")
        if document["promotedTo"]:
            lines += ["", f"Its output was promoted from {_escape(document['promotedFrom'])} "
                          f"to {_escape(document['promotedTo'])}."]
    lines += ["", f"![{metric} per trial at each validation step]({PLOT_FILE})", ""]
    return "\n".join(lines)


# ---- the plot ----------------------------------------------------------------------------------


def _points(trial: dict) -> tuple[list[int], list[float]]:
    points = [(p["step"], p["value"]) for p in trial["history"] if p["value"] is not None]
    if not points and trial["value"] is not None:
        points = [(trial["step"], trial["value"])]
    return [s for s, _ in points], [v for _, v in points]


def validation_figure(document: dict) -> Any:
    """A matplotlib Figure (no pyplot, so no global state): the metric against the optimizer step,
    one line per trial; pruned trials dashed and ending in a cross; the best trial thick, in black."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 5), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    best = document["best"]["number"] if document["best"] else None
    named = len(document["trials"]) <= MAX_LEGEND_TRIALS
    values: list[float] = []
    for trial in document["trials"]:
        steps, ys = _points(trial)
        if not steps:
            continue
        values += ys
        is_best = trial["number"] == best
        label = f"trial {trial['number']}" + (" (best)" if is_best else "")
        axes.plot(steps, ys, marker="o", markersize=3,
                  linestyle="--" if trial["phase"] == "Pruned" else "-",
                  linewidth=3.0 if is_best else 1.2, alpha=1.0 if is_best else 0.7,
                  color="black" if is_best else None, zorder=3 if is_best else 2,
                  label=label if named or is_best else None)
        if trial["phase"] == "Pruned":
            axes.plot(steps[-1:], ys[-1:], marker="x", markersize=8, color=axes.lines[-1].get_color(), zorder=3)
    metric = document["metric"]
    axes.set_xlabel("optimizer step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(f"validation {metric}")
    axes.set_title(f"{document['job']} run {document['runId']}: {metric} per trial ({document['direction']})")
    if not values:
        axes.text(0.5, 0.5, "no validation values yet", ha="center", va="center", transform=axes.transAxes)
    elif min(values) > 0 and max(values) / min(values) > 50:  # a diverged trial would flatten the others
        axes.set_yscale("log")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return figure


def plot_png(document: dict) -> bytes:
    buffer = io.BytesIO()
    # No Software entry: the same document gives the same bytes.
    validation_figure(document).savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
