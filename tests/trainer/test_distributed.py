"""torchrun with 2 processes on CPU: DDP (gloo) and DeepSpeed ZeRO-2 / ZeRO-3 (DeepSpeed's CPU accelerator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
from conftest import REPO, make_config, upload_dataset

from finetune_trainer import config as cfg
from finetune_trainer.checkpoint import complete_checkpoints


def step_losses(stdout: str) -> list[float]:
    return [e["loss"] for e in map(json.loads, (l for l in stdout.splitlines() if l.startswith('{"event": "step"')))]


def torchrun(config, tmp_path, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO / 'trainer-image'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "finetune_trainer", "--config", str(path), "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


DISTRIBUTED_CASES = [
    ("ddp", {"engine": "ddp"}),
    ("zero2", {"engine": "deepspeed", "zeroStage": 2}),
    ("zero3", {"engine": "deepspeed", "zeroStage": 3}),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,distributed", DISTRIBUTED_CASES, ids=[c[0] for c in DISTRIBUTED_CASES])
def test_two_processes_train_checkpoint_and_finish(name, distributed, storage, model_bucket, bucket, s3_endpoint, tmp_path):
    ds = upload_dataset(storage, bucket, "chat", "chat", 48)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], distributed=distributed,
                         hyperparameters={"maxSteps": 10, "batchSize": 4, "learningRate": 1e-2},
                         checkpoint={"everySteps": 4, "keep": 2}, output={"uri": bucket + "out/", "merge": True})
    done = torchrun(config, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    losses = step_losses(done.stdout)
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    result = storage.get_json(cfg.result_uri(config.output.uri, "1"))
    assert result["succeeded"] is True and result["mergedUri"]
    prefix = cfg.checkpoint_prefix(None, config.output.uri, "1")
    assert [step for step, _ in complete_checkpoints(storage, prefix)] == [4, 8]


@pytest.mark.slow
def test_zero3_carries_the_model_from_one_stage_to_the_next(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    """DeepSpeed is initialised once per stage on the module the previous stage trained (ZeRO-3
    partitions it): the second stage must start from the first one's weights and finish. Its
    learning rate is too small to move them, so the final adapter is the first stage's output."""
    sft = upload_dataset(storage, bucket, "chat", "chat", 24)
    prefs = upload_dataset(storage, bucket, "preference", "preference", 24)
    still = {"maxSteps": 3, "batchSize": 2, "learningRate": 1e-10, "warmupRatio": 0.0, "scheduler": "constant"}
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [], distributed={"engine": "deepspeed", "zeroStage": 3},
                         stages=[{"name": "sft", "datasets": [sft], "objective": "sft"},
                                 {"name": "dpo", "datasets": [prefs], "objective": "dpo", "hyperparameters": still}],
                         hyperparameters={"maxSteps": 3, "batchSize": 2, "learningRate": 1e-2})
    done = torchrun(config, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    steps = [json.loads(l) for l in done.stdout.splitlines() if l.startswith('{"event": "step"')]
    assert [(s["stage"], s["stageStep"]) for s in steps] == [("sft", 1), ("sft", 2), ("sft", 3), ("dpo", 1), ("dpo", 2), ("dpo", 3)]
    assert all(set(s["metrics"]) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}
               for s in steps if s["stage"] == "dpo")
    assert storage.get_json(cfg.result_uri(config.output.uri, "1"))["succeeded"] is True

    def adapter(output_uri: str) -> dict:
        return safetensors.torch.load(storage.get_bytes(cfg.adapter_uri(output_uri) + "adapter_model.safetensors"))

    after_sft, final = adapter(cfg.stage_output_uri(config.output.uri, "sft")), adapter(config.output.uri)
    assert after_sft.keys() == final.keys()
    lora_b = [k for k in after_sft if "lora_B" in k]
    assert lora_b and all(after_sft[k].abs().max() > 1e-4 for k in lora_b)  # the first stage trained (B starts at 0)
    assert max((final[k] - after_sft[k]).abs().max().item() for k in final) < 1e-6


