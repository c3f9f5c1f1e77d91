"""Prometheus metrics of the operator (served on OperatorConfig.operatorMetricsPort at /metrics).

Per-job series carry the FineTuneJob's own `namespace` and `name` labels and are built at scrape time
from the latest status the operator wrote for each job: a deleted job (forget_job) drops out, and a
job that left phase Running stops exporting throughput and ETA. Values the status accumulates (GPU
seconds, restarts) are counters whose value is the status value, as kube-state-metrics exports its
`*_restarts_total`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector,
                               ProcessCollector)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from finetune_operator import __version__
from finetune_operator.api.types import Phase
from finetune_operator.status import heartbeat, parse_time, running_since

JOB_LABELS = ("namespace", "name")
PHASES = tuple(phase.value for phase in Phase)


@dataclass(frozen=True)
class JobSeries:
    name: str
    help: str
    counter: bool = False


PHASE_SERIES = JobSeries("finetune_job_phase", "The FineTuneJob's phase: 1 for the current one, 0 for the others.")
JOB_SERIES = {series.name: series for series in (
    JobSeries("finetune_job_progress_ratio", "Share of the training steps done, 0 to 1."),
    JobSeries("finetune_job_step", "Optimizer steps done."),
    JobSeries("finetune_job_total_steps", "Optimizer steps planned."),
    JobSeries("finetune_job_loss", "Latest training loss."),
    JobSeries("finetune_job_tokens_per_second", "Training throughput (only while the job is Running)."),
    JobSeries("finetune_job_eta_seconds", "Estimated seconds to the end of training (only while the job is Running)."),
    JobSeries("finetune_job_gpu_seconds_total", "GPU time used by the run (status.gpuSeconds).", counter=True),
    JobSeries("finetune_job_restarts_total", "Container restarts of the run's pods (status.restarts).", counter=True),
    JobSeries("finetune_job_last_progress_timestamp_seconds", "The heartbeat of the stall condition: "
              "status.progress.updatedAt, or the time Running last turned True if later (else status.startTime)."),
    JobSeries("finetune_job_completion_timestamp_seconds", "When the run finished (status.completionTime)."),
    JobSeries("finetune_job_perplexity", "Validation perplexity of the tuned model (status.evaluation)."),
    JobSeries("finetune_job_base_perplexity", "Validation perplexity of the base model (evaluation.compareToBase)."),
    JobSeries("finetune_job_general_perplexity", "Forgetting check: general-domain perplexity of the tuned model."),
    JobSeries("finetune_job_general_base_perplexity", "Forgetting check: general-domain perplexity of the base model."),
)}
TASK_SCORE_SERIES = JobSeries("finetune_job_task_score",
                              "An evaluation task's headline metric (0 to 1) for the base and the tuned model.")
TASK_SCORE_LABELS = (*JOB_LABELS, "task", "metric", "model")


@dataclass(frozen=True)
class JobState:
    phase: str
    values: dict[str, float]  # JOB_SERIES name -> value; a series without a value is not exported
    task_scores: tuple[tuple[str, str, str, float], ...] = ()  # (task, metric, base|tuned, score)


def timestamp(text: str | None) -> float | None:
    moment = parse_time(text)
    return None if moment is None else moment.timestamp()


def job_state(status: dict[str, Any]) -> JobState:
    phase = status.get("phase") or Phase.Pending.value
    progress = status.get("progress") or {}
    evaluation = status.get("evaluation") or {}
    running = phase == Phase.Running.value
    percent = progress.get("percent")
    last_progress = heartbeat(progress, running_since(status.get("conditions") or [])) or parse_time(status.get("startTime"))
    values = {
        "finetune_job_progress_ratio": None if percent is None else percent / 100,
        "finetune_job_step": progress.get("step"),
        "finetune_job_total_steps": progress.get("totalSteps"),
        "finetune_job_loss": progress.get("loss"),
        "finetune_job_tokens_per_second": progress.get("tokensPerSecond") if running else None,
        "finetune_job_eta_seconds": progress.get("etaSeconds") if running else None,
        "finetune_job_gpu_seconds_total": status.get("gpuSeconds"),
        "finetune_job_restarts_total": status.get("restarts"),
        "finetune_job_last_progress_timestamp_seconds": last_progress.timestamp() if last_progress else None,
        "finetune_job_completion_timestamp_seconds": timestamp(status.get("completionTime")),
        "finetune_job_perplexity": evaluation.get("perplexity"),
        "finetune_job_base_perplexity": evaluation.get("basePerplexity"),
        "finetune_job_general_perplexity": evaluation.get("generalPerplexity"),
        "finetune_job_general_base_perplexity": evaluation.get("generalBasePerplexity"),
    }
    task_scores = tuple((task["name"], task["metric"], model, float(task[model]))
                        for task in evaluation.get("tasks") or [] for model in ("base", "tuned") if task.get(model) is not None)
    return JobState(phase, {name: float(value) for name, value in values.items() if value is not None}, task_scores)


def family(series: JobSeries, labels: Iterable[str] = JOB_LABELS) -> Metric:
    kind = CounterMetricFamily if series.counter else GaugeMetricFamily
    return kind(series.name, series.help, labels=list(labels))


class JobCollector(Collector):
    """`finetune_jobs{phase}` and the per-job series, from the latest status of each known job."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], JobState] = {}

    def observe(self, key: tuple[str, str], state: JobState) -> None:
        self._jobs[key] = state

    def forget(self, key: tuple[str, str]) -> None:
        self._jobs.pop(key, None)

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("finetune_jobs", "FineTuneJobs by phase.", labels=["phase"])
        yield family(PHASE_SERIES, (*JOB_LABELS, "phase"))
        for series in JOB_SERIES.values():
            yield family(series)
        yield family(TASK_SCORE_SERIES, TASK_SCORE_LABELS)

    def collect(self) -> Iterator[Metric]:
        jobs = self._jobs.copy()  # scrapes run in the HTTP server's thread
        counts = dict.fromkeys(PHASES, 0)
        phases = family(PHASE_SERIES, (*JOB_LABELS, "phase"))
        families = {name: family(series) for name, series in JOB_SERIES.items()}
        task_scores = family(TASK_SCORE_SERIES, TASK_SCORE_LABELS)
        for (namespace, name), state in jobs.items():
            counts[state.phase] = counts.get(state.phase, 0) + 1
            for phase in PHASES:
                phases.add_metric([namespace, name, phase], 1.0 if phase == state.phase else 0.0)
            for series, value in state.values.items():
                families[series].add_metric([namespace, name], value)
            for task, metric, model, score in state.task_scores:
                task_scores.add_metric([namespace, name, task, metric, model], score)
        jobs_by_phase = GaugeMetricFamily("finetune_jobs", "FineTuneJobs by phase.", labels=["phase"])
        for phase, count in counts.items():
            jobs_by_phase.add_metric([phase], count)
        yield jobs_by_phase
        yield phases
        yield from families.values()
        yield task_scores


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Info("finetune_operator_build", "Version of the operator.", registry=r)
        self.build_info.info({"version": __version__})
        self.job_series = JobCollector()
        r.register(self.job_series)
        self.reconciles = Counter("finetune_reconcile_total", "Reconcile passes by outcome.", ["outcome"], registry=r)
        self.reconcile_seconds = Histogram(
            "finetune_reconcile_duration_seconds", "Duration of one reconcile pass.", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.sandboxes_swept = Counter(
            "finetune_sandboxes_swept_total", "Sandboxes deleted by the sweep: their FineTuneJob is gone (orphaned) "
            "or has another sandbox (superseded).", ["reason"], registry=r)
        self.tenant_io_timeouts = Counter(
            "finetune_tenant_io_timeouts_total", "Calls to a tenant's storage that did not answer in time.",
            registry=r)
        # Per tenant (TenantPolicy name): what its jobs hold and use, against its budget.
        self.tenant_jobs = Gauge("finetune_tenant_jobs", "FineTuneJobs of a tenant by phase.", ["policy", "phase"],
                                 registry=r)
        self.tenant_running = Gauge("finetune_tenant_running_jobs", "Jobs of a tenant whose run exists and has not "
                                    "finished (a search counts as search.parallelism).", ["policy"], registry=r)
        self.tenant_gpus = Gauge("finetune_tenant_gpus_in_use", "GPUs requested by a tenant's running pods (not "
                                 "those of runs queued, preempted or suspended).", ["policy"],
                                 registry=r)
        self.tenant_gpu_seconds = Counter("finetune_tenant_gpu_seconds", "GPU-seconds used by a tenant's jobs "
                                          "(counted as the operator sees them).", ["policy"], registry=r)
        self.tenant_gpu_hours_used = Gauge("finetune_tenant_gpu_hours_used", "GPU-hours a tenant used in the current "
                                           "budget period.", ["policy"], registry=r)
        self.tenant_gpu_hours_budget = Gauge("finetune_tenant_gpu_hours_budget", "GPU-hours a tenant may use per "
                                             "period (absent: no budget).", ["policy"], registry=r)
        self._per_tenant = (self.tenant_running, self.tenant_gpus, self.tenant_gpu_seconds, self.tenant_gpu_hours_used,
                            self.tenant_gpu_hours_budget)

    def reconcile_count(self) -> float:
        """Reconcile passes so far, all outcomes (the liveness probe's answer)."""
        return sum(s.value for metric in self.reconciles.collect() for s in metric.samples
                   if s.name.endswith("_total"))

    def observe_job(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.job_series.observe((namespace, name), job_state(status))

    def forget_job(self, namespace: str, name: str) -> None:
        self.job_series.forget((namespace, name))

    def observe_tenant(self, policy: str, status: dict[str, Any], added_gpu_seconds: float,
                       budget_gpu_hours: float | None) -> None:
        for phase, count in (status.get("jobs") or {}).items():
            self.tenant_jobs.labels(policy, phase).set(count)
        self.tenant_running.labels(policy).set(status.get("runningJobs") or 0)
        self.tenant_gpus.labels(policy).set(status.get("gpusInUse") or 0)
        self.tenant_gpu_seconds.labels(policy).inc(max(0.0, added_gpu_seconds))
        self.tenant_gpu_hours_used.labels(policy).set((status.get("usage") or {}).get("gpuSeconds", 0.0) / 3600)
        if budget_gpu_hours is None:
            self._remove(self.tenant_gpu_hours_budget, (policy,))
        else:
            self.tenant_gpu_hours_budget.labels(policy).set(budget_gpu_hours)

    def retain_tenants(self, policies: set[str]) -> None:
        """Remove the series of tenants whose TenantPolicy is gone."""
        known = {sample.labels["policy"] for metric in self.tenant_running.collect() for sample in metric.samples}
        for policy in known - policies:
            for metric in self._per_tenant:
                self._remove(metric, (policy,))
            for phase in Phase:
                self._remove(self.tenant_jobs, (policy, phase.value))

    @staticmethod
    def _remove(metric: Gauge | Counter, key: tuple[str, ...]) -> None:
        try:
            metric.remove(*key)
        except KeyError:
            pass
