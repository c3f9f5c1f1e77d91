"""The search report: its JSON document, its Markdown and its plot, from a search's status."""

from __future__ import annotations

import io
import json
import math

import pytest
from PIL import Image

from finetune_operator.api.search import Search
from finetune_operator.search import report

SEARCH = Search.model_validate({
    "parameters": {"loraRank": {"values": [8, 16]}, "learningRate": {"min": 1e-5, "max": 1e-3, "scale": "log"}},
    "trials": 4, "parallelism": 2, "strategy": "random", "seed": 7,
})


def trial(number, phase, value=None, history=(), lr=1e-4, rank=8.0, **extra):
    return {"number": number, "phase": phase, "value": value, "parameters": {"learningRate": lr, "loraRank": rank},
            "history": [{"step": s, "value": v} for s, v in history],
            "step": history[-1][0] if history else 0, "pruned": phase == "Pruned", **extra}


STATUS = {
    "metric": "evalLoss", "planned": 4, "succeeded": 1, "pruned": 1, "failed": 1, "running": 1,
    "trials": [
        trial(2, "Failed", message="OOMKilled"),
        trial(0, "Succeeded", 1.5, [(2, 2.0), (4, 1.7), (6, 1.5)], lr=3e-4, rank=16.0),
        trial(1, "Pruned", None, [(2, 2.6), (4, 2.5)], lr=1e-5),
        trial(3, "Running", None, [(2, 2.1)]),
    ],
    "best": {"number": 0, "value": 1.5, "parameters": {"learningRate": 3e-4, "loraRank": 16.0}},
}


@pytest.fixture
def document():
    return report.report_document("tune", "r1", SEARCH, STATUS, "s3://bucket/out/")


def test_the_document_has_the_search_its_trials_and_the_promotion(document):
    assert {k: document[k] for k in ("job", "runId", "metric", "direction", "strategy", "seed", "planned")} == {
        "job": "tune", "runId": "r1", "metric": "evalLoss", "direction": "minimize", "strategy": "random",
        "seed": 7, "planned": 4}
    assert [t["number"] for t in document["trials"]] == [0, 1, 2, 3]
    assert [t["phase"] for t in document["trials"]] == ["Succeeded", "Pruned", "Failed", "Running"]
    assert document["trials"][0]["history"] == [{"step": 2, "value": 2.0}, {"step": 4, "value": 1.7},
                                                {"step": 6, "value": 1.5}]
    assert document["trials"][2]["message"] == "OOMKilled"
    assert document["parameters"] == ["learningRate", "loraRank"]  # the API's order
    assert document["counts"] == {"Pending": 0, "Running": 1, "Succeeded": 1, "Pruned": 1, "Failed": 1}
    assert document["best"] == {"number": 0, "value": 1.5, "parameters": {"learningRate": 3e-4, "loraRank": 16.0}}
    assert document["promotedFrom"] == "s3://bucket/out/trials/t0/"
    assert document["promotedTo"] == "s3://bucket/out/"
    assert json.loads(json.dumps(document, allow_nan=False)) == document


@pytest.mark.parametrize("best, promoted_uri, expected", [
    (STATUS["best"], "s3://bucket/out", ("s3://bucket/out/trials/t0/", "s3://bucket/out")),
    (STATUS["best"], "", (None, None)),          # not promoted (yet)
    (None, "s3://bucket/out/", (None, None)),     # no trial finished: nothing to promote
])
def test_promoted_from_and_to(best, promoted_uri, expected):
    document = report.report_document("tune", "r1", SEARCH, {**STATUS, "best": best}, promoted_uri)
    assert (document["promotedFrom"], document["promotedTo"]) == expected


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_values_that_are_not_finite_are_null_so_the_document_is_json(bad):
    status = {**STATUS, "trials": [trial(0, "Succeeded", bad, [(2, bad), (4, 1.0)], lr=bad)],
              "best": {"number": 0, "value": bad, "parameters": {}}}
    document = report.report_document("tune", "r1", SEARCH, status, "s3://b/o/")
    only = document["trials"][0]
    assert only["value"] is None and only["parameters"]["learningRate"] is None
    assert only["history"] == [{"step": 2, "value": None}, {"step": 4, "value": 1.0}]
    assert document["best"]["value"] is None
    json.dumps(document, allow_nan=False)