@pytest.mark.slow
def test_two_processes_unfreeze_gradually_with_l2sp_and_layerwise_rates(storage, model_bucket, bucket, s3_endpoint,
                                                                        tmp_path):
    """method.full's strategies under DDP: the blocks that take gradients change mid-run on every rank at the same
    step (a rank out of step would hang or fail the gradient all-reduce), and the L2-SP penalty is added on every
    rank."""
    ds = upload_dataset(storage, bucket, "chat", "chat", 48)
    strategies = {"unfreeze": {"startTopBlocks": 1, "everySteps": 4}, "l2sp": {"strength": 0.01},
                  "layerwiseLRDecay": 0.8}
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], method={"type": "full", "full": strategies},
                         hyperparameters={"maxSteps": 8, "batchSize": 2, "learningRate": 2e-3},
                         checkpoint={"everySteps": 3, "keep": 3}, output={"uri": bucket + "ddp-strategies/"})
    done = torchrun(config, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    steps = [json.loads(l) for l in done.stdout.splitlines() if l.startswith('{"event": "step"')]
    # the tiny llama has 2 blocks: the top one first, both (and the embeddings) from step 5
    assert [e["trainableTopBlocks"] for e in steps] == [1] * 4 + [2] * 4
    assert steps[0]["l2spPenalty"] >= 0 and steps[-1]["l2spPenalty"] > 0
    assert storage.get_json(cfg.result_uri(config.output.uri, "1"))["succeeded"] is True
    prefix = cfg.checkpoint_prefix(None, config.output.uri, "1")
    assert [step for step, _ in complete_checkpoints(storage, prefix)] == [3, 6]


@pytest.mark.slow
def test_two_processes_score_an_adapter_exactly_as_one(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    """evaluation.tasks and evaluation.general under DDP: each rank answers its share and the answers are gathered in
    order, each rank measures its share of the general perplexity; 2 processes give the scores of 1 (an
    evaluate-only job, so that both score the same adapter)."""
    from finetune_trainer.run import execute
    from finetune_trainer.testing import tiny

    train = upload_dataset(storage, bucket, "chat", "chat", 24)
    held_out = tiny.upload_rows(storage, f"{bucket}eval/qa.jsonl", tiny.sample_rows("instruction", 7, seed=3))
    general = tiny.upload_rows(storage, f"{bucket}eval/general.jsonl", tiny.sample_rows("text", 9, seed=4))
    evaluation = {"tasks": [{"name": "qa", "uri": held_out, "maxNewTokens": 10,
                             "checks": [{"name": "the", "contains": "the"}]}],
                  "general": {"uri": general}}
    trained = make_config(bucket, model_bucket + "llama/", s3_endpoint, [train], output={"uri": bucket + "trained/"},
                          hyperparameters={"maxSteps": 4, "learningRate": 1e-2})
    assert execute(trained, tmp_path / "train").exit_code == 0

    def evaluate_only(output: str):
        return make_config(bucket, model_bucket + "llama/", s3_endpoint, [], output={"uri": bucket + output},
                           method={"type": "lora", "adapter": {"uri": cfg.adapter_uri(trained.output.uri)}},
                           evaluation={**evaluation, "only": True}, hyperparameters={"batchSize": 2})

    one = evaluate_only("one/")
    assert execute(one, tmp_path / "one").exit_code == 0
    two = evaluate_only("two/")
    done = torchrun(two, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    scores = [cfg.EvaluationResult.model_validate(storage.get_json(cfg.evaluation_uri(c.output.uri, "1")))
              for c in (one, two)]
    assert scores[0].tasks == scores[1].tasks and scores[0].tasks[0].rows == 7
    assert scores[0].general.perplexity == pytest.approx(scores[1].general.perplexity, rel=1e-5)
    assert scores[0].general.basePerplexity == pytest.approx(scores[1].general.basePerplexity, rel=1e-5)


@pytest.mark.slow
def test_zero3_answers_the_evaluation_tasks_with_every_rank_in_step(storage, model_bucket, bucket, s3_endpoint,
                                                                    tmp_path):
    """Under ZeRO-3 every forward pass gathers weights from every rank: generation keeps the ranks in step (a
    rank done early would leave the others waiting forever) and the run finishes with the task's scores."""
    from finetune_trainer.testing import tiny

    train = upload_dataset(storage, bucket, "chat", "chat", 24)
    held_out = tiny.upload_rows(storage, f"{bucket}eval/qa.jsonl", tiny.sample_rows("instruction", 5, seed=3))
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [train],
                         distributed={"engine": "deepspeed", "zeroStage": 3},
                         hyperparameters={"maxSteps": 3, "batchSize": 2, "learningRate": 1e-2},
                         evaluation={"tasks": [{"name": "qa", "uri": held_out, "maxNewTokens": 12}]})
    done = torchrun(config, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    evaluation = cfg.EvaluationResult.model_validate(storage.get_json(cfg.evaluation_uri(config.output.uri, "1")))
    assert evaluation.tasks[0].rows == 5 and evaluation.tasks[0].metrics["rougeL"].tuned is not None
