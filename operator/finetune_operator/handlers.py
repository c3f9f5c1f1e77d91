"""kopf wiring: thin handlers that parse and delegate to the one level-based reconcile.

create / update (spec) / resume and a periodic timer all call `Reconciler.reconcile`; waiting is a
kopf.TemporaryError(delay=...), a spec that cannot run is a kopf.PermanentError (the timer still
re-validates, so creating a missing Secret later lets the job go on). Deletion goes through the
finalizer `finetune.dev/cleanup`: the sandbox namespace is deleted and waited for, at most
OperatorConfig.deletionTimeoutSeconds, then the finalizer is released anyway with a Warning event.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import kopf
from prometheus_client import start_http_server

from finetune_operator import k8s
from finetune_operator.api import types as t
from finetune_operator.builders import names as n
from finetune_operator.config import OperatorConfig
from finetune_operator.metrics import Metrics
from finetune_operator.reconcile import REQUEUE_SHORT, Reconciler

FINALIZER = "finetune.dev/cleanup"
ANNOTATION_PREFIX = "finetune.dev"
log = logging.getLogger(__name__)


def configure_settings(settings: kopf.OperatorSettings) -> None:
    settings.persistence.finalizer = FINALIZER
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
        memo.reconciler = Reconciler(kube, cfg, metrics)

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In-cluster service account first, then $KUBECONFIG / ~/.kube/config (no client library needed).
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.cleanup(id="shutdown", registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        await memo.reconciler.kube.close()

    @kopf.on.probe(id="reconciles", registry=registry)
    def probe(memo: kopf.Memo, **_: Any) -> float:
        return memo.reconciler.metrics.reconcile_count()

    async def run(body: Any, memo: kopf.Memo) -> None:
        outcome = await memo.reconciler.reconcile(plain(body))
        if outcome.permanent:
            raise kopf.PermanentError(outcome.permanent)
        if outcome.requeue_after:
            raise kopf.TemporaryError(f"waiting ({outcome.status.get('phase')})", delay=outcome.requeue_after)

    @kopf.on.create(**resource, id="create")
    async def on_create(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await run(body, memo)

    @kopf.on.update(**resource, field="spec", id="update")
    async def on_update(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await run(body, memo)

    @kopf.on.resume(**resource, id="resume")
    async def on_resume(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await run(body, memo)

    @kopf.timer(**resource, id="reconcile", interval=cfg.reconcileIntervalSeconds, initial_delay=cfg.reconcileIntervalSeconds,
                sharp=False)
    async def periodic(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        if body.metadata.get("deletionTimestamp"):
            return
        await memo.reconciler.on_timer(plain(body))  # a requeue is the next tick

    # Sandboxes whose FineTuneJob went without the finalizer (or moved to another sandbox) are swept.
    @kopf.timer("", "v1", "namespaces", registry=registry, id="sweep", interval=cfg.sweepIntervalSeconds,
                initial_delay=cfg.sweepIntervalSeconds, sharp=False,
                labels={n.LABEL_MANAGED_BY: n.MANAGER, n.LABEL_JOB_UID: kopf.PRESENT})
    async def sweep(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        if not body.metadata.get("deletionTimestamp"):
            await memo.reconciler.sweep(plain(body))

    @kopf.on.delete(**resource, id="cleanup")
    async def on_delete(body: kopf.Body, memo: kopf.Memo, runtime: Any, **_: Any) -> None:
        released = await memo.reconciler.finalize(plain(body), runtime.total_seconds())
        if not released:
            raise kopf.TemporaryError("waiting for the sandbox namespace to go", delay=REQUEUE_SHORT)
