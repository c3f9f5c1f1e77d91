"""The trainer's Prometheus metrics (rank 0): the checkpoint clock that FineTuneJobCheckpointStale
reads starts at the process' start, so a restarted trainer is not stale, and moves with each save."""

from __future__ import annotations

import time

from finetune_trainer.config import Progress
from finetune_trainer.progress import Metrics


def test_the_checkpoint_clock_starts_with_the_process_and_moves_with_each_checkpoint():
    before = time.time()
    metrics = Metrics(port=0)
    value = metrics.registry.get_sample_value
    started = value("finetune_trainer_last_checkpoint_timestamp_seconds")
    assert before <= started <= time.time()
    assert value("finetune_trainer_checkpoints_total") == 0
    time.sleep(0.01)
    metrics.checkpoint_saved()
    metrics.checkpoint_saved()
    assert value("finetune_trainer_checkpoints_total") == 2
    assert started < value("finetune_trainer_last_checkpoint_timestamp_seconds") <= time.time()


def test_progress_sets_the_gauges_it_has_values_for():
    metrics = Metrics(port=0)
    metrics.update(Progress(step=10, totalSteps=100, loss=1.5, tokensPerSecond=1000.0))
    value = metrics.registry.get_sample_value
    assert (value("finetune_trainer_step"), value("finetune_trainer_total_steps")) == (10, 100)
    assert (value("finetune_trainer_loss"), value("finetune_trainer_tokens_per_second")) == (1.5, 1000.0)
    assert value("finetune_trainer_eval_loss") == 0  # not reported yet: the gauge's initial value


def test_the_trainer_exports_its_process_metrics():
    names = {sample.name for family in Metrics(port=0).registry.collect() for sample in family.samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
