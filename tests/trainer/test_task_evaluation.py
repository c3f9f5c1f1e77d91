"""evaluation.tasks and evaluation.general in a run on the tiny model: base and tuned answers scored, the
forgetting check, gates that pass and gates that reject (outputs kept, marked rejected), the report in S3."""

from __future__ import annotations

import json
import re

import pytest
from conftest import make_config, upload_dataset

from finetune_trainer import config as cfg
from finetune_trainer import exit_codes, validation
from finetune_trainer.errors import ConfigError, EvaluationGateFailed
from finetune_trainer.run import enforce_gates, execute
from finetune_trainer.testing import tiny


def task_config(storage, model_bucket, bucket, s3_endpoint, method: dict | None = None, **evaluation):
    train = upload_dataset(storage, bucket, "train", "instruction", 48, seed=0)
    held_out = tiny.upload_rows(storage, f"{bucket}eval/support.jsonl", tiny.sample_rows("instruction", 10, seed=7))
    general = tiny.upload_rows(storage, f"{bucket}eval/general.jsonl", tiny.sample_rows("text", 12, seed=8))
    settings = {"compareToBase": True, "maxSamples": 16,
                "tasks": [{"name": "support", "uri": held_out, "maxSamples": 6, "maxNewTokens": 12,
                           "checks": [{"name": "says-the", "contains": "the"}]}],
                "general": {"uri": general, "maxSamples": 8}, "reportSamples": 2, **evaluation}
    return make_config(bucket, model_bucket + "llama/", s3_endpoint, [train], evaluation=settings,
                       hyperparameters={"maxSteps": 10, "learningRate": 1e-2, "batchSize": 4},
                       **({"method": method} if method else {}))


def test_tasks_and_forgetting_are_measured_for_base_and_tuned_and_reported(storage, model_bucket, bucket,
                                                                          s3_endpoint, tmp_path):
    config = task_config(storage, model_bucket, bucket, s3_endpoint)
    summary = execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    out = config.output.uri
    evaluation = cfg.EvaluationResult.model_validate(storage.get_json(cfg.evaluation_uri(out, "1")))

    [task] = evaluation.tasks
    assert (task.name, task.rows, task.headline) == ("support", 6, "exactMatch")
    assert set(task.metrics) == {"exactMatch", "tokenF1", "rougeL", "bleu"} and set(task.checks) == {"says-the"}
    for pair in [*task.metrics.values(), *task.checks.values()]:
        assert 0 <= pair.base <= 1 and 0 <= pair.tuned <= 1
        assert pair.delta == pytest.approx(pair.tuned - pair.base)
    # the tiny model learns the instruction rows' answers: the tuned answers overlap the references more
    assert task.metrics["tokenF1"].tuned > task.metrics["tokenF1"].base

    general = evaluation.general
    assert general.basePerplexity > 0 and general.perplexity > 0
    assert general.rise == pytest.approx(general.perplexity / general.basePerplexity - 1)
    assert evaluation.gates == [] and evaluation.passed
    assert evaluation.reportUri == cfg.report_uri(out, "1")

    files = {uri.rsplit("/", 1)[1] for uri in storage.list_keys(evaluation.reportUri)}
    assert {"report.md", "report.html", "loss.png", "learning-rate.png"} <= files
    markdown = storage.get_bytes(evaluation.reportUri + "report.md").decode()
    assert "ACCEPTED" in markdown and "support" in markdown and "tokenF1" in markdown
    assert storage.get_bytes(evaluation.reportUri + "loss.png").startswith(b"\x89PNG")
    card = storage.get_bytes(cfg.adapter_uri(out) + "README.md").decode()
    assert evaluation.reportUri in card and "| support tokenF1 |" in card


def test_a_failed_task_gate_rejects_the_run_naming_metric_value_and_limit(storage, model_bucket, bucket, s3_endpoint,
                                                                         tmp_path):
    held = {"tasks": [{"name": "support", "uri": f"{bucket}eval/support.jsonl", "maxSamples": 4, "maxNewTokens": 8,
                       "gate": {"metric": "rougeL", "minScore": 1.0}}],
            "general": {"uri": f"{bucket}eval/general.jsonl", "maxSamples": 8, "maxPerplexityRise": 100}}
    config = task_config(storage, model_bucket, bucket, s3_endpoint, **held)
    summary = execute(config, tmp_path)
    assert summary.exit_code == exit_codes.EVALUATION_GATE_FAILED
    result = storage.get_json(cfg.result_uri(config.output.uri, "1"))
    assert result["reason"] == "EvaluationGateFailed"
    assert "task support: rougeL" in result["message"] and "below the minimum 1.000" in result["message"]
    evaluation = storage.get_json(cfg.evaluation_uri(config.output.uri, "1"))
    assert [(g["name"], g["passed"]) for g in evaluation["gates"]] == [
        ("general maxPerplexityRise", True), ("task support minScore", False)]
    card = storage.get_bytes(cfg.adapter_uri(config.output.uri) + "README.md").decode()
    assert "Rejected by the evaluation gates" in card and "rejected]" in card


