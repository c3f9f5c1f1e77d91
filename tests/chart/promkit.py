"""Helpers of the monitoring tests: the chart's alert rules run through the real `promtool`, and the
metrics the operator and the trainer really export (their registries, scraped as text)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from finetune_operator.metrics import Metrics as OperatorMetrics
from finetune_trainer.progress import Metrics as TrainerMetrics
from tests.chart.chartkit import Helm, one

# The chart's default docs base URL: Chart.yaml's home + /blob/main/docs.
DOCS = "https://github.com/finetune-operator/finetune-operator/blob/main/docs"
MONITORING_ON = ("--set", "monitoring.prometheusRule.enabled=true", "--set", "monitoring.serviceMonitor.enabled=true",
                 "--set", "monitoring.dashboard.enabled=true")


def rule_groups(helm_cli: Helm, *extra_args: str) -> list[dict]:
    return one(helm_cli.render(*MONITORING_ON, *extra_args), "PrometheusRule")["spec"]["groups"]


def alerts_of(groups: list[dict]) -> dict[str, dict]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def runbook_url(alertname: str, docs: str = DOCS) -> str:
    """An alert's runbook: its section of docs/operations.md (GitHub's anchor of the heading)."""
    return f"{docs}/operations.md#{alertname.lower()}"


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bfinetune_[a-z_]+", expr))


def promtool_run(promtool: Path, directory: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(promtool), *args], cwd=directory, input=stdin, capture_output=True, text=True,
                          timeout=60)


def run_promtool_test(promtool: Path, directory: Path, groups: list[dict], test: dict) -> None:
    """One `promtool test rules` test (interval 1m) of `groups`; fails with promtool's report."""
    (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    (directory / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [{"interval": "1m", **test}]},
        sort_keys=False))
    result = promtool_run(promtool, directory, "test", "rules", "tests.yaml")
    assert result.returncode == 0, f"promtool test rules failed:\n{result.stdout}\n{result.stderr}"


# ---- what the registries export ----------------------------------------------------------------

RUNNING_STATUS = {"phase": "Running", "startTime": "2026-12-01T10:00:00Z", "gpuSeconds": 3600.0, "restarts": 1,
                  "progress": {"step": 150, "totalSteps": 600, "percent": 25.0, "loss": 1.25, "tokensPerSecond": 900.5,
                               "etaSeconds": 1800, "updatedAt": "2026-12-01T10:30:00Z"}}
FAILED_STATUS = {"phase": "Failed", "startTime": "2026-12-01T10:00:00Z", "completionTime": "2026-12-01T11:00:00Z",
                 "gpuSeconds": 7200.0, "restarts": 3,
                 "evaluation": {"basePerplexity": 12.5, "perplexity": 9.75, "generalBasePerplexity": 20.0,
                                "generalPerplexity": 26.5,
                                "tasks": [{"name": "support", "metric": "rougeL", "base": 0.25, "tuned": 0.31,
                                           "delta": 0.06}]}}


def operator_metrics() -> OperatorMetrics:
    """The operator's registry with every series it can export: a running and a failed job, a
    tenant with a budget, reconcile passes, a swept sandbox."""
    metrics = OperatorMetrics()
    metrics.observe_job("team-a", "llama-chat", RUNNING_STATUS)
    metrics.observe_job("team-b", "broken", FAILED_STATUS)
    metrics.observe_tenant("team-a", {"jobs": {"Running": 1}, "runningJobs": 1, "gpusInUse": 8,
                                      "usage": {"gpuSeconds": 3600}}, added_gpu_seconds=60, budget_gpu_hours=100)
    metrics.reconciles.labels("ok").inc()
    metrics.reconcile_seconds.observe(0.1)
    metrics.sandboxes_swept.labels("orphaned").inc()
    metrics.tenant_io_timeouts.inc()
    return metrics


def trainer_metrics() -> TrainerMetrics:
    """The trainer's registry (no server) after progress and a checkpoint."""
    from finetune_trainer.config import Progress

    metrics = TrainerMetrics(port=0)
    metrics.update(Progress(step=10, totalSteps=100, loss=1.5, evalLoss=1.6, learningRate=1e-4,
                            tokensPerSecond=1000.0, etaSeconds=90.0))
    metrics.checkpoint_saved()
    return metrics


def exposition() -> dict[str, str]:
    """The text each registry serves on /metrics."""
    return {"operator": generate_latest(operator_metrics().registry).decode(),
            "trainer": generate_latest(trainer_metrics().registry).decode()}


def exported_names() -> set[str]:
    """Every sample name (with _total, _bucket, ...) the operator and the trainer export."""
    return {sample.name for metrics in (operator_metrics(), trainer_metrics())
            for family in metrics.registry.collect() for sample in family.samples}


def exported_families() -> dict[str, str]:
    """Metric family name -> type, for both registries."""
    return {family.name: family.type for metrics in (operator_metrics(), trainer_metrics())
            for family in metrics.registry.collect()}
