"""The report's plots, as PNG bytes: training and validation loss, and the learning rate, against
the optimizer step. Each plot is a matplotlib Figure drawn on its own Agg canvas (never pyplot, whose
global state would leak between calls); the *_figure functions return it for inspection, the *_plot
functions its PNG. A series with no points is left out; with nothing to draw there is no plot (None).
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

from .model import finite


def _ensure_config_dir() -> None:
    """The pod's root filesystem is read-only and HOME may be too: matplotlib's font cache goes to a
    temporary directory unless one is configured."""
    if not os.environ.get("MPLCONFIGDIR"):
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="matplotlib-")


def _series(history: dict | None, name: str) -> tuple[list[float], list[float]]:
    points = (history or {}).get(name) or []
    pairs = [(finite(p[0]), finite(p[1])) for p in points if isinstance(p, (list, tuple)) and len(p) == 2]
    pairs = [(step, value) for step, value in pairs if step is not None and value is not None]
    return [step for step, _ in pairs], [value for _, value in pairs]


def _figure(title: str, ylabel: str, series: list[tuple[str, list[float], list[float], dict]]) -> Any:
    """A Figure with one line per series that has points; None when none has."""
    series = [s for s in series if s[1]]
    if not series:
        return None
    _ensure_config_dir()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, steps, values, style in series:
        if len(steps) == 1:  # a line through one point draws nothing
            style = {"marker": "o", **style}
        axes.plot(steps, values, label=label, **style)
    axes.set_title(title)
    axes.set_xlabel("optimizer step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def loss_figure(history: dict | None) -> Any:
    train_steps, train_loss = _series(history, "train")
    validation_steps, validation_loss = _series(history, "validation")
    return _figure("Training and validation loss", "loss", [
        ("training loss", train_steps, train_loss, {"linewidth": 1.2}),
        ("validation loss", validation_steps, validation_loss, {"linewidth": 1.5, "marker": "o", "markersize": 4}),
    ])


def learning_rate_figure(history: dict | None) -> Any:
    steps, rates = _series(history, "learningRate")
    return _figure("Learning rate", "learning rate", [("learning rate", steps, rates, {"linewidth": 1.2})])


def png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    # No Software entry: the same history gives the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def loss_plot(history: dict | None) -> bytes | None:
    figure = loss_figure(history)
    return png(figure) if figure is not None else None


def learning_rate_plot(history: dict | None) -> bytes | None:
    figure = learning_rate_figure(history)
    return png(figure) if figure is not None else None
