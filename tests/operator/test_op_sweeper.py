"""The sandbox sweep (a loop of the operator's own, not a kopf timer, so no sandbox carries the operator's
finalizer): over an in-memory API, which namespaces it judges, deletes and releases."""

from __future__ import annotations

import kopf

from finetune_operator import sweeper
from finetune_operator.builders import names
from finetune_operator.config import OperatorConfig
from finetune_operator.handlers import register
from op_testdata import ROOT
from test_op_tenancy_reconcile import FakeKube, with_reconciler

CFG = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml")
OTHER_FINALIZER = "example.com/keep"


def sandbox(job: str, uid: str, *, finalizers=(), deleting=False, uid_label=True) -> dict:
    labels = {names.LABEL_MANAGED_BY: names.MANAGER}
    if uid_label:
        labels[names.LABEL_JOB_UID] = uid
    meta = {"name": names.sandbox_namespace(CFG.sandboxPrefix, "team-a", job, uid), "labels": labels,
            "annotations": {names.ANNOTATION_JOB: f"team-a/{job}"}, "finalizers": list(finalizers),
            "resourceVersion": "7", "uid": f"ns-{uid}"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta,
            "status": {"phase": "Terminating" if deleting else "Active"}}


def finetunejob(name: str, uid: str) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "team-a", "uid": uid}, "spec": {}}


def test_a_sweep_deletes_orphans_keeps_live_sandboxes_and_releases_the_old_finalizer():
    kept = sandbox("live", "uid-live", finalizers=[names.FINALIZER, OTHER_FINALIZER])
    orphan = sandbox("gone", "uid-gone")
    leaving = sandbox("leaving", "uid-leaving", finalizers=[names.FINALIZER], deleting=True)
    unlabelled = sandbox("other", "uid-other", finalizers=[names.FINALIZER], uid_label=False)
    kube = FakeKube(kept, orphan, leaving, unlabelled, finetunejob("live", "uid-live"))
    verdicts = with_reconciler(kube, CFG, sweeper.sweep_once)
    name = lambda ns: ns["metadata"]["name"]  # noqa: E731
    assert verdicts == {name(kept): "keep", name(orphan): "orphaned"}  # a namespace being deleted is not judged
    assert kube.deleted == [("Namespace", name(orphan))]
    stored = {name(ns): ns["metadata"].get("finalizers") for ns in kube.objects("Namespace")}
    # The operator's finalizer (a kopf timer of an earlier version put it there) is released, others stay;
    # a namespace without the job-uid label is not the operator's sandbox and is left alone.
    assert stored == {name(kept): [OTHER_FINALIZER], name(leaving): [], name(unlabelled): [names.FINALIZER]}
    assert ("Namespace", name(kept), {"metadata": {"finalizers": [OTHER_FINALIZER], "resourceVersion": "7"}}) \
        in kube.patches


def test_one_failing_namespace_leaves_the_others_swept():
    class Flaky(FakeKube):
        async def delete(self, res, name, namespace=None, uid=None):
            if "first" in name:
                raise RuntimeError("the API server hiccuped")
            return await super().delete(res, name, namespace, uid)

    kube = Flaky(sandbox("first", "uid-1"), sandbox("second", "uid-2"))
    with_reconciler(kube, CFG, sweeper.sweep_once)
    assert [ns["metadata"]["name"] for ns in kube.objects("Namespace")] == [sandbox("first", "uid-1")["metadata"]["name"]]


def test_no_kopf_handler_watches_namespaces():
    """kopf puts its finalizer on every object a timer or daemon watches: none may be a namespace."""
    registry = kopf.OperatorRegistry()
    register(registry, CFG, start_metrics_server=False)
    watched = {h.selector.plural or h.selector.any_name for h in registry._spawning.get_all_handlers()}
    assert watched == {"finetunejobs", "tenantpolicies"}, watched
