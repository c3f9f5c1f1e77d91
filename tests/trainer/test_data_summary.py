"""The data summary in progress.json (config.DataSummary): built from a real data report of
pipeline.prepare, per stage and per dataset, and tolerant of a report that lacks or garbles keys."""

from __future__ import annotations

import json
import random
import uuid

import pytest

from finetune_trainer.config import Dataset, DataSummary, Preprocessing, Progress, StageDataSummary, Validation
from finetune_trainer.data.formats import parse_line
from finetune_trainer.data.pipeline import is_validation_row, prepare
from finetune_trainer.testing import tiny

SPLIT = 0.3
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu amber cobalt ember frost glade harbor").split()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.train_tokenizer()


def _is_held_out(row: dict) -> bool:
    return is_validation_row(parse_line(json.dumps(row), "text", "rows", 1), SPLIT)


def _near_duplicate_pairs(n: int, seed: int) -> tuple[list[dict], int]:
    """n pairs (a 15-word row, the same row with one more word): distinct under normalisation, sharing
    8 of their word 8-grams. Returns the rows and the pairs split across training and validation: the
    held-out row of such a pair leaks from training and must be dropped."""
    rng = random.Random(seed)
    rows, leaks = [], 0
    for i in range(n):
        base = " ".join(rng.choice(WORDS) for _ in range(15))
        pair = [{"text": base}, {"text": f"{base} extra{i}"}]
        rows += pair
        leaks += _is_held_out(pair[0]) != _is_held_out(pair[1])
    return rows, leaks


PII_ROWS = [
    {"text": "mail ops@example.com about the node pool"},
    {"text": "or write to sre.team@example.org and admin@example.net"},
    {"text": "call +1 415-555-0132 now"},
    {"text": "server 10.0.12.7 is down"},
    {"text": "card 4111 1111 1111 1111 expires"},
    {"text": "key AKIAIOSFODNN7EXAMPLE leaked"},
]
DUPLICATES = [
    {"text": "the operator restarts a pod."},
    {"text": "The operator restarts a pod!"},    # normalised duplicate
    {"text": "the operator restarts a pod."},    # exact duplicate
    {"text": "THE   operator restarts a pod"},   # normalised duplicate
]
TOO_SHORT = [{"text": "x"}, {"text": "y"}]


@pytest.fixture(scope="module")
def prepared(storage, tokenizer):
    """One stage of two datasets: a (duplicates, PII, too-short rows, near-duplicate pairs) and b
    (near-duplicate pairs and an exact copy of a row of a), with a held-out split and redaction on."""
    name = f"summary-{uuid.uuid4().hex[:8]}"
    storage.client.create_bucket(Bucket=name)
    pairs_a, leaks_a = _near_duplicate_pairs(20, seed=1)
    pairs_b, leaks_b = _near_duplicate_pairs(20, seed=2)
    rows_a = DUPLICATES + PII_ROWS + TOO_SHORT + pairs_a
    rows_b = pairs_b + [DUPLICATES[0]]
    a = tiny.upload_rows(storage, f"s3://{name}/data/a.jsonl", rows_a)
    b = tiny.upload_rows(storage, f"s3://{name}/data/b.jsonl", rows_b)
    data = prepare(storage, tokenizer, [Dataset(uri=a, format="text"), Dataset(uri=b, format="text", weight=2.0)],
                   Validation(splitRatio=SPLIT),
                   Preprocessing(maxSeqLength=128, minTokens=3, deduplicate=True, redactPII=True), "causal-lm", seed=0)
    return {"data": data, "uris": (a, b), "rows": (len(rows_a), len(rows_b)), "leaks": (leaks_a, leaks_b)}


def test_the_pairs_leak_in_both_datasets(prepared):
    # The fixture is only a test of the overlap counts if some pairs straddle the split.
    assert all(leaks > 0 for leaks in prepared["leaks"])


