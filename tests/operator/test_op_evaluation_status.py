"""status.evaluation from evaluation.json: perplexities, the forgetting check, each task's headline metric
(the `Task` column of `kubectl get -o wide`), the report's location; bounded against a hostile document."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import jsonschema
import pytest

from finetune_operator.api import crd
from finetune_operator.status import SANDBOX_ACTIVE, Observation, derive_status
from finetune_trainer.config import EvaluationResult
from op_testdata import job, minimal_spec

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
SUCCEEDED_PTJ = {"metadata": {"name": "train-1"}, "spec": {"runPolicy": {"suspend": False}},
                 "status": {"conditions": [{"type": "Succeeded", "status": "True"}]}}
VALIDATOR = jsonschema.Draft4Validator(crd.openapi_schema())
REPORT = "s3://team-a/models/support-bot/runs/1/report/"


def status_for(document: dict) -> dict:
    evaluation = EvaluationResult.model_validate_json(json.dumps(document))
    status = derive_status(job(), Observation(now=NOW, sandbox="ftj-team-a-support-bot", sandbox_state=SANDBOX_ACTIVE,
                                              applied=True, pytorchjob=SUCCEEDED_PTJ, evaluation=evaluation))
    assert not list(VALIDATOR.iter_errors({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                           "metadata": {"name": "x"}, "spec": minimal_spec(), "status": status}))
    return status.get("evaluation")


def task(name: str = "support", headline: str = "rougeL", **metrics) -> dict:
    return {"name": name, "rows": 64, "headline": headline,
            "metrics": metrics or {"rougeL": {"base": 0.21234, "tuned": 0.45678, "delta": 0.24444},
                                   "bleu": {"base": 0.1, "tuned": 0.2, "delta": 0.1}},
            "checks": {"cites-plan": {"base": 0.5, "tuned": 0.75, "delta": 0.25}}}


# (name, evaluation.json, the expected status.evaluation)
CASES = [
    ("perplexity only", {"basePerplexity": 12.345678, "perplexity": 4.5},
     {"basePerplexity": 12.3457, "perplexity": 4.5}),
    ("a task, the forgetting check and the report",
     {"basePerplexity": 12.0, "perplexity": 4.0, "tasks": [task()],
      "general": {"basePerplexity": 20.0, "perplexity": 21.0, "rise": 0.05}, "reportUri": REPORT},
     {"basePerplexity": 12.0, "perplexity": 4.0, "generalBasePerplexity": 20.0, "generalPerplexity": 21.0,
      "tasks": [{"name": "support", "metric": "rougeL", "base": 0.2123, "tuned": 0.4568, "delta": 0.2444}],
      "headline": "support rougeL 0.457 (+0.244)", "reportUri": REPORT}),
    ("a check as the headline",
     {"tasks": [task(headline="cites-plan")]},
     {"tasks": [{"name": "support", "metric": "cites-plan", "base": 0.5, "tuned": 0.75, "delta": 0.25}],
      "headline": "support cites-plan 0.750 (+0.250)"}),
    ("without the base model",
     {"tasks": [task(exactMatch={"tuned": 0.5}, headline="exactMatch")]},
     {"tasks": [{"name": "support", "metric": "exactMatch", "tuned": 0.5}], "headline": "support exactMatch 0.500"}),
    ("a headline the task does not have is left out",
     {"tasks": [task(headline="bleu-ish"), task(name="billing")]},
     {"tasks": [{"name": "billing", "metric": "rougeL", "base": 0.2123, "tuned": 0.4568, "delta": 0.2444}],
      "headline": "billing rougeL 0.457 (+0.244)"}),
    ("long names are cut", {"tasks": [task(name="t" * 300)]},
     {"tasks": [{"name": "t" * 63, "metric": "rougeL", "base": 0.2123, "tuned": 0.4568, "delta": 0.2444}],
      "headline": ("t" * 63 + " rougeL 0.457 (+0.244)")[:128]}),
]


@pytest.mark.parametrize("name,document,expected", CASES, ids=[c[0] for c in CASES])
def test_status_evaluation_mirrors_the_document(name, document, expected):
    assert status_for(document) == expected


HOSTILE = [
    ("nine tasks", {"tasks": [task()] * 9}),
    ("a non-finite score", '{"tasks": [{"name": "x", "metrics": {"bleu": {"tuned": NaN}}}]}'),
    ("five metrics", {"tasks": [task(a={}, b={}, c={}, d={}, e={})]}),
    ("a score that is not a number", {"tasks": [task(bleu={"tuned": "high"})]}),
]


@pytest.mark.parametrize("name,document", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_documents_are_refused_by_the_model(name, document):
    with pytest.raises(ValueError):
        EvaluationResult.model_validate_json(document if isinstance(document, str) else json.dumps(document))