@pytest.mark.parametrize("broken", [
    {"number": -1, "phase": "Running"},
    {"number": 5, "phase": "Exploded"},
    {"number": 5, "history": "not a list"},
    "not a trial",
])
def test_a_trial_that_does_not_validate_is_left_out(broken):
    status = {**STATUS, "trials": [*STATUS["trials"], broken]}
    document = report.report_document("tune", "r1", SEARCH, status, "")
    assert [t["number"] for t in document["trials"]] == [0, 1, 2, 3]


def test_an_empty_status_is_an_empty_report():
    document = report.report_document("tune", "r1", SEARCH, {}, "s3://b/o/")
    assert document["trials"] == [] and document["best"] is None and document["planned"] == 0
    assert "nothing was promoted" in report.markdown(document)
    assert report.plot_png(document).startswith(b"\x89PNG\r\n\x1a\n")


def test_markdown_summary_table_best_and_plot_link(document):
    text = report.markdown(document)
    lines = text.splitlines()
    assert lines[0] == "# Hyperparameter search of tune (run r1)"
    assert ("4 of 4 planned trials: 1 succeeded, 1 pruned, 1 failed, 1 running. Metric: evalLoss (minimize); "
            "strategy: random; seed: 7.") in lines
    table = lines[lines.index("| Trial | learningRate | loraRank | Phase | evalLoss | Step |"):][:6]
    assert table[2:] == [
        "| 0 (best) | 0.0003 | 16 | Succeeded | 1.5 | 6 |",
        "| 1 | 1e-05 | 8 | Pruned | — | 4 |",
        "| 2 | 0.0001 | 8 | Failed | — | 0 |",
        "| 3 | 0.0001 | 8 | Running | — | 2 |",
    ]
    assert "Trial 0: evalLoss = 1.5 with learningRate = 0.0003, loraRank = 16." in lines
    assert "Its output was promoted from s3://bucket/out/trials/t0/ to s3://bucket/out/." in lines
    assert "![evalLoss per trial at each validation step](search-validation.png)" in lines


@pytest.mark.parametrize("text, escaped", [
    ("s3://b/a|b", "s3://b/a\\|b"),
    ("two\nlines", "two lines"),
    ("[link](x)", "\\[link\\](x)"),
    ("<script>", "\\<script\\>"),
    ("my_bucket", "my\\_bucket"),
])
def test_text_from_the_status_cannot_break_the_markdown(text, escaped):
    document = report.report_document("tune", "r1", SEARCH, STATUS, text)
    assert f"to {escaped}." in report.markdown(document)


def test_the_plot_is_a_png_of_one_line_per_trial_with_values(document):
    png = report.plot_png(document)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(io.BytesIO(png)).size == (800, 500)
    assert report.plot_png(document) == png  # the same document, the same bytes


def test_pruned_trials_are_dashed_and_the_best_is_highlighted(document):
    axes = report.validation_figure(document).axes[0]
    lines = {line.get_label(): line for line in axes.lines if not line.get_label().startswith("_")}
    assert set(lines) == {"trial 0 (best)", "trial 1", "trial 3"}  # trial 2 failed without a value
    assert list(lines["trial 0 (best)"].get_xdata()) == [2, 4, 6]
    assert list(lines["trial 1"].get_ydata()) == [2.6, 2.5]
    assert lines["trial 1"].get_linestyle() == "--" and lines["trial 3"].get_linestyle() == "-"
    assert lines["trial 0 (best)"].get_linewidth() > max(lines["trial 1"].get_linewidth(),
                                                         lines["trial 3"].get_linewidth())
    assert axes.get_yscale() == "linear"


def test_a_trial_with_a_value_but_no_history_is_one_point():
    status = {"trials": [trial(0, "Succeeded", 1.2)], "best": {"number": 0, "value": 1.2}}
    axes = report.validation_figure(report.report_document("tune", "r1", SEARCH, status, "")).axes[0]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines] == [([0], [1.2])]


def test_many_trials_name_only_the_best_and_a_diverged_one_makes_the_scale_log():
    trials = [trial(n, "Succeeded", 1.0 + n, [(1, 2.0 + n), (2, 1.0 + n)]) for n in range(30)]
    trials.append(trial(30, "Pruned", None, [(1, 1e4)]))
    status = {"trials": trials, "best": {"number": 0, "value": 1.0}}
    axes = report.validation_figure(report.report_document("tune", "r1", SEARCH, status, "")).axes[0]
    assert axes.get_legend_handles_labels()[1] == ["trial 0 (best)"]
    assert axes.get_yscale() == "log"