# (dataset index, field, expected: a value or a function of the fixture)
DATASET_CASES = [
    (0, "rowsRead", lambda p: p["rows"][0]),
    (1, "rowsRead", lambda p: p["rows"][1]),
    (0, "duplicatesExact", 1),
    (0, "duplicatesNormalised", 2),
    (1, "duplicatesExact", 1),          # a copy of a row of dataset a: de-duplication spans the stage
    (1, "duplicatesNormalised", 0),
    (0, "droppedTooShort", 2),
    (1, "droppedTooShort", 0),
    (0, "piiReplaced", {"email": 3, "phone": 1, "ip": 1, "card": 1, "key": 1}),
    (1, "piiReplaced", {"email": 0, "phone": 0, "ip": 0, "card": 0, "key": 0}),
    (0, "validationOverlapDropped", lambda p: p["leaks"][0]),
    (1, "validationOverlapDropped", lambda p: p["leaks"][1]),
    (0, "uri", lambda p: p["uris"][0]),
    (1, "uri", lambda p: p["uris"][1]),
]


@pytest.mark.parametrize("index,name,expected", DATASET_CASES, ids=[f"{c[0]}-{c[1]}" for c in DATASET_CASES])
def test_dataset_counts(prepared, index, name, expected):
    summary = DataSummary.from_report("main", prepared["data"].report)
    dataset = summary.stages[0].datasets[index].model_dump(mode="json")
    assert dataset[name] == (expected(prepared) if callable(expected) else expected)


def test_dataset_counts_agree_with_the_report(prepared):
    report = prepared["data"].report
    for source, dataset in zip(report["sources"], DataSummary.from_report("main", report).stages[0].datasets):
        assert (dataset.rowsKept, dataset.truncated, dataset.validationRows, dataset.trainTokens, dataset.targetTokens) == (
            source["rowsKept"], source["truncated"], source["validationRows"], source["trainTokens"], source["targetTokens"])
        dropped = (dataset.droppedTooShort + dataset.duplicatesExact + dataset.duplicatesNormalised
                   + dataset.validationOverlapDropped)
        assert dropped == sum(source["dropped"].values()) == dataset.rowsRead - dataset.rowsKept


def test_stage_totals(prepared):
    data, (leaks_a, leaks_b) = prepared["data"], prepared["leaks"]
    stage = DataSummary.from_report("main", data.report).stages[0]
    assert stage.stage == "main" and stage.packed is False
    assert stage.rowsRead == sum(prepared["rows"])
    assert stage.rowsDropped == 1 + 2 + 2 + 1 + leaks_a + leaks_b
    assert stage.trainSequences == len(data.train) and stage.validationSequences == len(data.validation)
    assert stage.trainTokens == sum(len(s) for s in data.train) > 0
    assert stage.targetTokens == data.report["targetTokens"]
    assert stage.validationOverlap.rowsDropped == leaks_a + leaks_b
    assert stage.validationOverlap.rowsChecked == stage.validationSequences + leaks_a + leaks_b
    assert stage.validationOverlap.rowsOverlapping >= leaks_a + leaks_b


def test_progress_carries_the_summary_through_json(prepared):
    """What ProgressReporter does: model_copy(update=...) then model_dump(mode="json"); the operator reads it back."""
    summary = DataSummary.from_reports({"sft": prepared["data"].report, "dpo": prepared["data"].report})
    progress = Progress().model_copy(update={"data": summary})
    document = json.loads(json.dumps(progress.model_dump(mode="json")))
    assert Progress.model_validate(document).data == summary
    assert [s["stage"] for s in document["data"]["stages"]] == ["sft", "dpo"]


def _report(**overrides) -> dict:
    source = {"uri": "s3://b/a.jsonl", "rowsRead": 10, "rowsKept": 7, "dropped": {"too-short": 1, "no-trainable-tokens": 1,
                                                                                 "duplicate-exact": 1}}
    return {"sources": [source], "rowsRead": 10, "rowsDropped": 3, **overrides}


