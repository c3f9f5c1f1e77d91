"""The evaluation report (finetune_trainer.report): its input, its plots, its Markdown and its HTML,
with every string of the input treated as a tenant's hostile text."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import tempfile
from html.parser import HTMLParser

import pytest
from PIL import Image

from finetune_trainer.report import ReportInput, plots, render
from finetune_trainer.report.render import TEXT_LIMIT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HISTORY = {
    "train": [[1, 2.5], [2, 2.1], [3, 1.8], [4, 1.6]],
    "validation": [[2, 2.2], [4, 1.9]],
    "learningRate": [[1, 1e-4], [2, 2e-4], [3, 2e-4], [4, 1e-4]],
}
TASK = {
    "name": "support",
    "rows": 40,
    "metrics": {"rougeL": {"base": 0.25, "tuned": 0.4125, "delta": 0.1625},
                "exactMatch": {"base": 0.1, "tuned": 0.05, "delta": -0.05}},
    "checks": {"mentions-refund": {"base": 0.5, "tuned": 0.875, "delta": 0.375}},
}
GATES = [
    {"name": "support-rougeL", "metric": "rougeL", "value": 0.4125, "limit": 0.4, "passed": True,
     "message": "task support: rougeL 0.412 is at least the minimum 0.400"},
    {"name": "general", "metric": "perplexity", "value": 0.231, "limit": 0.1, "passed": False,
     "message": "general perplexity rose 23.1% (18.2 -> 22.4), above the limit 10.0%"},
]
SAMPLE = {"task": "support", "prompt": "How do I get a refund?", "reference": "Ask for a refund within 30 days.",
          "base": "I do not know.", "tuned": "Ask for a refund within 30 days."}


def full_report(**changes) -> ReportInput:
    document = {
        "job": "support-bot", "runId": "3", "modelUri": "s3://models/llama/", "outputUri": "s3://out/support/",
        "rejected": True, "rejectedReasons": ["general perplexity rose 23.1% (18.2 -> 22.4), above the limit 10.0%"],
        "perplexity": {"base": 20.0, "tuned": 15.0, "ratio": 0.75},
        "general": {"base": 18.2, "tuned": 22.4, "rise": 22.4 / 18.2 - 1},
        "tasks": [TASK], "gates": GATES, "history": HISTORY,
        "data": {"stages": {"sft": {"rowsRead": 120, "rowsDropped": 4, "packed": False,
                                    "contentFilters": {"blocklist": {"dropped": 3}}}}},
        "samples": [SAMPLE],
    }
    return ReportInput(**{**document, **changes})


class ElementCollector(HTMLParser):
    """The start tags of an HTML document with their attributes, and its text by element."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def rendered(report: ReportInput, samples_limit: int = 8) -> tuple[str, str, ElementCollector]:
    files = render(report, samples_limit)
    html = files["report.html"].decode("utf-8")
    return files["report.md"].decode("utf-8"), html, ElementCollector(html)


# ---- the input ---------------------------------------------------------------------------------


def test_the_input_survives_a_json_round_trip():
    report = full_report()
    document = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert ReportInput.from_dict(document) == report
    assert document["tasks"] == [TASK]
    assert document["gates"] == GATES
    assert document["history"] == HISTORY


@pytest.mark.parametrize("changes, field, expected", [
    ({"perplexity": {"base": math.nan, "tuned": math.inf, "ratio": 1.5}}, "perplexity",
     {"base": None, "tuned": None, "ratio": 1.5}),
    ({"perplexity": None}, "perplexity", {"base": None, "tuned": None, "ratio": None}),
    ({"general": "garbled"}, "general", None),
    ({"history": {"train": [[1, 2.0], [2, math.nan], [3], "x", [4, "1.0"], [5.0, 1.5]], "other": [[1, 1.0]]}},
     "history", {"train": [[1, 2.0], [5, 1.5]], "validation": [], "learningRate": []}),
    ({"tasks": [{"name": "t", "metrics": {"bleu": {"tuned": 0.5}}}]}, "tasks",
     [{"name": "t", "rows": 0, "metrics": {"bleu": {"base": None, "tuned": 0.5, "delta": None}}, "checks": {}}]),
    ({"gates": [{"name": "g", "passed": "yes", "value": True}]}, "gates",
     [{"name": "g", "metric": "", "value": None, "limit": None, "passed": False, "message": ""}]),
    ({"samples": [{"task": "t", "prompt": 7, "tuned": None, "extra": "x"}]}, "samples",
     [{"task": "t", "prompt": "7", "reference": "", "base": None, "tuned": ""}]),
    ({"rejectedReasons": "not a list"}, "rejectedReasons", []),
], ids=["non-finite-numbers", "missing-perplexity", "general-not-a-dict", "bad-history-points",
        "task-missing-keys", "gate-wrong-types", "sample-wrong-types", "reasons-not-a-list"])
