"""The evaluation report as files: report.md, report.html and the PNG plots it links to.

Every string of the input is a tenant's (task names, prompts, answers, gate messages, data report
keys) and is treated as hostile. Each is cut to TEXT_LIMIT characters, stripped of control and
bidirectional-override characters, put on one line (line breaks shown as ⏎) and escaped: &, < and >
become entities, Markdown's inline markers get a backslash. Such a string is only ever placed in a
table cell or after text of the report's own, never at the start of a line, so it cannot open a
block (heading, list, quote) either. The HTML is the `markdown` library's rendering of that same
Markdown with its raw-HTML passthrough switched off, so a "<script>" that slipped past the escaping
would still come out as text; the page's Content-Security-Policy forbids scripts on top.
"""

from __future__ import annotations

import html
from typing import Any, Callable, Iterator

import markdown as markdown_library

from . import plots
from .model import ReportInput

REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"
LOSS_PLOT = "loss.png"
LEARNING_RATE_PLOT = "learning-rate.png"
TEXT_LIMIT = 500
DATA_ROWS = 60
NONE = "—"
LINE_BREAK = " ⏎ "

_INVISIBLE = {**dict.fromkeys(c for c in range(32) if chr(c) not in "\t\n\r"), 0x7F: None,
              **dict.fromkeys(range(0x202A, 0x202F)), **dict.fromkeys(range(0x2066, 0x206A))}
_MARKDOWN_INLINE = "\\`*_[]!|"
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #1f2328; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; vertical-align: top; }
th { background: #f6f8fa; }
td { overflow-wrap: anywhere; }
img { max-width: 100%; }
"""
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src * data:; style-src 'unsafe-inline'"


def cut(text: str, limit: int = TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


def plain(value: Any, limit: int = TEXT_LIMIT) -> str:
    """A hostile string cut, without invisible characters, on one line; not yet escaped."""
    text = cut("" if value is None else str(value), limit).translate(_INVISIBLE)
    return LINE_BREAK.join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def escape(value: Any, limit: int = TEXT_LIMIT) -> str:
    """A hostile string, safe in a Markdown table cell or inside a line of the report's own."""
    return "".join(_ENTITIES.get(c) or ("\\" + c if c in _MARKDOWN_INLINE else c) for c in plain(value, limit))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cell or NONE for cell in cells) + " |"


def _score(value: float | None) -> str:
    return NONE if value is None else f"{value:.3f}"


def _gain(value: float | None) -> str:
    return NONE if value is None else f"{value:+.3f}"


def _perplexity(value: float | None) -> str:
    return NONE if value is None else f"{value:.2f}"


def _number(value: float | None) -> str:
    return NONE if value is None else f"{value:.4g}"


# ---- sections ----------------------------------------------------------------------------------


def _verdict(report: ReportInput) -> str:
    if not report.rejected:
        return "**Verdict: ACCEPTED**"
    reasons = "; ".join(escape(reason) for reason in report.rejectedReasons if plain(reason))
    return "**Verdict: REJECTED**" + (f": {reasons}" if reasons else "")


def _perplexity_row(label: str, values: dict | None, relative_key: str, relative: Callable[[float], str]) -> list[str]:
    """One perplexity row, base against tuned; the delta with the relative change (ratio or rise) when known."""
    if values is None or (values["base"] is None and values["tuned"] is None):
        return []
    delta = NONE
    if values["base"] is not None and values["tuned"] is not None:
        delta = f"{values['tuned'] - values['base']:+.2f}"
        if values[relative_key] is not None:
            delta += f" ({relative(values[relative_key])})"
    return [_row([label, "perplexity", _perplexity(values["base"]), _perplexity(values["tuned"]), delta])]


def _perplexity_rows(report: ReportInput) -> list[str]:
    return (_perplexity_row("validation set", report.perplexity, "ratio", lambda ratio: f"×{ratio:.3f}")
            + _perplexity_row("general text", report.general, "rise", lambda rise: f"{rise:+.1%}"))


def _task_rows(report: ReportInput) -> list[str]:
    rows = []
    for task in report.tasks:
        label = f"task {escape(task['name'])} ({task['rows']} rows)"
        for kind, scores in (("", task["metrics"]), ("check ", task["checks"])):
            for name, score in scores.items():
                rows.append(_row([label, kind + escape(name), _score(score["base"]), _score(score["tuned"]),
                                  _gain(score["delta"])]))
    return rows


def _metrics_section(report: ReportInput) -> list[str]:
    lines = ["## Metrics", ""]
    rows = _perplexity_rows(report) + _task_rows(report)
    if rows:
        lines += ["| Evaluation | Metric | Base | Tuned | Delta |", "|---|---|---:|---:|---:|", *rows, ""]
    else:
        lines += ["No metric was computed.", ""]
    if not report.tasks:
        lines += ["No evaluation task was configured.", ""]
    return lines


