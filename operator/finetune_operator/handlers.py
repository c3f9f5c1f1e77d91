"""kopf wiring: thin handlers that parse and delegate to the one level-based reconcile.

create / update (spec) / resume and a periodic timer all call `Reconciler.reconcile`; waiting is a
kopf.TemporaryError(delay=...), a spec that cannot run is a kopf.PermanentError (the timer still
re-validates, so creating a missing Secret later lets the job go on). Deletion goes through the
finalizer `finetune.dev/cleanup`: the sandbox namespace is deleted and waited for, at most
OperatorConfig.deletionTimeoutSeconds, then the finalizer is released anyway with a Warning event.

Tenancy: kopf indexes keep the labels of every namespace, every TenantPolicy and a summary of every
FineTuneJob; each pass gets a snapshot of them (tenancy.Tenancy). A timer per TenantPolicy writes
its status (jobs, GPUs, GPU-hour usage) and per-tenant metrics. No handler watches namespaces: the
sweep of sandboxes whose job is gone is a task started here (sweeper.py), so no sandbox carries kopf's
finalizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from typing import Any, AsyncIterator

import kopf
from prometheus_client import start_http_server

from finetune_operator import cluster_networks, k8s, sweeper, tenancy
from finetune_operator.api import tenant
from finetune_operator.api import types as t
from finetune_operator.builders import names as n
from finetune_operator.config import OperatorConfig
from finetune_operator.metrics import Metrics
from finetune_operator.reconcile import REQUEUE_SHORT, Reconciler

ANNOTATION_PREFIX = "finetune.dev"
log = logging.getLogger(__name__)


def configure_settings(settings: kopf.OperatorSettings) -> None:
    settings.persistence.finalizer = n.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 30
    settings.posting.enabled = False  # events are posted by the reconcile (lightkube), not from logs
    settings.peering.standalone = True


def plain(body: Any) -> dict[str, Any]:
    return copy.deepcopy({key: body[key] for key in body})


# kopf keeps a failed handler's message in the job's annotations, which its tenant reads.
INTERNAL_ERROR = "the operator hit an internal error (the details are in its log); retrying"
INTERNAL_ERROR_DELAY = 60.0


@contextlib.asynccontextmanager
async def internal_errors_hidden(body: Any) -> AsyncIterator[None]:
    """An unexpected exception is logged with its traceback and reaches kopf as a retry with a fixed
    message: its text (an API error naming another namespace, a URL, an address) never lands in the
    annotations of a tenant's object."""
    try:
        yield
    except (kopf.TemporaryError, kopf.PermanentError):
        raise
    except Exception:
        meta = body.get("metadata") or {}
        log.exception("%s/%s: the reconcile failed", meta.get("namespace"), meta.get("name"))
        raise kopf.TemporaryError(INTERNAL_ERROR, delay=INTERNAL_ERROR_DELAY) from None