def test_without_compare_to_base_only_the_tuned_model_is_scored(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    config = task_config(storage, model_bucket, bucket, s3_endpoint, compareToBase=False)
    summary = execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    evaluation = cfg.EvaluationResult.model_validate(storage.get_json(cfg.evaluation_uri(config.output.uri, "1")))
    pair = evaluation.tasks[0].metrics["rougeL"]
    assert pair.base is None and pair.delta is None and pair.tuned is not None
    # the forgetting check always measures the base model: it is what "forgot" compares with
    assert evaluation.general.basePerplexity is not None


RULE_CASES = [
    ("gate on an unknown metric", {"tasks": [{"name": "t", "uri": "s3://bkt/t.jsonl", "metrics": ["bleu"],
                                             "gate": {"metric": "rougeL", "minScore": 0.1}}]},
     "gate.metric: 'rougeL' is not one of the task's metrics or checks"),
    ("gate without a limit", {"tasks": [{"name": "t", "uri": "s3://bkt/t.jsonl", "gate": {"metric": "bleu"}}]},
     "gate: set minScore, minGain or both"),
    ("task scoring nothing", {"tasks": [{"name": "t", "uri": "s3://bkt/t.jsonl", "metrics": []}]},
     "tasks[0].metrics: a task needs at least one metric or one check: with metrics [] and no checks nothing is "
     "scored"),
    ("task scoring nothing, checks empty", {"tasks": [{"name": "t", "uri": "s3://bkt/t.jsonl", "metrics": [],
                                                       "checks": []}]},
     "tasks[0].metrics: a task needs at least one metric or one check"),
    ("two tasks of one name", {"tasks": [{"name": "t", "uri": "s3://bkt/t.jsonl"}, {"name": "t", "uri": "s3://bkt/u.jsonl"}]},
     "tasks[1].name: 't' is already used"),
    ("check with both", {"tasks": [{"name": "t", "uri": "s3://bkt/t.jsonl",
                                    "checks": [{"name": "c", "contains": "x", "pattern": "y"}]}]},
     "checks[0]: set exactly one of contains and pattern"),
    ("check named like a metric", {"tasks": [{"name": "t", "uri": "s3://bkt/t.jsonl",
                                              "checks": [{"name": "bleu", "contains": "x"}]}]},
     "checks[0].name: 'bleu' is the name of a metric"),
    ("gain without the base", {"compareToBase": False, "tasks": [{"name": "t", "uri": "s3://bkt/t.jsonl",
                                                                  "gate": {"metric": "bleu", "minGain": 0.1}}]},
     "tasks[0].gate.minGain needs evaluation.compareToBase true"),
]


@pytest.mark.parametrize("name,evaluation,message", RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_rules_of_task_evaluation(name, evaluation, message):
    config = make_config("s3://bkt/", "s3://bkt/model/", "", [{"uri": "s3://bkt/d.jsonl", "format": "chat"}],
                         evaluation=evaluation)
    with pytest.raises(ConfigError, match=None) as raised:
        validation.check(config)
    assert message in str(raised.value)


def test_a_catastrophic_check_pattern_is_refused_by_the_model():
    with pytest.raises(ValueError, match="nests unbounded repetitions"):
        cfg.AnswerCheck.model_validate({"name": "c", "pattern": "(a+)+$"})
    json.dumps(cfg.AnswerCheck.model_validate({"name": "c", "pattern": "a++"}).model_dump())


def test_an_evaluate_only_job_scores_an_adapter_against_its_base_without_training(storage, model_bucket, bucket,
                                                                                  s3_endpoint, tmp_path):
    """evaluation.only: the candidate adapter (here: one trained by a first run) against the base model."""
    trained = task_config(storage, model_bucket, bucket, s3_endpoint)
    assert execute(trained, tmp_path / "train").exit_code == 0
    adapter = cfg.adapter_uri(trained.output.uri)
    evaluation = {**trained.evaluation.model_dump(mode="json", exclude_none=True), "only": True}
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [], method={"type": "lora",
                         "adapter": {"uri": adapter}}, evaluation=evaluation, output={"uri": bucket + "candidate/"})
    summary = execute(config, tmp_path / "evaluate")
    assert summary.exit_code == 0, summary.result.message
    result = storage.get_json(cfg.result_uri(config.output.uri, "1"))
    assert result["succeeded"] and "no training" in result["message"] and not result.get("adapterUri")
    alone = cfg.EvaluationResult.model_validate(storage.get_json(cfg.evaluation_uri(config.output.uri, "1")))
    after = cfg.EvaluationResult.model_validate(storage.get_json(cfg.evaluation_uri(trained.output.uri, "1")))
    # the same adapter on the same rows: the scores the training run measured after its last step
    assert alone.tasks[0].metrics["tokenF1"].tuned == pytest.approx(after.tasks[0].metrics["tokenF1"].tuned)
    assert alone.tasks[0].metrics["tokenF1"].base == pytest.approx(after.tasks[0].metrics["tokenF1"].base)
    assert alone.general.perplexity == pytest.approx(after.general.perplexity, rel=1e-4)
    assert alone.perplexity is None and not storage.list_keys(cfg.adapter_uri(config.output.uri))
    assert "report.md" in {u.rsplit("/", 1)[1] for u in storage.list_keys(alone.reportUri)}


def test_an_evaluate_only_job_scores_a_whole_model_against_its_base(storage, model_bucket, bucket, s3_endpoint,
                                                                     tmp_path):
    """evaluation.candidateModel: a full fine-tune's weights (written by a first run) against the base model."""
    trained = task_config(storage, model_bucket, bucket, s3_endpoint, method={"type": "full"})
    assert execute(trained, tmp_path / "train").exit_code == 0
    evaluation = {**trained.evaluation.model_dump(mode="json", exclude_none=True), "only": True,
                  "candidateModel": {"uri": cfg.merged_uri(trained.output.uri)}}
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [], method={"type": "full"},
                         evaluation=evaluation, output={"uri": bucket + "candidate-model/"})
    summary = execute(config, tmp_path / "evaluate")
    assert summary.exit_code == 0, summary.result.message
    result = storage.get_json(cfg.result_uri(config.output.uri, "1"))
    assert result["message"] == (f"evaluated {cfg.merged_uri(trained.output.uri)} against {model_bucket}llama/ "
                                 "(no training)")
    alone = cfg.EvaluationResult.model_validate(storage.get_json(cfg.evaluation_uri(config.output.uri, "1")))
    after = cfg.EvaluationResult.model_validate(storage.get_json(cfg.evaluation_uri(trained.output.uri, "1")))
    # the saved weights are the trained ones: the scores the training run measured before and after training
    for metric in ("tokenF1", "rougeL", "exactMatch"):
        assert alone.tasks[0].metrics[metric].tuned == pytest.approx(after.tasks[0].metrics[metric].tuned)
        assert alone.tasks[0].metrics[metric].base == pytest.approx(after.tasks[0].metrics[metric].base)
    assert alone.general.basePerplexity == pytest.approx(after.general.basePerplexity, rel=1e-4)
    assert alone.general.perplexity == pytest.approx(after.general.perplexity, rel=1e-4)
    assert alone.general.perplexity != pytest.approx(alone.general.basePerplexity, rel=1e-3)


