"""Prometheus metrics of the operator (served on OperatorConfig.operatorMetricsPort at /metrics).

Per-job gauges carry (namespace, name) labels and are removed when the FineTuneJob goes away, so a
deleted job does not linger in dashboards.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from finetune_operator import __version__
from finetune_operator.api.types import Phase

JOB_LABELS = ("namespace", "name")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info("finetune_operator_build", "Version of the operator.", registry=r)
        self.build_info.info({"version": __version__})
        self.jobs = Gauge("finetune_jobs", "FineTuneJobs by phase.", ["phase"], registry=r)
        self.reconciles = Counter("finetune_reconcile_total", "Reconcile passes by outcome.", ["outcome"], registry=r)
        self.reconcile_seconds = Histogram(
            "finetune_reconcile_duration_seconds", "Duration of one reconcile pass.", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.progress = Gauge("finetune_job_progress_percent", "Percent of training steps done.", JOB_LABELS, registry=r)
        self.step = Gauge("finetune_job_step", "Optimizer steps done.", JOB_LABELS, registry=r)
        self.loss = Gauge("finetune_job_loss", "Latest training loss.", JOB_LABELS, registry=r)
        self.tokens = Gauge("finetune_job_tokens_per_second", "Training throughput.", JOB_LABELS, registry=r)
        self.eta = Gauge("finetune_job_eta_seconds", "Estimated seconds to the end of training.", JOB_LABELS, registry=r)
        self.gpu_seconds = Gauge("finetune_job_gpu_seconds", "GPU time used by the run.", JOB_LABELS, registry=r)
        self.restarts = Gauge("finetune_job_restarts", "Pod restarts of the run.", JOB_LABELS, registry=r)
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
                                    "finished.", ["policy"], registry=r)
        self.tenant_gpus = Gauge("finetune_tenant_gpus_in_use", "GPUs requested by a tenant's running jobs.", ["policy"],
                                 registry=r)
        self.tenant_gpu_seconds = Counter("finetune_tenant_gpu_seconds", "GPU-seconds used by a tenant's jobs "
                                          "(counted as the operator sees them).", ["policy"], registry=r)
        self.tenant_gpu_hours_used = Gauge("finetune_tenant_gpu_hours_used", "GPU-hours a tenant used in the current "
                                           "budget period.", ["policy"], registry=r)
        self.tenant_gpu_hours_budget = Gauge("finetune_tenant_gpu_hours_budget", "GPU-hours a tenant may use per "
                                             "period (absent: no budget).", ["policy"], registry=r)
        self._per_tenant = (self.tenant_running, self.tenant_gpus, self.tenant_gpu_seconds, self.tenant_gpu_hours_used,
                            self.tenant_gpu_hours_budget)
        self._per_job = (self.progress, self.step, self.loss, self.tokens, self.eta, self.gpu_seconds, self.restarts)
        self._phases: dict[tuple[str, str], str] = {}
        for phase in Phase:
            self.jobs.labels(phase.value).set(0)

    def reconcile_count(self) -> float:
        """Reconcile passes so far, all outcomes (the liveness probe's answer)."""
        return sum(s.value for metric in self.reconciles.collect() for s in metric.samples
                   if s.name.endswith("_total"))

    def observe_job(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        key = (namespace, name)
        self._phases[key] = status.get("phase", Phase.Pending.value)
        self._recount()
        progress = status.get("progress") or {}
        values = {
            self.progress: progress.get("percent"),
            self.step: progress.get("step"),
            self.loss: progress.get("loss"),
            self.tokens: progress.get("tokensPerSecond"),
            self.eta: progress.get("etaSeconds"),
            self.gpu_seconds: status.get("gpuSeconds"),
            self.restarts: status.get("restarts"),
        }
        for gauge, value in values.items():
            if value is None:
                self._remove(gauge, key)
            else:
                gauge.labels(*key).set(float(value))

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

    def forget_job(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self._phases.pop(key, None)
        self._recount()
        for gauge in self._per_job:
            self._remove(gauge, key)

    @staticmethod
    def _remove(gauge: Gauge | Counter, key: tuple[str, ...]) -> None:
        try:
            gauge.remove(*key)
        except KeyError:
            pass

    def _recount(self) -> None:
        counts = {phase.value: 0 for phase in Phase}
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.jobs.labels(phase).set(count)