def test_the_input_is_normalised(changes, field, expected):
    assert getattr(full_report(**changes), field) == expected


def test_from_dict_takes_a_partial_document():
    report = ReportInput.from_dict({"job": "j", "unknown": 1})
    assert (report.job, report.runId, report.tasks, report.general, report.rejected) == ("j", "", [], None, False)


# ---- plots -------------------------------------------------------------------------------------


def line_data(figure) -> dict[str, tuple[list, list]]:
    (axes,) = figure.axes
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}


def test_the_loss_figure_has_a_training_and_a_validation_series():
    figure = plots.loss_figure(HISTORY)
    assert line_data(figure) == {"training loss": ([1, 2, 3, 4], [2.5, 2.1, 1.8, 1.6]),
                                 "validation loss": ([2, 4], [2.2, 1.9])}
    (axes,) = figure.axes
    assert (axes.get_title(), axes.get_xlabel(), axes.get_ylabel()) == (
        "Training and validation loss", "optimizer step", "loss")
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["training loss", "validation loss"]


def test_the_learning_rate_figure_has_the_schedule():
    figure = plots.learning_rate_figure(HISTORY)
    assert line_data(figure) == {"learning rate": ([1, 2, 3, 4], [1e-4, 2e-4, 2e-4, 1e-4])}
    assert figure.axes[0].get_ylabel() == "learning rate"


@pytest.mark.parametrize("history, expected_labels", [
    ({"train": [[1, 2.0], [2, 1.0]], "validation": []}, ["training loss"]),
    ({"validation": [[5, 1.0]]}, ["validation loss"]),
    ({"train": [[1, 2.0]], "validation": [[1, 2.1]]}, ["training loss", "validation loss"]),
], ids=["no-validation", "only-validation", "one-point-each"])
def test_a_series_without_points_is_left_out(history, expected_labels):
    figure = plots.loss_figure(history)
    assert list(line_data(figure)) == expected_labels
    assert all(line.get_marker() not in (None, "None", "") for line in figure.axes[0].get_lines()
               if len(line.get_xdata()) == 1)  # a lone point is drawn as a marker


@pytest.mark.parametrize("history", [None, {}, {"train": [], "validation": [], "learningRate": []},
                                     {"train": [[1, math.nan]]}], ids=["none", "empty", "empty-series", "only-nan"])
def test_nothing_to_plot_gives_no_plot(history):
    assert plots.loss_figure(history) is None
    assert plots.loss_plot(history) is None
    assert plots.learning_rate_plot(history) is None


@pytest.mark.parametrize("plot", [plots.loss_plot, plots.learning_rate_plot], ids=["loss", "learning-rate"])
def test_plots_are_valid_pngs_and_the_same_history_gives_the_same_bytes(plot):
    image = plot(HISTORY)
    assert image.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(image)) as decoded:
        decoded.verify()
        assert decoded.format == "PNG" and decoded.size == (800, 450)
    assert plot(HISTORY) == image


def test_matplotlib_gets_a_writable_config_dir_when_none_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the new directory lands in the test's own
    assert plots.loss_plot(HISTORY).startswith(PNG_SIGNATURE)
    config_dir = os.environ["MPLCONFIGDIR"]
    assert os.path.dirname(config_dir) == str(tmp_path) and os.access(config_dir, os.W_OK)


# ---- Markdown ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rejected, reasons, expected", [
    (False, [], "**Verdict: ACCEPTED**"),
    (True, ["gate general failed", "task support: bleu 0.100 is below the minimum 0.200"],
     "**Verdict: REJECTED**: gate general failed; task support: bleu 0.100 is below the minimum 0.200"),
    (True, [], "**Verdict: REJECTED**"),
], ids=["accepted", "rejected-with-reasons", "rejected-without-reasons"])
def test_the_verdict_line(rejected, reasons, expected):
    text, _, _ = rendered(full_report(rejected=rejected, rejectedReasons=reasons))
    assert text.startswith("# Evaluation report: support-bot\n")
    assert expected in text.splitlines()