def register(registry: kopf.OperatorRegistry, cfg: OperatorConfig, *, start_metrics_server: bool = True) -> None:
    """Register every handler on `registry` (kopf's decorators, bound to this configuration)."""
    resource = dict(group=t.GROUP, version=t.VERSION, plural=t.PLURAL, registry=registry)

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure_settings(settings)
        # The client first: if it cannot be made (no kubeconfig yet), kopf retries this activity,
        # and the metrics port must not have been taken by the failed attempt.
        kube = k8s.Kube()
        metrics = Metrics()
        if start_metrics_server:
            start_http_server(cfg.operatorMetricsPort, registry=metrics.registry)
        warning = cluster_networks.warning(cfg)
        if warning:
            log.warning(warning)
        known = cluster_networks.ClusterNetworks(cfg)
        await known.read(kube)
        (log.info if known.api_server else log.warning)(
            "excepted from every sandbox's S3 egress besides clusterNetworks: %s", known.describe())
        memo.reconciler = Reconciler(kube, known.excepting(), metrics)
        if cfg.apiServerRefreshSeconds > 0:
            memo.cluster_follower = asyncio.create_task(cluster_networks.follow(memo.reconciler, known))
        # Sandboxes whose FineTuneJob went without the finalizer (or moved to another sandbox) are swept.
        memo.sandbox_sweeper = asyncio.create_task(sweeper.follow(memo.reconciler, cfg.sweepIntervalSeconds))

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In-cluster service account first, then $KUBECONFIG / ~/.kube/config (no client library needed).
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.cleanup(id="shutdown", registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        for task in (memo.get("cluster_follower"), memo.get("sandbox_sweeper")):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await memo.reconciler.kube.close()

    @kopf.on.probe(id="reconciles", registry=registry)
    def probe(memo: kopf.Memo, **_: Any) -> float:
        return memo.reconciler.metrics.reconcile_count()

    # What every pass needs to know of tenancy, kept current by kopf's watches (no list per pass).
    @kopf.index("", "v1", "namespaces", registry=registry, id="namespace_labels")
    def namespace_labels(name: str, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, str]]:
        return {name: dict(labels)}

    @kopf.index(t.GROUP, t.VERSION, tenant.PLURAL, registry=registry, id="tenant_policies")
    def tenant_policies(name: str, body: kopf.Body, **_: Any) -> dict[str, tenancy.Policy]:
        return {name: tenancy.Policy.from_body(plain(body))}  # parsed once per change, not once per pass

    @kopf.index(**resource, id="job_summaries")
    def job_summaries(namespace: str, body: kopf.Body, **_: Any) -> dict[str, tenancy.JobSummary]:
        return {namespace: tenancy.job_summary(plain(body))}

    def snapshot(kwargs: dict[str, Any]) -> tenancy.Tenancy:
        return tenancy.Tenancy(
            policies=[policy for store in kwargs["tenant_policies"].values() for policy in store],
            namespace_labels={ns: next(iter(store)) for ns, store in kwargs["namespace_labels"].items() if store},
            jobs=[job for store in kwargs["job_summaries"].values() for job in store],
        )

    async def run(body: Any, memo: kopf.Memo, kwargs: dict[str, Any]) -> None:
        async with internal_errors_hidden(body):
            outcome = await memo.reconciler.reconcile(plain(body), snapshot(kwargs))
        if outcome.permanent:
            raise kopf.PermanentError(outcome.permanent)
        if outcome.requeue_after:
            raise kopf.TemporaryError(f"waiting ({outcome.status.get('phase')})", delay=outcome.requeue_after)

    @kopf.on.create(**resource, id="create")
    async def on_create(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        await run(body, memo, kwargs)

    @kopf.on.update(**resource, field="spec", id="update")
    async def on_update(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        await run(body, memo, kwargs)

    @kopf.on.resume(**resource, id="resume")
    async def on_resume(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        await run(body, memo, kwargs)

    @kopf.timer(**resource, id="reconcile", interval=cfg.reconcileIntervalSeconds, initial_delay=cfg.reconcileIntervalSeconds,
                sharp=False)
    async def periodic(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        if body.metadata.get("deletionTimestamp"):
            return
        await memo.reconciler.on_timer(plain(body), snapshot(kwargs))  # a requeue is the next tick

    policy = dict(group=t.GROUP, version=t.VERSION, plural=tenant.PLURAL, registry=registry)

    # A timer only (it first fires when the policy is seen): no handler state in the policy's
    # annotations, so a policy synced by Argo CD or Flux shows no drift. (kopf puts its finalizer on
    # objects with timers, to stop them on deletion.)
    @kopf.timer(**policy, id="policy-status", interval=cfg.reconcileIntervalSeconds, sharp=False)
    async def policy_status(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
        if not body.metadata.get("deletionTimestamp"):
            await memo.reconciler.reconcile_policy(plain(body), snapshot(kwargs))

    @kopf.on.delete(**resource, id="cleanup")
    async def on_delete(body: kopf.Body, memo: kopf.Memo, runtime: Any, **_: Any) -> None:
        async with internal_errors_hidden(body):
            released = await memo.reconciler.finalize(plain(body), runtime.total_seconds())
        if not released:
            raise kopf.TemporaryError("waiting for the sandbox namespace to go", delay=REQUEUE_SHORT)