def test_a_candidate_model_of_another_architecture_is_refused_before_its_weights_load(storage, model_bucket, bucket,
                                                                                     s3_endpoint, tmp_path):
    general = tiny.upload_rows(storage, f"{bucket}eval/general.jsonl", tiny.sample_rows("text", 4, seed=8))
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [], method={"type": "full"},
                         evaluation={"only": True, "general": {"uri": general, "maxSamples": 4},
                                     "candidateModel": {"uri": model_bucket + "qwen2/"}})
    summary = execute(config, tmp_path)
    assert summary.exit_code == exit_codes.INVALID_CONFIG
    message = storage.get_json(cfg.result_uri(config.output.uri, "1"))["message"]
    assert f"evaluation.candidateModel.uri {model_bucket}qwen2/ is not a model of the same architecture" in message
    assert "model_type 'qwen2' (base 'llama')" in message


UNREACHABLE = "task support: rougeL"  # the start of the message of the unreachable gate below

ENFORCE_CASES = [
    # (name, failed gates' messages, runtime.enforceGates, the run's error or None)
    ("every gate passed", [], True, None),
    ("no gate, not enforced", [], False, None),
    ("a failed gate, enforced", ["task t: rougeL 0.100 is below the minimum 1.000"], True,
     "task t: rougeL 0.100 is below the minimum 1.000 (outputs written; see the evaluation report)"),
    ("two failed gates, enforced", ["a", "b"], True, "a; b (outputs written; see the evaluation report)"),
    ("a failed gate, not enforced (a search's trial)", ["task t: rougeL 0.100 is below the minimum 1.000"], False,
     None),
]


@pytest.mark.parametrize("name,rejected,enforce,error", ENFORCE_CASES, ids=[c[0] for c in ENFORCE_CASES])
def test_the_gates_verdict_on_a_run(name, rejected, enforce, error):
    """The one decision of a training run and an evaluate-only one."""
    if error is None:
        enforce_gates(rejected, enforce, "outputs written")
        return
    with pytest.raises(EvaluationGateFailed) as raised:
        enforce_gates(rejected, enforce, "outputs written")
    assert str(raised.value) == error and raised.value.exit_code == exit_codes.EVALUATION_GATE_FAILED


