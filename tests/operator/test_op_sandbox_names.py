"""Which name a job's sandbox gets when a name is taken: the first of the job's names (names.sandbox_candidates)
that is absent or the job's own; a namespace that is someone else's (a squatter, a hash collision) is never
adopted, written into or deleted. Whole passes of `Reconciler.reconcile` over an in-memory API."""

from __future__ import annotations

import pytest

from finetune_operator import k8s, tenancy
from finetune_operator.builders import names
from finetune_operator.config import OperatorConfig
from finetune_operator.reconcile import sweep_verdict
from op_testdata import ROOT, job, minimal_spec
from test_op_tenancy_reconcile import SECRET, FakeKube, inputs_exist, passes, with_reconciler  # noqa: F401 (a fixture)

CFG = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml")
JOB = job(minimal_spec(resources={"gpusPerWorker": 0, "nodePool": "cpu"}))
UID = JOB["metadata"]["uid"]
FIRST, SECOND, THIRD = names.sandbox_candidates(CFG.sandboxPrefix, JOB["metadata"])


def namespace(name: str, owner: str) -> dict:
    """`ours`: the job's sandbox (its uid label); `other`: someone else's namespace of that name."""
    labels = {names.LABEL_JOB_UID: UID, names.LABEL_MANAGED_BY: names.MANAGER} if owner == "ours" else {"owner": "x"}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels, "uid": f"{name}-uid"},
            "status": {"phase": "Active"}}


def test_the_names_are_distinct_stable_and_the_first_is_the_one_of_old():
    assert len({FIRST, SECOND, THIRD}) == 3
    assert FIRST == names.sandbox_namespace(CFG.sandboxPrefix, "team-a", "support-bot", UID)
    assert names.sandbox_candidates(CFG.sandboxPrefix, JOB["metadata"]) == [FIRST, SECOND, THIRD]
    assert all(name.startswith(f"{CFG.sandboxPrefix}-team-a-support-bot-") and len(name) <= 63
               for name in (FIRST, SECOND, THIRD))


@pytest.mark.parametrize("existing, recorded, found, owned", [
    ({}, None, FIRST, False),                                            # a new job: its first name
    ({FIRST: "ours"}, FIRST, FIRST, True),
    ({FIRST: "other"}, None, SECOND, False),                              # taken: the next name, to be made
    ({FIRST: "other", SECOND: "ours"}, None, SECOND, True),               # its status write was lost: found anyway
    ({FIRST: "other", SECOND: "other"}, None, THIRD, False),
    ({FIRST: "other", SECOND: "other", THIRD: "other"}, None, FIRST, False),  # every name taken: a conflict
    ({SECOND: "ours"}, SECOND, SECOND, True),                              # the first freed since: it stays where it is
    ({}, FIRST, FIRST, False),                                            # deleted after its TTL: not made elsewhere
    ({}, SECOND, FIRST, False),                                           # its later sandbox gone: from the first again
], ids=["new", "first", "first-taken", "second-found", "two-taken", "all-taken", "recorded-second",
        "recorded-first-gone", "recorded-second-gone"])
def test_which_name_is_the_jobs_sandbox(existing, recorded, found, owned):
    kube = FakeKube(*(namespace(name, owner) for name, owner in existing.items()))
    attempt, ns = with_reconciler(kube, CFG, lambda r: r._find_sandbox(JOB["metadata"], {"sandboxNamespace": recorded}))
    assert names.sandbox_of(CFG.sandboxPrefix, JOB["metadata"], attempt) == found
    assert (ns is not None and ns["metadata"].get("labels", {}).get(names.LABEL_JOB_UID) == UID) is owned


def test_a_job_whose_first_name_is_taken_runs_in_its_second_and_leaves_the_squatter_alone():
    squatter = namespace(FIRST, "other")
    kube = FakeKube(JOB, SECRET, squatter)
    first, second = passes(kube, CFG, tenancy.Tenancy(), tenancy.Tenancy())
    assert second.status["sandboxNamespace"] == SECOND and not second.permanent
    assert kube.store[(k8s.Namespace, None, FIRST)] == squatter
    in_sandbox = {(o["kind"], o["metadata"]["namespace"]) for o in kube.store.values()
                  if o["kind"] not in ("Namespace", "FineTuneJob") and o["metadata"].get("namespace") != "team-a"}
    assert in_sandbox and {ns for _, ns in in_sandbox} == {SECOND}, in_sandbox
    assert ("PyTorchJob", SECOND) in in_sandbox
    ns = kube.store[(k8s.Namespace, None, SECOND)]
    assert ns["metadata"]["labels"][names.LABEL_JOB_UID] == UID

    stored = kube.store[(k8s.FineTuneJob, "team-a", "support-bot")]
    assert sweep_verdict(ns, stored, CFG.sandboxPrefix) == "keep"  # the sweep keeps a sandbox of a later name
    assert with_reconciler(kube, CFG, lambda r: r.finalize(stored, 0)) is False
    assert kube.deleted == [("Namespace", SECOND)]  # the job's own sandbox goes, the squatter stays


def test_a_name_taken_between_the_read_and_the_create_is_not_adopted_and_the_next_pass_takes_the_next():
    class Raced(FakeKube):
        """Someone makes a namespace of the sandbox's first name just before the operator's create."""

        async def create_if_absent(self, obj):
            if obj["kind"] == "Namespace" and obj["metadata"]["name"] == FIRST:
                self._put(namespace(FIRST, "other"))
            return await super().create_if_absent(obj)

    kube = Raced(JOB, SECRET)
    raced, next_pass = passes(kube, CFG, tenancy.Tenancy(), tenancy.Tenancy())
    assert not raced.permanent and raced.requeue_after
    assert not any(o["metadata"].get("namespace") == FIRST for o in kube.store.values())  # nothing went into it
    assert next_pass.status["sandboxNamespace"] == SECOND and not next_pass.permanent
