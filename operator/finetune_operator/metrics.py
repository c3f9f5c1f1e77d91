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

    def forget_job(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self._phases.pop(key, None)
        self._recount()
        for gauge in self._per_job:
            self._remove(gauge, key)

    @staticmethod
    def _remove(gauge: Gauge, key: tuple[str, str]) -> None:
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