def _gates_section(report: ReportInput) -> list[str]:
    lines = ["## Gates", ""]
    if not report.gates:
        return lines + ["No gate was configured.", ""]
    lines += ["| Gate | Metric | Value | Limit | Result | Message |", "|---|---|---:|---:|---|---|"]
    for gate in report.gates:
        lines.append(_row([escape(gate["name"]), escape(gate["metric"]), _number(gate["value"]),
                           _number(gate["limit"]), "pass" if gate["passed"] else "**FAIL**", escape(gate["message"])]))
    return lines + [""]


def _plots_section(plot_files: list[str]) -> list[str]:
    lines = ["## Training curves", ""]
    titles = {LOSS_PLOT: "Training and validation loss", LEARNING_RATE_PLOT: "Learning rate"}
    if not plot_files:
        return lines + ["No training history was recorded.", ""]
    for name in plot_files:
        lines += [f"![{titles.get(name, name)}]({name})", ""]
    return lines


def flatten(data: dict) -> Iterator[tuple[str, Any]]:
    """(dotted name, leaf value) in document order; list items are named by their index. An empty
    dict or list is a leaf of its own."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        name, value = stack.pop()
        children = (list(value.items()) if isinstance(value, dict)
                    else list(enumerate(value)) if isinstance(value, (list, tuple)) else None)
        if children is None or (not children and name):
            yield name, value
            continue
        stack.extend((f"{name}.{key}" if name else str(key), child) for key, child in reversed(children))


def _data_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        return "(empty)"
    return escape(value)


def _data_section(report: ReportInput) -> list[str]:
    lines = ["## Data", ""]
    entries = list(flatten(report.data))
    if not entries:
        return lines + ["No data report.", ""]
    lines += ["| Name | Value |", "|---|---|"]
    lines += [_row([escape(name), _data_value(value)]) for name, value in entries[:DATA_ROWS]]
    lines.append("")
    if len(entries) > DATA_ROWS:
        lines += [f"{len(entries) - DATA_ROWS} more entries are in the data report.", ""]
    return lines


def _samples_section(report: ReportInput, samples_limit: int) -> list[str]:
    lines = ["## Samples", ""]
    shown = report.samples[:max(samples_limit, 0)]
    if not shown:
        return lines + ["No sample was generated.", ""]
    lines += [f"{len(shown)} of {len(report.samples)} samples; each text is cut to {TEXT_LIMIT} characters.", "",
              "| Task | Prompt | Reference | Base model | Tuned model |", "|---|---|---|---|---|"]
    for sample in shown:
        lines.append(_row([escape(sample["task"]), escape(sample["prompt"]), escape(sample["reference"]),
                           NONE if sample["base"] is None else escape(sample["base"]), escape(sample["tuned"])]))
    return lines + [""]


# ---- documents ---------------------------------------------------------------------------------


def markdown_report(report: ReportInput, samples_limit: int = 8, plot_files: list[str] | None = None) -> str:
    """The report in Markdown; `plot_files` are the PNGs next to it, linked by their relative names."""
    lines = [
        f"# Evaluation report: {escape(report.job)}",
        "",
        f"Run {escape(report.runId)}. Base model: {escape(report.modelUri)}. Output: {escape(report.outputUri)}.",
        "",
        _verdict(report),
        "",
        *_metrics_section(report),
        *_gates_section(report),
        *_plots_section(plot_files or []),
        *_data_section(report),
        *_samples_section(report, samples_limit),
    ]
    return "\n".join(lines)


def html_report(markdown_text: str, title: str) -> str:
    """A whole HTML page: the Markdown rendered by the `markdown` library, raw HTML disabled."""
    converter = markdown_library.Markdown(extensions=["tables"], output_format="html")
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    body = converter.convert(markdown_text)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
        f"<title>{html.escape(plain(title))}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        body,
        "</body>",
        "</html>",
        "",
    ])


def render(report: ReportInput, samples_limit: int = 8) -> dict[str, bytes]:
    """{file name: content}: report.md, report.html, and loss.png / learning-rate.png when the
    history has something to plot."""
    files = {name: image for name, image in ((LOSS_PLOT, plots.loss_plot(report.history)),
                                             (LEARNING_RATE_PLOT, plots.learning_rate_plot(report.history)))
             if image is not None}
    text = markdown_report(report, samples_limit, list(files))
    files[REPORT_MARKDOWN] = text.encode("utf-8")
    files[REPORT_HTML] = html_report(text, f"Evaluation report: {report.job}").encode("utf-8")
    return files