@pytest.fixture(scope="module")
def full_markdown() -> list[str]:
    return render(full_report())["report.md"].decode().splitlines()


@pytest.mark.parametrize("row", [
    "| validation set | perplexity | 20.00 | 15.00 | -5.00 (×0.750) |",
    "| general text | perplexity | 18.20 | 22.40 | +4.20 (+23.1%) |",
    "| task support (40 rows) | rougeL | 0.250 | 0.412 | +0.163 |",
    "| task support (40 rows) | exactMatch | 0.100 | 0.050 | -0.050 |",
    "| task support (40 rows) | check mentions-refund | 0.500 | 0.875 | +0.375 |",
    "| support-rougeL | rougeL | 0.4125 | 0.4 | pass | task support: rougeL 0.412 is at least the minimum 0.400 |",
    "| general | perplexity | 0.231 | 0.1 | **FAIL** | general perplexity rose 23.1% (18.2 -&gt; 22.4), above the "
    "limit 10.0% |",
    "| stages.sft.rowsRead | 120 |",
    "| stages.sft.packed | false |",
    "| stages.sft.contentFilters.blocklist.dropped | 3 |",
    "| support | How do I get a refund? | Ask for a refund within 30 days. | I do not know. | Ask for a refund "
    "within 30 days. |",
], ids=["perplexity", "general", "task-metric", "task-negative-delta", "task-check", "gate-pass", "gate-fail",
        "data-int", "data-bool", "data-nested", "sample"])
def test_the_markdown_has_the_expected_table_rows(full_markdown, row):
    assert row in full_markdown


def test_the_markdown_links_the_plots_and_the_html_shows_them():
    files = render(full_report())
    assert set(files) == {"report.md", "report.html", "loss.png", "learning-rate.png"}
    text = files["report.md"].decode()
    assert "![Training and validation loss](loss.png)" in text and "![Learning rate](learning-rate.png)" in text
    html = files["report.html"].decode()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    collected = ElementCollector(html)
    assert [attrs["src"] for tag, attrs in collected.tags if tag == "img"] == ["loss.png", "learning-rate.png"]
    assert ("style", {}) in collected.tags


@pytest.mark.parametrize("changes, present, absent", [
    ({"perplexity": {"base": None, "tuned": 15.0, "ratio": None}, "general": None,
      "tasks": [{**TASK, "metrics": {"rougeL": {"base": None, "tuned": 0.4, "delta": None}}, "checks": {}}],
      "samples": [{**SAMPLE, "base": None}]},
     ["| validation set | perplexity | — | 15.00 | — |", "| task support (40 rows) | rougeL | — | 0.400 | — |",
      "| support | How do I get a refund? | Ask for a refund within 30 days. | — "
      "| Ask for a refund within 30 days. |"],
     ["general text"]),
    ({"tasks": [], "gates": []}, ["No evaluation task was configured.", "No gate was configured."], ["task support"]),
    ({"history": {}}, ["No training history was recorded."], ["loss.png"]),
    ({"history": {"learningRate": HISTORY["learningRate"]}}, ["![Learning rate](learning-rate.png)"], ["loss.png"]),
    ({"perplexity": None, "general": None, "tasks": []}, ["No metric was computed."], ["| Evaluation |"]),
    ({"data": {}, "samples": []}, ["No data report.", "No sample was generated."], ["| Name | Value |"]),
], ids=["no-base", "no-tasks-no-gates", "no-history", "only-learning-rate", "no-metrics", "no-data-no-samples"])
def test_missing_parts_render(changes, present, absent):
    report = full_report(**changes)
    files = render(report)
    text = files["report.md"].decode()
    assert [line for line in present if line not in text.splitlines()] == []
    assert [part for part in absent if part in text] == []
    assert set(files) - {"report.md", "report.html"} == {name for name in ("loss.png", "learning-rate.png")
                                                        if f"({name})" in text}


def test_an_empty_report_renders():
    files = render(ReportInput.from_dict({}))
    assert set(files) == {"report.md", "report.html"}
    assert "**Verdict: ACCEPTED**" in files["report.md"].decode()


@pytest.mark.parametrize("samples_limit, shown", [(8, 8), (3, 3), (0, 0), (20, 12)])
def test_samples_are_limited(samples_limit, shown):
    samples = [{**SAMPLE, "prompt": f"question {i}"} for i in range(12)]
    text, _, _ = rendered(full_report(samples=samples), samples_limit)
    assert [f"| support | question {i} |" in text for i in range(12)] == [i < shown for i in range(12)]


