"""The operator's per-job metrics, built from the status it writes: names and values per phase, series
that stop when they no longer mean anything, counters from the status' running totals."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from finetune_operator.api.types import Phase
from finetune_operator.metrics import Metrics

KEY = {"namespace": "team-a", "name": "bot"}
STARTED, UPDATED, FINISHED = "2026-12-01T10:00:00Z", "2026-12-01T10:30:00Z", "2026-12-01T11:00:00Z"
PROGRESS = {"step": 150, "totalSteps": 600, "percent": 25.0, "loss": 1.5, "tokensPerSecond": 900.0, "etaSeconds": 60,
            "updatedAt": UPDATED}


def unix(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc).timestamp()


def per_job(metrics: Metrics) -> dict[str, float]:
    """The job's samples by name (finetune_job_phase by phase; the per-task scores have their own test)."""
    out = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if "task" in sample.labels:
                continue
            if sample.labels.get("namespace") == KEY["namespace"] and sample.labels.get("name") == KEY["name"]:
                phase = sample.labels.get("phase")
                out[f"{sample.name}:{phase}" if phase else sample.name] = sample.value
    return out


RUNNING = {"phase": "Running", "startTime": STARTED, "gpuSeconds": 3600.0, "restarts": 2, "progress": PROGRESS}
CASES = {
    "running": (RUNNING, {
        "finetune_job_progress_ratio": 0.25, "finetune_job_step": 150, "finetune_job_total_steps": 600,
        "finetune_job_loss": 1.5, "finetune_job_tokens_per_second": 900.0, "finetune_job_eta_seconds": 60,
        "finetune_job_gpu_seconds_total": 3600.0, "finetune_job_restarts_total": 2,
        "finetune_job_last_progress_timestamp_seconds": unix(UPDATED)}),
    "starting-without-progress-beats-from-its-start": (
        {"phase": "Running", "startTime": STARTED, "gpuSeconds": 0.0, "restarts": 0}, {
            "finetune_job_gpu_seconds_total": 0.0, "finetune_job_restarts_total": 0,
            "finetune_job_last_progress_timestamp_seconds": unix(STARTED)}),
    "resumed-beats-from-when-it-runs-again": (
        {**RUNNING, "conditions": [{"type": "Running", "status": "True", "reason": "Training",
                                    "lastTransitionTime": FINISHED}]}, {
            "finetune_job_progress_ratio": 0.25, "finetune_job_step": 150, "finetune_job_total_steps": 600,
            "finetune_job_loss": 1.5, "finetune_job_tokens_per_second": 900.0, "finetune_job_eta_seconds": 60,
            "finetune_job_gpu_seconds_total": 3600.0, "finetune_job_restarts_total": 2,
            "finetune_job_last_progress_timestamp_seconds": unix(FINISHED)}),
    "stalled-shows-no-throughput-or-eta": ({**RUNNING, "phase": "Stalled"}, {
        "finetune_job_progress_ratio": 0.25, "finetune_job_step": 150, "finetune_job_total_steps": 600,
        "finetune_job_loss": 1.5, "finetune_job_gpu_seconds_total": 3600.0, "finetune_job_restarts_total": 2,
        "finetune_job_last_progress_timestamp_seconds": unix(UPDATED)}),
    "suspended-shows-no-throughput-or-eta": ({**RUNNING, "phase": "Suspended"}, {
        "finetune_job_progress_ratio": 0.25, "finetune_job_step": 150, "finetune_job_total_steps": 600,
        "finetune_job_loss": 1.5, "finetune_job_gpu_seconds_total": 3600.0, "finetune_job_restarts_total": 2,
        "finetune_job_last_progress_timestamp_seconds": unix(UPDATED)}),
    "succeeded-has-a-completion-time": (
        {**RUNNING, "phase": "Succeeded", "completionTime": FINISHED,
         "progress": {**PROGRESS, "step": 600, "percent": 100.0}}, {
            "finetune_job_progress_ratio": 1.0, "finetune_job_step": 600, "finetune_job_total_steps": 600,
            "finetune_job_loss": 1.5, "finetune_job_gpu_seconds_total": 3600.0, "finetune_job_restarts_total": 2,
            "finetune_job_last_progress_timestamp_seconds": unix(UPDATED),
            "finetune_job_completion_timestamp_seconds": unix(FINISHED)}),
    "failed-before-starting": ({"phase": "Failed", "completionTime": FINISHED}, {
        "finetune_job_completion_timestamp_seconds": unix(FINISHED)}),
    "evaluated": (
        {"phase": "Succeeded", "completionTime": FINISHED,
         "evaluation": {"basePerplexity": 9.5, "perplexity": 4.25, "generalBasePerplexity": 20.0,
                        "generalPerplexity": 21.5,
                        "tasks": [{"name": "support", "metric": "rougeL", "base": 0.2, "tuned": 0.45, "delta": 0.25}]}}, {
            "finetune_job_completion_timestamp_seconds": unix(FINISHED), "finetune_job_perplexity": 4.25,
            "finetune_job_base_perplexity": 9.5, "finetune_job_general_perplexity": 21.5,
            "finetune_job_general_base_perplexity": 20.0}),
    "queued": ({"phase": "Queued"}, {}),
    "no-phase-yet-is-pending": ({}, {}),
}


