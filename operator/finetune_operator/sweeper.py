"""The sweep of sandbox namespaces, every sweepIntervalSeconds for as long as the operator runs: the
namespaces this operator made are listed and each is judged by Reconciler.sweep (deleted when its
FineTuneJob is gone, deleted with its finalizer stripped, or has another sandbox now).

A loop of the operator's own and not a kopf timer: kopf puts its finalizer on every object a timer
watches, so each sandbox would wait for the operator to be deleted, and hang once the operator is
uninstalled. Namespaces an earlier version left that finalizer on are released here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from finetune_operator import k8s
from finetune_operator.builders import names as n

if TYPE_CHECKING:
    from finetune_operator.reconcile import Reconciler

log = logging.getLogger(__name__)


async def sweep_once(reconciler: Reconciler) -> dict[str, str]:
    """One sweep; the verdict of each sandbox not being deleted, by name."""
    verdicts: dict[str, str] = {}
    for namespace in await reconciler.kube.list(k8s.Namespace, None, labels={n.LABEL_MANAGED_BY: n.MANAGER}):
        meta = namespace["metadata"]
        if not (meta.get("labels") or {}).get(n.LABEL_JOB_UID):
            continue
        try:
            if n.FINALIZER in (meta.get("finalizers") or []):
                await release_finalizer(reconciler.kube, namespace)
            if not meta.get("deletionTimestamp"):
                verdicts[meta["name"]] = await reconciler.sweep(namespace)
        except Exception:  # noqa: BLE001 - one namespace's failure leaves the others swept
            log.exception("sweeping sandbox %s failed", meta["name"])
    return verdicts


async def release_finalizer(kube: Any, namespace: dict[str, Any]) -> None:
    """Take the operator's finalizer off a sandbox namespace (put there by a kopf timer of an earlier
    version); the resourceVersion makes it a no-op on a namespace changed since it was listed."""
    meta = namespace["metadata"]
    rest = [f for f in meta.get("finalizers") or [] if f != n.FINALIZER]
    await kube.merge_patch(k8s.Namespace, meta["name"], None,
                           {"metadata": {"finalizers": rest, "resourceVersion": meta.get("resourceVersion")}})
    log.info("released sandbox %s from the finalizer %s", meta["name"], n.FINALIZER)


async def follow(reconciler: Reconciler, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await sweep_once(reconciler)
        except Exception:  # noqa: BLE001 - the loop outlives any one failed list
            log.exception("sweeping sandboxes failed")