# (report, what the summary of its one stage must hold)
TOLERANT_CASES = [
    ({}, {"rowsRead": 0, "datasets": [], "validationOverlap": {"rowsChecked": 0, "rowsOverlapping": 0, "rowsDropped": 0}}),
    (None, {"rowsRead": 0, "datasets": []}),
    (_report(), {"rowsRead": 10, "rowsDropped": 3}),
    (_report(rowsRead=-5), {"rowsRead": 0}),
    (_report(rowsRead=10**30), {"rowsRead": 2**53}),
    (_report(rowsRead=float("nan"), trainTokens=float("inf")), {"rowsRead": 0, "trainTokens": 0}),
    (_report(rowsRead="10", packed="yes"), {"rowsRead": 0, "packed": False}),
    (_report(packed=True), {"packed": True}),
    (_report(sources="not a list"), {"datasets": []}),
    (_report(sources=[{}] * 40), {"datasets": [{"uri": ""} for _ in range(32)]}),
    (_report(sources=[{"uri": "s3://b/" + "k" * 5000}]), {"datasets": [{"uri": "s3://b/" + "k" * 1017}]}),
    (_report(sources=[{"dropped": {"too-short": 2, "no-trainable-tokens": 3, "weird": 9}, "piiRedacted": {"email": 2, "ssn": 4}}]),
     {"datasets": [{"droppedTooShort": 5, "piiReplaced": {"email": 2, "phone": 0, "ip": 0, "card": 0, "key": 0}}]}),
    (_report(sources=[{"dropped": [1, 2], "piiRedacted": "many"}]), {"datasets": [{"droppedTooShort": 0}]}),
    (_report(validation={"overlap": {"rowsChecked": 5, "rowsOverlapping": 2, "rowsDropped": 1, "gramWords": 8}}),
     {"validationOverlap": {"rowsChecked": 5, "rowsOverlapping": 2, "rowsDropped": 1}}),
    (_report(contentFilters={"no-keys": {"rowsDropped": 3, "rowsFlagged": 0, "examples": ["x"]},
                             "toxic": {"rowsFlagged": 2}, "junk": "not an object"}),
     {"contentFilters": [{"name": "no-keys", "rowsDropped": 3, "rowsFlagged": 0},
                         {"name": "toxic", "rowsDropped": 0, "rowsFlagged": 2},
                         {"name": "junk", "rowsDropped": 0, "rowsFlagged": 0}]}),
    (_report(contentFilters=[1, 2]), {"contentFilters": []}),
    (_report(contentFilters={f"f{i}": {"rowsDropped": i} for i in range(20)}),
     {"contentFilters": [{"name": f"f{i}", "rowsDropped": i} for i in range(16)]}),
    (_report(sources=[{"dropped": {"content-filter": 4},
                       "contentFilters": {"a": {"rowsFlagged": 2}, "b": {"rowsFlagged": 3}, "c": None}}]),
     {"datasets": [{"droppedByContentFilters": 4, "flaggedByContentFilters": 5}]}),
]


def _subset(actual, expected) -> bool:
    if isinstance(expected, dict):
        return all(_subset(actual[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(_subset(a, e) for a, e in zip(actual, expected))
    return actual == expected


@pytest.mark.parametrize("report,expected", TOLERANT_CASES)
def test_from_report_is_tolerant(report, expected):
    stage = StageDataSummary.from_report("main", report).model_dump(mode="json")
    assert _subset(stage, expected), stage


def test_from_reports_keeps_the_stage_order_and_at_most_16_stages():
    summary = DataSummary.from_reports({f"stage-{i}": _report() for i in range(20)})
    assert [s.stage for s in summary.stages] == [f"stage-{i}" for i in range(16)]
    assert DataSummary.from_reports({}).stages == []
