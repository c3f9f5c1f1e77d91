"""status.data: the trainer's data summary (progress.json `data`) copied into the FineTuneJob's status,
bounded against a hostile document, carried over like progress and reset with a new run."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import jsonschema
import pytest

from finetune_operator.api import crd
from finetune_operator.status import SANDBOX_ACTIVE, Observation, changed, derive_status
from finetune_trainer.config import DatasetSummary, DataSummary, PiiCounts, Progress, StageDataSummary
from op_testdata import job, minimal_spec

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
RUNNING_PTJ = {"metadata": {"name": "train-1"}, "spec": {"runPolicy": {"suspend": False}},
               "status": {"conditions": [{"type": "Running", "status": "True"}]}}
VALIDATOR = jsonschema.Draft4Validator(crd.openapi_schema())

ZERO_PII = {"email": 0, "phone": 0, "ip": 0, "card": 0, "key": 0}
DATASET = {"uri": "s3://team-a/data/support.jsonl", "rowsRead": 1000, "rowsKept": 930, "droppedTooShort": 12,
           "truncated": 40, "duplicatesExact": 30, "duplicatesNormalised": 20,
           "piiReplaced": {"email": 7, "phone": 2, "ip": 1, "card": 0, "key": 3},
           "validationRows": 45, "validationOverlapDropped": 8, "trainTokens": 120_000, "targetTokens": 80_000,
           "droppedByContentFilters": 5, "flaggedByContentFilters": 2}
FILTERS = [{"name": "no-secrets", "rowsDropped": 5, "rowsFlagged": 0}, {"name": "toxicity", "rowsDropped": 0, "rowsFlagged": 2}]
STAGE = {"stage": "main", "rowsRead": 1000, "rowsDropped": 70, "trainSequences": 885, "validationSequences": 45,
         "trainTokens": 120_000, "targetTokens": 80_000,
         "validationOverlap": {"rowsChecked": 53, "rowsOverlapping": 11, "rowsDropped": 8},
         "packed": False, "datasets": [DATASET], "contentFilters": FILTERS}


def obs(progress: Progress | None = None, **kw) -> Observation:
    return Observation(**{"now": NOW, "sandbox": "ftj-team-a-support-bot", "sandbox_state": SANDBOX_ACTIVE,
                          "applied": True, "pytorchjob": RUNNING_PTJ, "progress": progress, **kw})


def progress_with(data: dict | None) -> Progress:
    """progress.json as the operator reads it (parsed and validated from JSON)."""
    document = {"stage": "main", "step": 5, "totalSteps": 10, "updatedAt": "2026-01-01T11:59:58Z"}
    if data is not None:
        document["data"] = data
    return Progress.model_validate_json(json.dumps(document))


def stage(**overrides) -> dict:
    return {**STAGE, **overrides}


def dataset(**overrides) -> dict:
    return {**DATASET, **overrides}


# (name, progress.json's data, the expected status.data; None: no status.data)
MAPPING_CASES = [
    ("no data yet", None, None),
    ("no stages", {"stages": []}, {"stages": []}),
    ("one stage, one dataset", {"stages": [STAGE]}, {"stages": [STAGE]}),
    ("missing counts are zero", {"stages": [{"stage": "sft", "datasets": [{"uri": "s3://b/x"}]}]},
     {"stages": [{"stage": "sft", "rowsRead": 0, "rowsDropped": 0, "trainSequences": 0, "validationSequences": 0,
                  "trainTokens": 0, "targetTokens": 0,
                  "validationOverlap": {"rowsChecked": 0, "rowsOverlapping": 0, "rowsDropped": 0}, "packed": False,
                  "datasets": [{"uri": "s3://b/x", "rowsRead": 0, "rowsKept": 0, "droppedTooShort": 0, "truncated": 0,
                                "duplicatesExact": 0, "duplicatesNormalised": 0, "piiReplaced": ZERO_PII,
                                "validationRows": 0, "validationOverlapDropped": 0, "trainTokens": 0,
                                "targetTokens": 0, "droppedByContentFilters": 0, "flaggedByContentFilters": 0}],
                  "contentFilters": []}]}),
    ("two stages in order", {"stages": [stage(stage="sft"), stage(stage="dpo", packed=True, datasets=[])]},
     {"stages": [stage(stage="sft"), stage(stage="dpo", packed=True, datasets=[])]}),
    ("content filters in the order of the report",
     {"stages": [stage(contentFilters=list(reversed(FILTERS)) + [{"name": "empty"}])]},
     {"stages": [stage(contentFilters=list(reversed(FILTERS)) + [{"name": "empty", "rowsDropped": 0, "rowsFlagged": 0}])]}),
    ("unknown fields are dropped",
     {"stages": [stage(extra="x", datasets=[dataset(format="chat", piiRedacted={"ssn": 4},
                                                     piiReplaced={**DATASET["piiReplaced"], "ssn": 4})])]},
     {"stages": [STAGE]}),
    ("a long uri is cut to 256 characters in the status",
     {"stages": [stage(datasets=[dataset(uri="s3://b/" + "k" * 5000)])]},
     {"stages": [stage(datasets=[dataset(uri=("s3://b/" + "k" * 5000)[:256])])]}),
    ("a long stage name is cut to 63 characters", {"stages": [stage(stage="s" * 1000)]}, {"stages": [stage(stage="s" * 63)]}),
    ("the largest count stays", {"stages": [stage(trainTokens=2**53)]}, {"stages": [stage(trainTokens=2**53)]}),
]


@pytest.mark.parametrize("name,data,expected", MAPPING_CASES, ids=[c[0] for c in MAPPING_CASES])
def test_status_data_mirrors_the_summary(name, data, expected):
    status = derive_status(job(), obs(progress_with(data)))
    assert status.get("data") == expected
    assert not list(VALIDATOR.iter_errors({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                           "metadata": {"name": "x"}, "spec": minimal_spec(), "status": status}))


# progress.json data the trainer's model refuses: the document is ignored (as for any out-of-bounds progress)
REFUSED = [
    ("count above 2^53", {"stages": [stage(rowsRead=2**53 + 1)]}),
    ("huge count", {"stages": [stage(datasets=[dataset(trainTokens=10**30)])]}),
    ("negative count", {"stages": [stage(rowsDropped=-1)]}),
    ("negative pii count", {"stages": [stage(datasets=[dataset(piiReplaced={"email": -3})])]}),
    ("fractional count", {"stages": [stage(trainSequences=1.5)]}),
    ("a string count", {"stages": [stage(rowsRead="many")]}),
    ("17 stages", {"stages": [STAGE] * 17}),
    ("33 datasets", {"stages": [stage(datasets=[DATASET] * 33)]}),
    ("stages not a list", {"stages": {"main": STAGE}}),
    ("piiReplaced not an object", {"stages": [stage(datasets=[dataset(piiReplaced=[1, 2])])]}),
    ("17 content filters", {"stages": [stage(contentFilters=FILTERS[:1] * 17)]}),
    ("negative filter count", {"stages": [stage(contentFilters=[{"name": "x", "rowsDropped": -1}])]}),
]


@pytest.mark.parametrize("name,data", REFUSED, ids=[c[0] for c in REFUSED])
def test_hostile_data_is_refused_by_the_document_model(name, data):
    with pytest.raises(ValueError):
        progress_with(data)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_counts_are_refused(constant):
    document = json.dumps({"data": {"stages": [stage(rowsRead=0)]}}).replace('"rowsRead": 0', f'"rowsRead": {constant}')
    with pytest.raises(ValueError):
        Progress.model_validate_json(document)


def test_a_summary_built_without_validation_is_clamped():
    """Bounds hold in the status even for a model that skipped validation (model_construct)."""
    bad = DatasetSummary.model_construct(uri="s3://b/" + "k" * 5000, rowsRead=10**30, rowsKept=-4, droppedTooShort=True,
                                         truncated="3", duplicatesExact=0, duplicatesNormalised=0,
                                         piiReplaced=PiiCounts.model_construct(email=10**20, phone=-1, ip=0, card=0, key=0),
                                         validationRows=0, validationOverlapDropped=0, trainTokens=0, targetTokens=0)
    summary = DataSummary.model_construct(stages=[StageDataSummary.model_construct(
        stage="x" * 500, rowsRead=2**60, rowsDropped=-1, trainSequences=0, validationSequences=0, trainTokens=0,
        targetTokens=0, validationOverlap=StageDataSummary.model_fields["validationOverlap"].default_factory(),
        packed="yes", datasets=[bad] * 40)] * 20)
    status = derive_status(job(), obs(Progress.model_construct(**{**progress_with(None).__dict__, "data": summary})))
    stages = status["data"]["stages"]
    assert len(stages) == 16 and all(len(s["datasets"]) == 32 for s in stages)
    first, data = stages[0], stages[0]["datasets"][0]
    assert (first["stage"], first["rowsRead"], first["rowsDropped"], first["packed"]) == ("x" * 63, 2**53, 0, False)
    assert (len(data["uri"]), data["rowsRead"], data["rowsKept"], data["droppedTooShort"], data["truncated"]) == (256, 2**53, 0, 0, 0)
    assert data["piiReplaced"] == {**ZERO_PII, "email": 2**53}


def test_data_is_carried_over_when_progress_is_not_read_and_reset_by_a_new_run():
    first = derive_status(job(), obs(progress_with({"stages": [STAGE]})))
    unread = derive_status(job(status=first), obs(None))
    assert unread["data"] == first["data"] == {"stages": [STAGE]}
    without = derive_status(job(status=first), obs(progress_with(None)))  # a document without data keeps the last
    assert without["data"] == first["data"]
    rerun = derive_status(job(minimal_spec(runId="2"), status=first, generation=2), obs(None, pytorchjob=None))
    assert "data" not in rerun


def test_the_status_is_only_written_when_the_data_changed():
    first = derive_status(job(), obs(progress_with({"stages": [STAGE]})))
    again = derive_status(job(status=first), obs(progress_with({"stages": [STAGE]})))
    assert not changed(first, again)
    more = derive_status(job(status=first), obs(progress_with({"stages": [stage(rowsDropped=71)]})))
    assert changed(first, more) and more["data"]["stages"][0]["rowsDropped"] == 71


def test_each_datasets_training_loss_is_in_the_status_bounded():
    """Interleaved multi-task: progress.json's datasetLosses become status.progress.datasetLosses, rounded, with
    URIs cut to the status' bound, and the status still validates against the CRD's schema."""
    long_uri = "s3://team-a/" + "d" * 400 + ".jsonl"
    progress = Progress.model_validate_json(json.dumps({
        "stage": "main", "step": 6, "totalSteps": 10, "updatedAt": "2026-01-01T11:59:58Z",
        "datasetLosses": [{"stage": "main", "index": 0, "uri": "s3://team-a/data/support.jsonl", "loss": 2.123456,
                           "step": 6, "steps": 4},
                          {"stage": "main", "index": 1, "uri": long_uri, "loss": None, "step": 0, "steps": 0}]}))
    status = derive_status(job(minimal_spec()), obs(progress))
    losses = status["progress"]["datasetLosses"]
    assert losses[0] == {"stage": "main", "index": 0, "uri": "s3://team-a/data/support.jsonl", "loss": 2.1235,
                         "steps": 4}
    assert "loss" not in losses[1] and len(losses[1]["uri"]) == 256
    VALIDATOR.validate({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"},
                        "spec": minimal_spec(), "status": status})
    assert "datasetLosses" not in derive_status(job(minimal_spec()), obs(progress_with(None)))["progress"]