@pytest.mark.parametrize("status, expected", CASES.values(), ids=list(CASES))
def test_per_job_series_follow_the_status(status, expected):
    metrics = Metrics()
    metrics.observe_job("team-a", "bot", status)
    phase = status.get("phase", "Pending")
    phases = {f"finetune_job_phase:{p.value}": 1.0 if p.value == phase else 0.0 for p in Phase}
    assert per_job(metrics) == {**phases, **expected}


def test_a_job_that_stops_running_stops_exporting_throughput_and_eta():
    metrics = Metrics()
    metrics.observe_job("team-a", "bot", RUNNING)
    assert "finetune_job_tokens_per_second" in per_job(metrics)
    metrics.observe_job("team-a", "bot", {**RUNNING, "phase": "Succeeded", "completionTime": FINISHED})
    assert not {"finetune_job_tokens_per_second", "finetune_job_eta_seconds"} & set(per_job(metrics))


def test_jobs_by_phase_count_the_known_jobs_and_forget_job_drops_one():
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    assert {p.value: value("finetune_jobs", {"phase": p.value}) for p in Phase} == {p.value: 0 for p in Phase}
    metrics.observe_job("team-a", "bot", RUNNING)
    metrics.observe_job("team-b", "other", {"phase": "Succeeded"})
    metrics.observe_job("team-b", "third", {"phase": "Running"})
    assert value("finetune_jobs", {"phase": "Running"}) == 2 and value("finetune_jobs", {"phase": "Succeeded"}) == 1
    metrics.forget_job("team-a", "bot")
    assert per_job(metrics) == {}
    assert value("finetune_jobs", {"phase": "Running"}) == 1
    metrics.forget_job("team-a", "never-seen")  # a job deleted before its first pass
    assert value("finetune_operator_build_info", {"version": "0.1.0"}) == 1


def test_status_totals_are_counters():
    types = {family.name: family.type for family in Metrics().registry.collect()}
    assert types["finetune_job_gpu_seconds"] == types["finetune_job_restarts"] == "counter"
    assert types["finetune_job_progress_ratio"] == "gauge"


def test_each_tasks_headline_score_is_a_series_per_model():
    metrics = Metrics()
    metrics.observe_job("team-a", "bot", {"phase": "Succeeded", "evaluation": {"tasks": [
        {"name": "support", "metric": "rougeL", "base": 0.2, "tuned": 0.45, "delta": 0.25},
        {"name": "billing", "metric": "exactMatch", "tuned": 0.5}]}})
    scores = {(s.labels["task"], s.labels["metric"], s.labels["model"]): s.value
              for family in metrics.registry.collect() if family.name == "finetune_job_task_score"
              for s in family.samples if s.labels["name"] == "bot"}
    assert scores == {("support", "rougeL", "base"): 0.2, ("support", "rougeL", "tuned"): 0.45,
                      ("billing", "exactMatch", "tuned"): 0.5}
    metrics.forget_job("team-a", "bot")
    assert not [s for family in metrics.registry.collect() if family.name == "finetune_job_task_score"
                for s in family.samples]