@pytest.mark.parametrize("enforce", [True, False], ids=["enforced", "not enforced"])
def test_an_evaluate_only_job_that_fails_a_gate_keeps_its_report_marked_rejected(enforce, storage, model_bucket,
                                                                                bucket, s3_endpoint, tmp_path):
    """evaluation.only decides on its gates as a training run does: an unreachable gate fails the run (exit code 4,
    the metric, its value and the limit named) unless runtime.enforceGates is false; evaluation.json and the
    report are written either way, the report marked rejected. The candidate is the base model itself (no
    training needed): its scores cannot reach the gate, and its general perplexity does not rise."""
    held_out = tiny.upload_rows(storage, f"{bucket}eval/support.jsonl", tiny.sample_rows("instruction", 4, seed=7))
    general = tiny.upload_rows(storage, f"{bucket}eval/general.jsonl", tiny.sample_rows("text", 4, seed=8))
    evaluation = {"only": True, "candidateModel": {"uri": model_bucket + "llama/"},
                  "tasks": [{"name": "support", "uri": held_out, "maxSamples": 4, "maxNewTokens": 6,
                             "metrics": ["rougeL"], "gate": {"metric": "rougeL", "minScore": 1.0}}],
                  "general": {"uri": general, "maxSamples": 4, "maxPerplexityRise": 0.5}}
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [], method={"type": "full"},
                         evaluation=evaluation, runtime={"enforceGates": enforce})
    summary = execute(config, tmp_path)

    result = storage.get_json(cfg.result_uri(config.output.uri, "1"))
    if enforce:
        assert summary.exit_code == exit_codes.EVALUATION_GATE_FAILED
        assert (result["succeeded"], result["reason"]) == (False, "EvaluationGateFailed")
        assert re.search(r"task support: rougeL \d\.\d{3} is below the minimum 1\.000 \(evaluation\.json and the "
                         r"report are written, marked rejected; see the evaluation report\)$", result["message"])
    else:
        assert summary.exit_code == exit_codes.SUCCEEDED, summary.result.message
        assert result["succeeded"] is True and "(no training)" in result["message"]
    evaluation_json = cfg.EvaluationResult.model_validate(storage.get_json(cfg.evaluation_uri(config.output.uri, "1")))
    assert not evaluation_json.passed
    assert [(g.name, g.metric, g.limit, g.passed) for g in evaluation_json.gates] == [
        ("general maxPerplexityRise", "general perplexity", 0.5, True),
        ("task support minScore", "rougeL", 1.0, False)]
    assert evaluation_json.gates[1].value == evaluation_json.tasks[0].metrics["rougeL"].tuned < 1.0
    report = storage.get_bytes(evaluation_json.reportUri + "report.md").decode()
    assert "**Verdict: REJECTED**: " + UNREACHABLE in report


EVALUATE_ONLY_CASES = [
    ("without an adapter", {}, "evaluation.only: an evaluate-only job needs one candidate"),
    ("with datasets", {"datasets": [{"uri": "s3://bkt/d.jsonl", "format": "chat"}]}, "evaluation.only:"),
    ("with a perplexity gate", {"evaluation_extra": {"maxPerplexityRatio": 1.0}}, "evaluation.only:"),
    ("with both candidates", {"evaluation_extra": {"candidateModel": {"uri": "s3://bkt/m/"}}}, "needs one candidate"),
    ("a candidate model with an adapter method", {"method": {"type": "lora"},
                                                   "evaluation_extra": {"candidateModel": {"uri": "s3://bkt/m/"}}},
     "evaluation.candidateModel (method full)"),
    ("a candidate model without evaluate-only", {"method": {"type": "full"}, "evaluation_extra": {
        "only": False, "candidateModel": {"uri": "s3://bkt/m/"}}, "datasets": [{"uri": "s3://bkt/d.jsonl"}]},
     "evaluation.candidateModel needs evaluation.only"),
]


@pytest.mark.parametrize("name,changes,message", EVALUATE_ONLY_CASES, ids=[c[0] for c in EVALUATE_ONLY_CASES])
def test_rules_of_evaluate_only(name, changes, message):
    evaluation = {"only": True, "general": {"uri": "s3://bkt/g.jsonl"}, **changes.get("evaluation_extra", {})}
    method = changes.get("method") or {"type": "lora", **({} if name == "without an adapter"
                                                          else {"adapter": {"uri": "s3://bkt/a/"}})}
    config = make_config("s3://bkt/", "s3://bkt/model/", "", changes.get("datasets", []), method=method,
                         evaluation=evaluation)
    with pytest.raises(ConfigError) as raised:
        validation.check(config)
    assert message in str(raised.value)
