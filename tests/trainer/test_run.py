"""A whole run in one process: the documents and artifacts it leaves in S3, its gate, its failures."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
from conftest import make_config, upload_dataset

from finetune_trainer import config as cfg
from finetune_trainer import exit_codes
from finetune_trainer.checkpoint import complete_checkpoints
from finetune_trainer.run import execute
from finetune_trainer.testing import tiny


def test_run_writes_report_progress_evaluation_outputs_and_result_last(storage, model_bucket, bucket, s3_endpoint,
                                                                        tmp_path):
    ds = upload_dataset(storage, bucket, "chat", "chat", 40)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], output={"merge": True},
                         checkpoint={"everySteps": 3, "keep": 2}, hyperparameters={"maxSteps": 12, "learningRate": 1e-2},
                         evaluation={"maxPerplexityRatio": 1.0})
    summary = execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    out = config.output.uri

    report = storage.get_json(cfg.data_report_uri(out, "1"))["stages"]["main"]
    assert report["rowsRead"] == 40 and report["totalSteps"] == 12

    progress = cfg.Progress.model_validate(storage.get_json(cfg.progress_uri(out, "1")))
    assert (progress.step, progress.totalSteps, progress.stage) == (12, 12, "main")
    assert progress.loss == pytest.approx(summary.losses["main"][-1])
    assert progress.learningRate and progress.tokensPerSecond and progress.evalLoss and progress.updatedAt
    assert [c.step for c in progress.checkpoints] == [6, 9]

    evaluation = cfg.EvaluationResult.model_validate(storage.get_json(cfg.evaluation_uri(out, "1")))
    assert evaluation.passed and evaluation.ratio == pytest.approx(evaluation.perplexity / evaluation.basePerplexity)

    result = cfg.RunResult.model_validate(storage.get_json(cfg.result_uri(out, "1")))
    assert result.succeeded and result.adapterUri == cfg.adapter_uri(out) and result.mergedUri == cfg.merged_uri(out)

    adapter_files = {u.rsplit("/", 1)[1] for u in storage.list_keys(cfg.adapter_uri(out))}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= adapter_files
    merged_files = {u.rsplit("/", 1)[1] for u in storage.list_keys(cfg.merged_uri(out))}
    assert {"config.json", "model.safetensors", "README.md"} <= merged_files
    card = storage.get_bytes(cfg.adapter_uri(out) + "README.md").decode()
    assert "basePerplexity" in card and '"maxPerplexityRatio": 1.0' in card

    prefix = cfg.checkpoint_prefix(None, out, "1")
    assert [s for s, _ in complete_checkpoints(storage, prefix)] == [6, 9]
    manifest = storage.get_json(prefix + "step-00000009/manifest.json")
    assert manifest["step"] == 9 and manifest["worldSize"] == 1


def test_merged_model_matches_the_adapter_model(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ds = upload_dataset(storage, bucket, "text", "text", 20)
    config = make_config(bucket, model_bucket + "qwen2/", s3_endpoint, [ds], objective="causal-lm",
                         output={"merge": True}, hyperparameters={"maxSteps": 4, "learningRate": 5e-2})
    assert execute(config, tmp_path).exit_code == 0
    for name in ("base", "adapter", "merged"):
        uri = {"base": model_bucket + "qwen2/", "adapter": cfg.adapter_uri(config.output.uri),
               "merged": cfg.merged_uri(config.output.uri)}[name]
        storage.download_prefix(uri, tmp_path / name)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(tuned(ids).logits, merged(ids).logits, atol=1e-4)


def test_evaluation_gate_fails_the_run_with_a_clear_reason(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    ds = upload_dataset(storage, bucket, "chat", "chat", 30)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], evaluation={"maxPerplexityRatio": 0.01},
                         hyperparameters={"maxSteps": 3})
    summary = execute(config, tmp_path)
    assert summary.exit_code == exit_codes.EVALUATION_GATE_FAILED
    result = storage.get_json(cfg.result_uri(config.output.uri, "1"))
    assert result["succeeded"] is False and result["reason"] == "EvaluationGateFailed"
    assert "validation perplexity ratio" in result["message"] and "above the limit 0.01" in result["message"]
    evaluation = storage.get_json(cfg.evaluation_uri(config.output.uri, "1"))
    assert evaluation["passed"] is False and evaluation["maxPerplexityRatio"] == 0.01
    assert [(g["name"], g["passed"], g["limit"]) for g in evaluation["gates"]] == [("perplexity maxRatio", False, 0.01)]
    # the rejected model is kept for inspection, and says so
    card = storage.get_bytes(cfg.adapter_uri(config.output.uri) + "README.md").decode()
    assert "Rejected by the evaluation gates" in card and "above the limit 0.01" in card
    assert "REJECTED" in storage.get_bytes(cfg.report_uri(config.output.uri, "1") + "report.md").decode()


def test_a_trial_records_a_failed_gate_without_failing(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    """runtime.enforceGates false (a search's trial): the gate is evaluated and recorded for the search to
    judge the promoted trial by, and the trial succeeds."""
    ds = upload_dataset(storage, bucket, "chat", "chat", 30)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], evaluation={"maxPerplexityRatio": 0.01},
                         hyperparameters={"maxSteps": 3}, runtime={"metricsPort": 0, "progressIntervalSeconds": 0.2,
                                                                   "enforceGates": False})
    summary = execute(config, tmp_path)
    assert summary.exit_code == exit_codes.SUCCEEDED
    assert storage.get_json(cfg.result_uri(config.output.uri, "1"))["succeeded"] is True
    evaluation = storage.get_json(cfg.evaluation_uri(config.output.uri, "1"))
    assert [(g["name"], g["passed"]) for g in evaluation["gates"]] == [("perplexity maxRatio", False)]
    assert "above the limit 0.01" in evaluation["gates"][0]["message"]


BAD_INPUT_CASES = [
    ("bad row", lambda bucket: (f"{bucket}data/bad.jsonl", b'{"text": "ok"}\n{"text": "broken\n'),
     exit_codes.INVALID_DATA, "bad.jsonl:2: not valid JSON"),
    ("missing file", lambda bucket: (f"{bucket}data/none.jsonl", None), exit_codes.INVALID_DATA,
     "no such object and no .jsonl files"),
]


@pytest.mark.parametrize("name,make,code,message", BAD_INPUT_CASES, ids=[c[0] for c in BAD_INPUT_CASES])
def test_bad_data_is_a_permanent_failure_naming_the_problem(name, make, code, message, storage, model_bucket, bucket,
                                                             s3_endpoint, tmp_path):
    uri, content = make(bucket)
    if content is not None:
        storage.put_bytes(uri, content)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [{"uri": uri, "format": "text"}])
    summary = execute(config, tmp_path)
    assert summary.exit_code == code and not exit_codes.is_retryable(code)
    assert message in storage.get_json(cfg.result_uri(config.output.uri, "1"))["message"]


CONFIG_PROBLEM_CASES = [
    ({"method": {"type": "prompt", "virtualTokens": 4}, "output": {"merge": True}}, "output.merge is impossible"),
    ({"distributed": {"engine": "ddp", "zeroStage": 2}}, "zeroStage is only allowed with engine deepspeed"),
    ({"evaluation": {"compareToBase": False, "maxPerplexityRatio": 1.0}}, "needs evaluation.compareToBase"),
]


@pytest.mark.parametrize("overrides,message", CONFIG_PROBLEM_CASES)
def test_cross_field_config_problems_are_invalid_config(overrides, message, storage, model_bucket, bucket, s3_endpoint,
                                                         tmp_path):
    ds = upload_dataset(storage, bucket, "chat", "chat", 4)
    summary = execute(make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], **overrides), tmp_path)
    assert summary.exit_code == exit_codes.INVALID_CONFIG and message in summary.result.message


def test_stages_run_in_order_each_from_the_previous_output(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    chat = upload_dataset(storage, bucket, "chat", "chat", 30)
    pref = upload_dataset(storage, bucket, "pref", "preference", 30)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [], stages=[
        {"name": "sft", "datasets": [chat], "objective": "sft",
         "hyperparameters": {"maxSteps": 6, "learningRate": 1e-2, "batchSize": 4}},
        {"name": "align", "datasets": [pref], "objective": "dpo",
         "hyperparameters": {"maxSteps": 5, "learningRate": 1e-2, "batchSize": 4}},
    ])
    summary = execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    assert [len(summary.losses[s]) for s in ("sft", "align")] == [6, 5]
    # The DPO stage's reference is the model after the SFT stage, so its first loss is log 2.
    assert summary.losses["align"][0] == pytest.approx(0.6931, abs=2e-3)
    assert storage.list_keys(cfg.adapter_uri(cfg.stage_output_uri(config.output.uri, "sft")))
    progress = storage.get_json(cfg.progress_uri(config.output.uri, "1"))
    assert (progress["step"], progress["totalSteps"], progress["stage"]) == (11, 11, "align")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_are_served_while_training(storage, model_bucket, bucket, s3_endpoint, tmp_path, monkeypatch):
    port = _free_port()
    monkeypatch.delenv("FINETUNE_TRAINER_METRICS_PORT")
    ds = upload_dataset(storage, bucket, "chat", "chat", 20)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], runtime={"metricsPort": port},
                         hyperparameters={"maxSteps": 4})
    scraped = {}

    import finetune_trainer.run as run_module

    original = run_module.Run._finish

    def scrape_then_finish(self, *args, **kwargs):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            scraped["text"] = response.read().decode()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_module.Run, "_finish", scrape_then_finish)
    assert execute(config, tmp_path).exit_code == 0
    assert "finetune_trainer_step 4.0" in scraped["text"]
    assert "finetune_trainer_total_steps 4.0" in scraped["text"]
    assert "finetune_trainer_tokens_per_second" in scraped["text"]
    for name in ("finetune_trainer_checkpoints_total", "finetune_trainer_last_checkpoint_timestamp_seconds",
                 "process_cpu_seconds_total"):
        assert f"\n{name} " in scraped["text"], name


def test_a_finished_run_is_not_run_again(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    ds = upload_dataset(storage, bucket, "chat", "chat", 20)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], hyperparameters={"maxSteps": 2})
    assert execute(config, tmp_path / "first").exit_code == 0
    again = execute(config, tmp_path / "second")
    assert again.exit_code == 0 and again.losses == {} and again.result.succeeded


def held_out_rows(n: int, leaked: list[dict]) -> list[dict]:
    """n instruction rows unlike the training rows, then the leaked ones (copies with a sentence added)."""
    rows = [{"instruction": f"Summarise note {i} about {topic}.", "output": f"Note {i} says the {topic} is fine today."}
            for i, topic in zip(range(n), ["disk", "queue", "cache", "proxy", "kernel", "index"] * n)]
    return rows + [{**row, "output": row["output"] + " Indeed."} for row in leaked]


def test_result_json_is_a_run_result(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    ds = upload_dataset(storage, bucket, "instruction", "instruction", 20)
    training_rows = tiny.sample_rows("instruction", 20)
    validation = tiny.upload_rows(storage, f"{bucket}data/held-out.jsonl", held_out_rows(6, training_rows[:3]))
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], validation={"uri": validation},
                         hyperparameters={"maxSteps": 2})
    assert execute(config, tmp_path).exit_code == 0
    document = json.loads(storage.get_bytes(cfg.result_uri(config.output.uri, "1")))
    assert set(document) == set(cfg.RunResult.model_fields)
    report = storage.get_json(cfg.data_report_uri(config.output.uri, "1"))["stages"]["main"]
    assert report["validation"]["rowsKept"] == 6 and report["validationSequences"] == 6
    assert report["validation"]["overlap"] | {"largestSharedFraction": None} == {
        "rowsChecked": 9, "rowsOverlapping": 3, "rowsDropped": 3, "largestSharedFraction": None, "dropFraction": 0.5,
        "gramWords": 8, "sampling": 1}
    summary = storage.get_json(cfg.progress_uri(config.output.uri, "1"))["data"]["stages"][0]
    assert summary["validationOverlap"] == {"rowsChecked": 9, "rowsOverlapping": 3, "rowsDropped": 3}
    assert summary["datasets"][0]["rowsRead"] == 20 and summary["targetTokens"] > 0


def test_a_held_out_set_that_is_the_training_set_is_refused(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    ds = upload_dataset(storage, bucket, "instruction", "instruction", 20)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], validation={"uri": ds["uri"]},
                         hyperparameters={"maxSteps": 2})
    summary = execute(config, tmp_path)
    assert summary.exit_code == exit_codes.INVALID_DATA
    assert "all 20 validation rows share at least 50% of their word 8-grams with training rows" in summary.result.message


RESULT_WAIT_CASES = [
    # (rank, rank 0 writes result.json after (s) or None, seen, the least and most seconds waited)
    ("0", None, True, 0.0, 1.0),
    ("1", 0.6, True, 0.5, 10.0),
    ("1", None, False, 1.5, 10.0),
]


@pytest.mark.parametrize("rank,written_after,seen,least,most", RESULT_WAIT_CASES,
                         ids=["rank 0 goes at once", "rank 1 waits for the result", "rank 1 gives up on a dead rank 0"])
def test_the_other_ranks_of_a_failed_run_exit_after_rank_0s_result(rank, written_after, seen, least, most, storage,
                                                                     model_bucket, bucket, s3_endpoint, monkeypatch):
    import threading
    import time

    from finetune_trainer.run import await_final_result

    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [])
    monkeypatch.setenv("RANK", rank)
    uri = cfg.result_uri(config.output.uri, config.job.runId)
    writer = threading.Timer(written_after or 0, lambda: storage.put_json(uri, {"succeeded": False}))
    if written_after is not None:
        writer.start()
    t0 = time.monotonic()
    assert await_final_result(config, timeout=1.5, poll=0.1) is seen
    assert least <= time.monotonic() - t0 <= most
    if written_after is not None:
        writer.join()
