"""Checkpoints and restarts: a killed run resumes from its newest complete S3 checkpoint and then
trains exactly as an uninterrupted run would; SIGTERM saves a checkpoint and exits retryable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
from conftest import REPO, make_config, upload_dataset

from finetune_trainer import config as cfg
from finetune_trainer import exit_codes
from finetune_trainer.checkpoint import complete_checkpoints
from finetune_trainer.run import execute

TOTAL_STEPS = 150


def start_trainer(config, tmp_path) -> tuple[subprocess.Popen, list[dict]]:
    """The trainer as its own process; its JSON events are collected as they arrive."""
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer-image"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "finetune_trainer", "--config", str(path), "--work-dir",
                                str(tmp_path / "work")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=env, start_new_session=True)
    events: list[dict] = []

    def read():
        for line in process.stdout:
            if line.startswith("{"):
                events.append(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    return process, events


def wait_for(condition, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"trainer ended early with {process.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@dataclass
class Interrupted:
    reference: object  # the RunSummary of the uninterrupted run
    config: cfg.TrainerConfig  # the interrupted run's
    newest: int  # its newest complete checkpoint when it was killed
    resumed: object  # the RunSummary of its restart


def reference_killed_and_resumed(make, storage, tmp_path, kill_after_step: int) -> Interrupted:
    """An uninterrupted run of make("reference/"), then make("interrupted/") as its own process, killed
    (SIGKILL) once a checkpoint at kill_after_step or later is complete, and restarted in this process;
    one thread each, so that the two runs compute alike."""
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = execute(make("reference/"), tmp_path / "ref")
        assert reference.exit_code == 0, reference.result.message
        config = make("interrupted/")
        prefix = cfg.checkpoint_prefix(None, config.output.uri, "1")
        process, _ = start_trainer(config, tmp_path)
        wait_for(lambda: any(step >= kill_after_step for step, _ in complete_checkpoints(storage, prefix)), process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        newest = complete_checkpoints(storage, prefix)[-1][0]
        killed_before_evaluation = storage.get_json(cfg.evaluation_uri(config.output.uri, "1")) is None
        resumed = execute(config, tmp_path / "restart")
    finally:
        torch.set_num_threads(previous_threads)
        if torch_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = torch_threads
    assert killed_before_evaluation
    return Interrupted(reference, config, newest, resumed)


def resumable_config(storage, model_bucket, bucket, s3_endpoint, output: str):
    ds = upload_dataset(storage, bucket, "chat", "chat", 40)
    return make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds],
                       method={"type": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.1}},
                       hyperparameters={"maxSteps": TOTAL_STEPS, "learningRate": 3e-3, "batchSize": 2,
                                        "scheduler": "cosine", "warmupRatio": 0.1},
                       checkpoint={"everySteps": 10, "keep": 2}, output={"uri": bucket + output})


@pytest.mark.slow
def test_killed_run_resumes_at_the_checkpoint_and_matches_an_uninterrupted_run(storage, model_bucket, bucket,
                                                                                s3_endpoint, tmp_path):
    run = reference_killed_and_resumed(
        lambda output: resumable_config(storage, model_bucket, bucket, s3_endpoint, output), storage, tmp_path, 30)
    reference, config, newest, resumed = run.reference, run.config, run.newest, run.resumed
    assert resumed.exit_code == 0, resumed.result.message
    assert resumed.resumed_from_step == newest and 30 <= newest < TOTAL_STEPS
    progress = storage.get_json(cfg.progress_uri(config.output.uri, "1"))
    assert progress["resumedFromStep"] == newest and progress["step"] == TOTAL_STEPS
    losses, expected = resumed.losses["main"], reference.losses["main"]
    assert len(losses) == TOTAL_STEPS
    assert losses[newest:] == pytest.approx(expected[newest:], rel=1e-3, abs=1e-3)
    assert resumed.evaluation.perplexity == pytest.approx(reference.evaluation.perplexity, rel=1e-3)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_retryable(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    config = resumable_config(storage, model_bucket, bucket, s3_endpoint, "preempted/")
    process, events = start_trainer(config, tmp_path)
    wait_for(lambda: any(e["event"] == "step" and e["step"] >= 5 for e in events), process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == exit_codes.PREEMPTED and exit_codes.is_retryable(exit_codes.PREEMPTED)
    time.sleep(0.2)
    stopped = next(e["step"] for e in events if e["event"] == "preempted")
    prefix = cfg.checkpoint_prefix(None, config.output.uri, "1")
    assert complete_checkpoints(storage, prefix)[-1][0] == stopped
    assert storage.get_json(cfg.result_uri(config.output.uri, "1")) is None  # not over: the pod restarts

    resumed = execute(config, tmp_path / "restart")
    assert resumed.exit_code == 0 and resumed.resumed_from_step == stopped
    assert len(resumed.losses["main"]) == TOTAL_STEPS


def test_incomplete_checkpoints_are_ignored_and_pruned(storage, bucket):
    from finetune_trainer.checkpoint import CheckpointManager

    prefix = bucket + "ckpt/1/"
    for step, complete in ((5, True), (10, True), (15, False), (20, True), (25, False)):
        storage.put_bytes(f"{prefix}step-{step:08d}/engine-state.pt", b"x")
        if complete:
            storage.put_json(f"{prefix}step-{step:08d}/manifest.json", {"step": step})
    manager = CheckpointManager(storage, prefix, "/tmp/unused", rank=0, world_size=1, keep=2)
    assert manager.latest()[0] == 20
    manager.prune()
    remaining = sorted({u[len(prefix):].split("/")[0] for u in storage.list_keys(prefix)})
    assert remaining == ["step-00000010", "step-00000020", "step-00000025"]


BASE_CARRY_STEPS = 40


def base_carry_config(storage, model_bucket, bucket, s3_endpoint, output: str):
    """A full fine-tune (the base weights themselves train) with evaluation.tasks and evaluation.general
    and their gates on the base: the base measurement can only come from before the first step."""
    from finetune_trainer.testing import tiny

    train = upload_dataset(storage, bucket, "carry-train", "instruction", 48, seed=0)
    held_out = tiny.upload_rows(storage, f"{bucket}eval/carry-support.jsonl", tiny.sample_rows("instruction", 8, seed=7))
    general = tiny.upload_rows(storage, f"{bucket}eval/carry-general.jsonl", tiny.sample_rows("text", 8, seed=8))
    evaluation = {"compareToBase": True, "maxSamples": 8,
                  "tasks": [{"name": "support", "uri": held_out, "maxSamples": 4, "maxNewTokens": 8,
                             "gate": {"metric": "tokenF1", "minGain": -1.0}}],
                  "general": {"uri": general, "maxSamples": 8, "maxPerplexityRise": 100}}
    return make_config(bucket, model_bucket + "llama/", s3_endpoint, [train], method={"type": "full"},
                       hyperparameters={"maxSteps": BASE_CARRY_STEPS, "learningRate": 1e-2, "batchSize": 4,
                                        "scheduler": "constant", "warmupRatio": 0.0, "seed": 11},
                       checkpoint={"everySteps": 5, "keep": 2}, evaluation=evaluation,
                       output={"uri": bucket + output})


@pytest.mark.slow
def test_a_resumed_run_keeps_the_base_measurement_taken_before_training(storage, model_bucket, bucket, s3_endpoint,
                                                                        tmp_path):
    """The base model's task answers and general perplexity (and its validation perplexity) are measured once, before
    the first step, and carried in every checkpoint: after a kill the resumed run's gates (minGain,
    maxPerplexityRise) compare with the real base, not with the partly-trained model, and not with nothing."""
    run = reference_killed_and_resumed(
        lambda output: base_carry_config(storage, model_bucket, bucket, s3_endpoint, "carry-" + output), storage,
        tmp_path, 10)
    config, newest, resumed = run.config, run.newest, run.resumed
    assert 10 <= newest < BASE_CARRY_STEPS
    # It did resume from the kill's checkpoint (progress.json says so even if the run then failed).
    assert storage.get_json(cfg.progress_uri(config.output.uri, "1"))["resumedFromStep"] == newest
    expected = run.reference.evaluation
    got = cfg.EvaluationResult.model_validate(storage.get_json(cfg.evaluation_uri(config.output.uri, "1")))

    # The forgetting check's base: the base model's general perplexity, measured before step 1.
    assert expected.general.basePerplexity is not None and got.general is not None
    assert got.general.basePerplexity == pytest.approx(expected.general.basePerplexity, rel=1e-5)
    assert got.general.rise == pytest.approx(got.general.perplexity / expected.general.basePerplexity - 1, rel=1e-5)
    # The tasks' base scores: the base model's answers, every metric.
    [task], [expected_task] = got.tasks, expected.tasks
    assert set(task.metrics) == set(expected_task.metrics)
    assert {m: p.base for m, p in task.metrics.items()} == pytest.approx(
        {m: p.base for m, p in expected_task.metrics.items()}, abs=1e-9)
    assert all(p.base is not None for p in task.metrics.values())
    for metric, pair in task.metrics.items():
        assert pair.delta == pytest.approx(pair.tuned - expected_task.metrics[metric].base, abs=1e-9), metric
    # The validation base (evaluation.compareToBase) is carried the same way.
    assert got.basePerplexity == pytest.approx(expected.basePerplexity, rel=1e-5)
    # Both gates were judged against that base (minGain on the delta, maxPerplexityRise on the rise).
    gates = {g.name: g for g in got.gates}
    assert set(gates) == {g.name for g in expected.gates} and len(gates) == 2
    assert all(g.passed for g in got.gates), [g.message for g in got.gates]
    assert resumed.exit_code == 0, resumed.result.message
    assert resumed.resumed_from_step == newest