def test_the_data_table_stops_at_60_rows():
    data = {"sources": [{"uri": f"s3://data/{i}.jsonl", "rowsRead": i} for i in range(40)]}
    text, _, _ = rendered(full_report(data=data))
    rows = [line for line in text.splitlines() if line.startswith("| sources.")]
    assert len(rows) == 60
    assert rows[:3] == ["| sources.0.uri | s3://data/0.jsonl |", "| sources.0.rowsRead | 0 |",
                        "| sources.1.uri | s3://data/1.jsonl |"]
    assert "20 more entries are in the data report." in text.splitlines()


@pytest.mark.parametrize("field", ["prompt", "reference", "base", "tuned"])
def test_long_texts_are_cut(field):
    long_text = "word " * 300  # 1500 characters
    text, _, collected = rendered(full_report(samples=[{**SAMPLE, field: long_text}]))
    cell = dict(zip(["task", "prompt", "reference", "base", "tuned"], collected.rows[-1]))[field]
    assert cell == long_text[:TEXT_LIMIT].strip() + "…"
    assert long_text[:TEXT_LIMIT + 10] not in text


# ---- hostile strings ---------------------------------------------------------------------------


HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "</td></tr></table><script>alert(1)</script>",
    "[click](javascript:alert(1))",
    "<http://evil.example/>",
    "![tracker](http://evil.example/pixel.png)",
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    "`code` *bold* _it_ | a | b |",
    "line one\n# heading\n\n<script>alert(1)</script>\n| x | y |",
    "\u202eevil\x00\x1b[31m",
]
HOSTILE_IDS = ["script", "img-onerror", "close-table", "javascript-link", "autolink", "image", "entities",
               "markdown-markers", "newlines", "control-characters"]


@functools.cache
def rendered_hostile(text: str) -> tuple[str, str, ElementCollector]:
    """The report with `text` in every string of the input (cached: two tests read each)."""
    return rendered(full_report(
        job=text, runId=text, modelUri=text, outputUri=text, rejectedReasons=[text],
        tasks=[{**TASK, "name": text, "metrics": {text: {"base": 0.1, "tuned": 0.2, "delta": 0.1}},
                "checks": {text: {"base": 0.1, "tuned": 0.2, "delta": 0.1}}}],
        gates=[{**GATES[0], "name": text, "metric": text, "message": text}],
        data={text: text, "nested": {text: 1}},
        samples=[{"task": text, "prompt": text, "reference": text, "base": text, "tuned": text}],
    ))


@pytest.mark.parametrize("text", HOSTILE, ids=HOSTILE_IDS)
def test_hostile_strings_do_not_inject_html(text):
    _, html, collected = rendered_hostile(text)
    tags = [tag for tag, _ in collected.tags]
    assert "script" not in tags and "a" not in tags
    assert [attrs["src"] for tag, attrs in collected.tags if tag == "img"] == ["loss.png", "learning-rate.png"]
    assert [name for _, attrs in collected.tags for name in attrs if name.startswith("on")] == []
    assert "<script" not in html.lower()
    assert "\u202e" not in html and "\x00" not in html and "\x1b" not in html


@pytest.mark.parametrize("text", HOSTILE, ids=HOSTILE_IDS)
def test_hostile_strings_keep_the_tables_in_shape(text):
    _, _, collected = rendered_hostile(text)
    widths = [len(row) for row in collected.rows]
    # metrics: header, 2 perplexities, 1 metric, 1 check; gates: header, 1; data: header, 2; samples: header, 1
    assert widths == [5] * 5 + [6] * 2 + [2] * 3 + [5] * 2


def test_a_hostile_sample_shows_as_text():
    text, html, collected = rendered(full_report(samples=[{**SAMPLE, "prompt": "a | b\n<script>alert(1)</script>"}]))
    assert "| support | a \\| b ⏎ &lt;script&gt;alert(1)&lt;/script&gt; |" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert collected.rows[-1][1] == "a | b ⏎ <script>alert(1)</script>"  # what the reader sees


def test_a_hostile_job_name_is_escaped_in_the_title():
    _, html, _ = rendered(full_report(job='</title><script>alert(1)</script>'))
    assert "<title>Evaluation report: &lt;/title&gt;&lt;script&gt;alert(1)&lt;/script&gt;</title>" in html
