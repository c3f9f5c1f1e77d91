"""Tenant policies as the reconcile applies them: whole passes of `Reconciler.reconcile` over an
in-memory API (no cluster, no S3). A policy is judged before a run starts and never again for that run;
requireTenantPolicy refuses a job that no policy governs."""

from __future__ import annotations

import asyncio
import copy
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import pytest
from lightkube import ApiError
from lightkube.models import meta_v1

from finetune_operator import k8s, s3, tenancy
from finetune_operator.builders import names
from finetune_operator.config import OperatorConfig
from finetune_operator.metrics import Metrics
from finetune_operator import reconcile
from finetune_operator.reconcile import Reconciler
from finetune_operator.validation import S3Check
from op_testdata import ROOT, job, minimal_spec

CFG = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml")
NOW = datetime(2026, 3, 18, 12, 0, 0, tzinfo=timezone.utc)
TEAM_A = {"finetune.dev/tenant": "team-a"}
LABELS = {"team-a": TEAM_A, "team-b": {"finetune.dev/tenant": "team-b"}}
# The job: 2 workers x 8 GPUs on the a100 pool, reading and writing team-a's bucket.
SPEC = minimal_spec(resources={"nodePool": "a100", "workers": 2, "gpusPerWorker": 8})
# What the policy allowed when the job was created: it fits.
LOOSE = {"namespaceSelector": {"matchLabels": TEAM_A}, "nodePools": ["a100", "cpu"],
         "storage": {"modelURIs": ["s3://models/*"], "datasetURIs": ["s3://team-a/"], "outputURIs": ["s3://team-a/"]},
         "limits": {"maxWorkers": 4, "maxGPUsPerWorker": 8, "maxGPUsPerJob": 16}}


def tightened(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(LOOSE)
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node[key]
    node[leaf] = value
    return spec


def tenants(policy_spec: dict[str, Any] | None) -> tenancy.Tenancy:
    policies = [] if policy_spec is None else [
        tenancy.Policy.from_body({"metadata": {"name": "team-a", "generation": 2}, "spec": policy_spec})]
    return tenancy.Tenancy(policies=policies, namespace_labels=LABELS)


def api_error(code: int, message: str) -> ApiError:
    return ApiError(status=meta_v1.Status(code=code, message=message))


class FakeKube:
    """The API server as the reconcile uses it: objects by (resource, namespace, name); the Secret the
    job names is there, opted in. Namespaces it creates are Active at once."""

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.store: dict[tuple[Any, str | None, str], dict[str, Any]] = {}
        self.deleted: list[tuple[str, str]] = []
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        # Kueue's visibility API by (namespace, LocalQueue): a PendingWorkloadsSummary, an exception to raise,
        # or a delay in seconds; not served (404) where absent, as in a Kueue without it.
        self.pending: dict[tuple[str, str], Any] = {}
        for obj in objects:
            self._put(obj)

    @staticmethod
    def _key(res: Any, name: str, namespace: str | None) -> tuple[Any, str | None, str]:
        return res, namespace, name

    def _put(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        key = self._key(k8s.resource_of(obj), meta["name"], meta.get("namespace"))
        old = self.store.get(key)
        if old is not None and "status" in old and "status" not in obj:
            obj["status"] = old["status"]
        if obj["kind"] == "Namespace":
            obj.setdefault("status", {"phase": "Active"})
        self.store[key] = obj
        return copy.deepcopy(obj)

    def objects(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.store.values() if o["kind"] == kind]

    async def get(self, res: Any, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        found = self.store.get(self._key(res, name, namespace))
        return copy.deepcopy(found) if found is not None else None

    async def list(self, res: Any, namespace: str, labels: dict[str, Any] | None = None,
                   fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (r, ns, _), o in self.store.items() if r is res and ns == namespace
                and all((o["metadata"].get("labels") or {}).get(k) == v for k, v in (labels or {}).items())]

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._put(obj)

    async def pending_workloads(self, namespace: str, local_queue: str) -> dict[str, Any]:
        answer = self.pending.get((namespace, local_queue), api_error(404, "the server could not find the requested resource"))
        if isinstance(answer, (int, float)):
            await asyncio.sleep(answer)
            return {"items": []}
        if isinstance(answer, Exception):
            raise answer
        return copy.deepcopy(answer)

    async def apply_status(self, namespace: str | None, name: str, status: dict[str, Any], kind: str = "FineTuneJob") -> None:
        self.store[self._key(k8s.FineTuneJob, name, namespace)]["status"] = copy.deepcopy(status)

    async def merge_patch(self, res: Any, name: str, namespace: str | None, patch: dict[str, Any]) -> None:
        self.patches.append((res.__name__, name, patch))
        stored = self.store.get(self._key(res, name, namespace))
        if stored is not None and "spec" in patch:
            stored.setdefault("spec", {}).update(patch["spec"])
        if stored is not None and "finalizers" in patch.get("metadata", {}):
            stored["metadata"]["finalizers"] = patch["metadata"]["finalizers"]

    async def delete(self, res: Any, name: str, namespace: str | None = None, uid: str | None = None) -> bool:
        self.deleted.append((res.__name__, name))
        return self.store.pop(self._key(res, name, namespace), None) is not None

    async def create(self, obj: dict[str, Any]) -> None:
        self._put(obj)

    async def create_if_absent(self, obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        if self._key(k8s.resource_of(obj), meta["name"], meta.get("namespace")) in self.store:
            return False
        self._put(obj)
        return True


SECRET = {"apiVersion": "v1", "kind": "Secret",
          "metadata": {"name": "s3-credentials", "namespace": "team-a",
                       "labels": {names.CREDENTIALS_OPT_IN_LABEL: "true"}},
          "data": {"AWS_ACCESS_KEY_ID": "eA==", "AWS_SECRET_ACCESS_KEY": "eQ=="}}


@pytest.fixture(autouse=True)
def inputs_exist(monkeypatch):
    """Every S3 input is there (nothing is asked of a real S3)."""
    monkeypatch.setattr(s3, "check_inputs", lambda endpoint, region, creds, uris, dial: {
        path: S3Check(True) for path in uris})


def with_reconciler(kube: FakeKube, cfg: OperatorConfig, use: Callable[[Reconciler], Awaitable[Any]]) -> Any:
    """`use(reconciler)` run to its end with a Reconciler over `kube`, its I/O pool shut down after."""

    async def run() -> Any:
        reconciler = Reconciler(kube, cfg, Metrics(), clock=lambda: NOW)  # type: ignore[arg-type]
        try:
            return await use(reconciler)
        finally:
            reconciler.io.shutdown()

    return asyncio.run(run())


def passes(kube: FakeKube, cfg: OperatorConfig, *snapshots: tenancy.Tenancy, namespace: str = "team-a") -> list[Any]:
    """One reconcile pass of the stored job per snapshot, in order; the outcomes."""

    async def run(reconciler: Reconciler) -> list[Any]:
        out = []
        for snapshot in snapshots:
            stored = await kube.get(k8s.FineTuneJob, "support-bot", namespace)
            out.append(await reconciler.reconcile(stored, snapshot))
        return out

    return with_reconciler(kube, cfg, run)


def new_job(namespace: str = "team-a", spec: dict[str, Any] = SPEC) -> FakeKube:
    secret = copy.deepcopy(SECRET)
    secret["metadata"]["namespace"] = namespace
    return FakeKube(job(spec, namespace=namespace), secret)


def validated(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == "Validated")


# ---- a policy applies to runs not yet started ----------------------------------------------------

TIGHTENINGS = [
    # what the platform admin changed, the field it refuses, what the message names as the limit
    ("limits.maxGPUsPerWorker", 4, "spec.resources.gpusPerWorker", "limits.maxGPUsPerWorker: 4"),
    ("limits.maxWorkers", 1, "spec.resources.workers", "limits.maxWorkers: 1"),
    ("nodePools", ["cpu"], "spec.resources.nodePool", "allowed pools: cpu"),
    ("storage.datasetURIs", ["s3://team-a/other/"], "spec.datasets[0].uri", "storage.datasetURIs: s3://team-a/other/"),
]


@pytest.mark.parametrize("path, value, field, limit", TIGHTENINGS, ids=[t[0] for t in TIGHTENINGS])
def test_a_tightened_policy_leaves_a_started_run_alone(path, value, field, limit):
    kube = new_job()
    first, second = passes(kube, CFG, tenants(LOOSE), tenants(tightened(path, value)))
    assert validated(first.status)["status"] == "True", first.status
    [ptj] = kube.objects("PyTorchJob")  # the run exists: the job has started
    assert first.status["pytorchJob"] == ptj["metadata"]["name"]

    cond = validated(second.status)
    assert cond["status"] == "True" and cond["reason"] != "PolicyViolation", cond
    assert not second.permanent
    assert kube.deleted == []
    assert kube.objects("PyTorchJob") == [ptj]
    assert second.status["tenantPolicy"] == "team-a"


@pytest.mark.parametrize("path, value, field, limit", TIGHTENINGS, ids=[t[0] for t in TIGHTENINGS])
def test_a_tightened_policy_refuses_a_job_not_started_yet(path, value, field, limit):
    kube = new_job()
    [outcome] = passes(kube, CFG, tenants(tightened(path, value)))
    cond = validated(outcome.status)
    assert (cond["status"], cond["reason"]) == ("False", "PolicyViolation"), cond
    assert cond["message"].startswith(field + ":"), cond["message"]
    assert limit in cond["message"] and "TenantPolicy team-a" in cond["message"], cond["message"]
    assert outcome.permanent  # refused until the spec or the policy changes
    assert kube.objects("PyTorchJob") == [] and kube.objects("Namespace") == []


def test_a_new_run_of_a_started_job_meets_the_tightened_policy():
    """The policy is not judged again for the run that exists; a new runId is a new run, judged anew."""
    kube = new_job()
    tight = tenants(tightened("limits.maxGPUsPerWorker", 4))
    passes(kube, CFG, tenants(LOOSE))
    stored = kube.store[(k8s.FineTuneJob, "team-a", "support-bot")]
    stored["spec"]["runId"] = "2"
    stored["metadata"]["generation"] = 2
    [outcome] = passes(kube, CFG, tight)
    cond = validated(outcome.status)
    assert (cond["status"], cond["reason"]) == ("False", "PolicyViolation"), cond
    assert "limits.maxGPUsPerWorker: 4" in cond["message"]
    assert kube.deleted == []  # the refused run replaces nothing


# ---- requireTenantPolicy --------------------------------------------------------------------------


@pytest.mark.parametrize("require, refused", [(True, True), (False, False)])
def test_require_tenant_policy_refuses_a_job_no_policy_governs(require, refused):
    cfg = CFG.model_copy(update={"requireTenantPolicy": require})
    kube = new_job("team-b")  # the only policy governs team-a
    [outcome] = passes(kube, cfg, tenants(LOOSE), namespace="team-b")
    cond = validated(outcome.status)
    if refused:
        assert (cond["status"], cond["reason"]) == ("False", "NoTenantPolicy"), cond
        assert "namespace team-b is governed by no TenantPolicy" in cond["message"], cond["message"]
        assert "requires one" in cond["message"], cond["message"]
        assert outcome.permanent and kube.objects("PyTorchJob") == [] and kube.objects("Namespace") == []
    else:
        assert (cond["status"], cond["reason"]) == ("True", "Valid"), cond
        assert "tenantPolicy" not in outcome.status
        assert len(kube.objects("PyTorchJob")) == 1


@pytest.mark.parametrize("require", [False, True])
def test_a_policy_that_does_not_parse_refuses_new_jobs_and_leaves_runs_alone(require):
    cfg = CFG.model_copy(update={"requireTenantPolicy": require})
    unparsable = tightened("limits.maxWorkers", 0)
    kube = new_job()
    [refused] = passes(kube, cfg, tenants(unparsable))
    cond = validated(refused.status)
    assert (cond["status"], cond["reason"]) == ("False", "InvalidTenantPolicy"), cond
    assert "TenantPolicy team-a, which does not parse (limits.maxWorkers: " in cond["message"], cond["message"]
    assert refused.permanent and kube.objects("PyTorchJob") == [] and kube.objects("Namespace") == []

    started = new_job()
    passes(started, cfg, tenants(LOOSE))
    [ptj] = started.objects("PyTorchJob")
    [going] = passes(started, cfg, tenants(unparsable))
    assert validated(going.status)["status"] == "True" and not going.permanent
    assert started.objects("PyTorchJob") == [ptj] and started.deleted == [] and started.patches == []


def test_require_tenant_policy_lets_a_governed_job_run():
    cfg = CFG.model_copy(update={"requireTenantPolicy": True})
    kube = new_job()
    [outcome] = passes(kube, cfg, tenants(LOOSE))
    assert validated(outcome.status)["status"] == "True", outcome.status
    assert outcome.status["tenantPolicy"] == "team-a" and len(kube.objects("PyTorchJob")) == 1


# ---- the budget holds queued runs Kueue has not admitted yet -------------------------------------

QUEUED = {**LOOSE, "kueue": {"clusterQueues": ["team-a"]}, "budget": {"gpuHours": 10, "period": "Month"}}


def budget(exhausted: bool) -> tenancy.Tenancy:
    body = {"metadata": {"name": "team-a", "generation": 2}, "spec": QUEUED,
            "status": {"usage": {"gpuHours": 10.0 if exhausted else 1.0, "budgetExhausted": exhausted}}}
    return tenancy.Tenancy(policies=[tenancy.Policy.from_body(body)], namespace_labels=LABELS)


def with_workload(kube: FakeKube, admitted: bool) -> str:
    """Kueue's Workload for the run's PyTorchJob (owned by it), admitted or still waiting for quota; as
    Kueue does, the PyTorchJob stays suspended until its Workload is admitted."""
    [ptj] = kube.objects("PyTorchJob")
    ptj["metadata"]["uid"] = "ptj-uid"
    ptj["spec"]["runPolicy"]["suspend"] = not admitted
    kube.store[(k8s.PyTorchJob, ptj["metadata"]["namespace"], ptj["metadata"]["name"])] = ptj
    condition = ({"type": "Admitted", "status": "True", "reason": "Admitted", "message": "admitted"} if admitted else
                 {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": "insufficient quota"})
    workload = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
                "metadata": {"name": "pytorchjob-train-1-abc", "namespace": ptj["metadata"]["namespace"],
                             "ownerReferences": [{"kind": "PyTorchJob", "uid": "ptj-uid"}]},
                "spec": {"active": True}, "status": {"conditions": [condition]}}
    kube.store[(k8s.Workload, workload["metadata"]["namespace"], workload["metadata"]["name"])] = workload
    return workload["metadata"]["name"]


def running(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Running")


def test_a_queued_run_waits_for_the_budget_until_kueue_admits_it():
    """Kueue admits a queued run whatever the tenant's budget: a run it has not admitted yet waits like a
    run not created yet, its Workload deactivated until the budget allows it again."""
    kube = new_job()
    passes(kube, CFG, budget(False))  # the run is created (suspended, queued) while within the budget
    name = with_workload(kube, admitted=False)
    [held] = passes(kube, CFG, budget(True))
    assert (held.status["phase"], running(held.status)["reason"]) == ("Queued", "BudgetExhausted")
    assert f"Kueue Workload {name} is deactivated" in running(held.status)["message"]
    assert kube.patches == [("Workload", name, {"spec": {"active": False}})]
    assert kube.deleted == []

    [released] = passes(kube, CFG, budget(False))  # a new period, or a larger budget
    assert kube.patches[-1] == ("Workload", name, {"spec": {"active": True}})
    assert running(released.status)["reason"] != "BudgetExhausted"


@pytest.mark.parametrize("answer, ahead", [
    ({"items": [{"metadata": {"name": "WORKLOAD"}, "positionInClusterQueue": 3}]}, 3),
    ({"items": []}, None),  # not in Kueue's queue (yet)
    (None, None),  # the visibility API not served: 404
    (api_error(403, "forbidden"), None),  # not granted
    (api_error(503, "the server is currently unable to handle the request"), None),  # Kueue down
    (30.0, None),  # too slow: the pass goes on without it
], ids=["position", "not-listed", "not-served", "forbidden", "unavailable", "slow"])
def test_a_queued_run_shows_its_place_from_kueues_visibility_api_when_it_can(answer, ahead, monkeypatch):
    monkeypatch.setattr(reconcile, "VISIBILITY_TIMEOUT", 0.2)
    kube = new_job()
    passes(kube, CFG, budget(False))
    name = with_workload(kube, admitted=False)
    sandbox = kube.objects("Workload")[0]["metadata"]["namespace"]
    if answer is not None:
        if isinstance(answer, dict):
            answer["items"] = [{**i, "metadata": {"name": name}} for i in answer["items"]]
        kube.pending[(sandbox, "team-a")] = answer
    [outcome] = passes(kube, CFG, budget(False))
    assert outcome.status["queue"].get("workloadsAhead") == ahead
    assert (f"{ahead} workloads ahead" in running(outcome.status)["message"]) is (ahead is not None)


def test_an_admitted_run_is_not_held_by_the_budget():
    kube = new_job()
    passes(kube, CFG, budget(False))
    with_workload(kube, admitted=True)
    [outcome] = passes(kube, CFG, budget(True))
    assert running(outcome.status)["reason"] != "BudgetExhausted"
    assert kube.patches == []


# ---- a run keeps what its policy filled in when it was made --------------------------------------

# Jobs that name no node pool, priority, deadline or queue: their policy fills them in. A search makes
# trials as it goes (and makes a deleted one again): each the way its first trial was made.
BARE = {"workers": 1, "gpusPerWorker": 0}
FILLED_IN = {"run": minimal_spec(resources=BARE),
             "search": minimal_spec(resources=BARE, evaluation={"everySteps": 5, "maxPerplexityRatio": 1.0},
                                    search={"parameters": {"learningRate": {"values": [1e-4, 3e-4, 1e-3]}},
                                            "trials": 3, "parallelism": 2, "strategy": "grid"})}
DEFAULTS = {**LOOSE, "nodePools": ["cpu", "local"], "limits": {"defaultActiveDeadlineSeconds": 3600},
            "priorityClasses": {"allowed": ["training-low", "training-high"], "default": "training-low"}}
QUEUED_DEFAULTS = {**DEFAULTS, "kueue": {"clusterQueues": ["team-a"]}}
POLICY_CHANGES = [
    # what the platform admin changed, the policy before, the policy after
    ("kueue-removed", QUEUED_DEFAULTS, DEFAULTS),
    ("kueue-added", DEFAULTS, QUEUED_DEFAULTS),
    ("cluster-queue-changed", QUEUED_DEFAULTS, {**DEFAULTS, "kueue": {"clusterQueues": ["team-a-new", "team-a"]}}),
    ("default-priority-changed", DEFAULTS, {**DEFAULTS, "priorityClasses": {
        "allowed": ["training-low", "training-high"], "default": "training-high"}}),
    ("default-deadline-changed", DEFAULTS, {**DEFAULTS, "limits": {"defaultActiveDeadlineSeconds": 600}}),
    ("default-pool-changed", DEFAULTS, {**DEFAULTS, "nodePools": ["local"]}),
]
CHANGE_IDS = [c[0] for c in POLICY_CHANGES]
RUN_KINDS = ("PyTorchJob", "ConfigMap", "LocalQueue", "ResourceQuota", "LimitRange")


@pytest.fixture
def no_documents(monkeypatch):
    """A search's trials have written no documents yet."""
    monkeypatch.setattr(s3, "read_documents", lambda *args, **kwargs: s3.RunDocuments())


def made_of(kube: FakeKube) -> dict[tuple[str, str], dict[str, Any]]:
    """The run's objects in its sandbox, by kind and name."""
    return {(o["kind"], o["metadata"]["name"]): copy.deepcopy(o) for o in kube.store.values() if o["kind"] in RUN_KINDS}


def held_by_kueue(kube: FakeKube, ptj_name: str) -> str:
    """Kueue holds a queued PyTorchJob: suspended, its Workload waiting for quota. The Workload's name."""
    [ptj] = [p for p in kube.objects("PyTorchJob") if p["metadata"]["name"] == ptj_name]
    ptj["metadata"]["uid"] = f"{ptj_name}-uid"
    ptj["spec"]["runPolicy"]["suspend"] = True
    workload = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
                "metadata": {"name": f"pytorchjob-{ptj_name}", "namespace": ptj["metadata"]["namespace"],
                             "ownerReferences": [{"kind": "PyTorchJob", "uid": f"{ptj_name}-uid"}]},
                "spec": {"active": True}, "status": {"conditions": [
                    {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": "insufficient quota"}]}}
    kube.store[(k8s.Workload, workload["metadata"]["namespace"], workload["metadata"]["name"])] = workload
    return workload["metadata"]["name"]


@pytest.mark.parametrize("kind", sorted(FILLED_IN))
@pytest.mark.parametrize("change, before, after", POLICY_CHANGES, ids=CHANGE_IDS)
def test_a_policy_change_leaves_a_started_run_as_it_was_made(change, before, after, kind, no_documents):
    queued = "kueue" in before
    kube = new_job(spec=FILLED_IN[kind])
    passes(kube, CFG, tenants(before))
    names_made = sorted(p["metadata"]["name"] for p in kube.objects("PyTorchJob"))
    workload = held_by_kueue(kube, names_made[0]) if queued else None
    made = made_of(kube)
    if kind == "search":  # someone deleted a trial: it is made again
        del kube.store[(k8s.PyTorchJob, made[("PyTorchJob", names_made[-1])]["metadata"]["namespace"], names_made[-1])]

    [changed] = passes(kube, CFG, tenants(after))
    assert made_of(kube) == made
    assert [p for p in kube.patches if p[0] == "PyTorchJob"] == []  # Kueue's suspend stays Kueue's
    assert changed.status.get("queue", {}).get("clusterQueue") == ("team-a" if queued else None)

    # The user suspends the job: through Kueue (its Workload) when the run was made queued, else itself.
    kube.store[(k8s.FineTuneJob, "team-a", "support-bot")]["spec"]["runPolicy"]["suspend"] = True
    passes(kube, CFG, tenants(after))
    suspended = {name for res, name, patch in kube.patches if res == "PyTorchJob"
                 and patch == {"spec": {"runPolicy": {"suspend": True}}}}
    deactivated = {name for res, name, patch in kube.patches if res == "Workload" and patch == {"spec": {"active": False}}}
    assert (suspended, deactivated) == ((set(), {workload}) if queued else (set(names_made), set()))


@pytest.mark.parametrize("kind", sorted(FILLED_IN))
@pytest.mark.parametrize("change, before, after", POLICY_CHANGES, ids=CHANGE_IDS)
def test_a_policy_change_reaches_a_job_whose_run_is_not_made_yet(change, before, after, kind, no_documents):
    waiting = new_job(spec=FILLED_IN[kind])
    passes(waiting, CFG, tenants({**before, "maxRunningJobs": 0}))  # held: nothing is made
    assert waiting.objects("PyTorchJob") == []
    passes(waiting, CFG, tenants(after))

    fresh, stale = new_job(spec=FILLED_IN[kind]), new_job(spec=FILLED_IN[kind])
    passes(fresh, CFG, tenants(after))
    passes(stale, CFG, tenants(before))
    assert made_of(waiting) == made_of(fresh) != made_of(stale)


@pytest.mark.parametrize("change, before, after, queues_after", [
    ("cluster-queue-changed", QUEUED_DEFAULTS, POLICY_CHANGES[2][2], ["team-a-new"]),
    ("kueue-removed", QUEUED_DEFAULTS, DEFAULTS, []),
    ("unchanged", QUEUED_DEFAULTS, QUEUED_DEFAULTS, ["team-a"]),
], ids=["cluster-queue-changed", "kueue-removed", "unchanged"])
def test_a_new_run_leaves_the_sandbox_only_the_local_queue_it_uses(change, before, after, queues_after):
    """A new runId after the tenant's policy moved its jobs to another ClusterQueue (or off Kueue): the old
    run goes, and with it the LocalQueue of its ClusterQueue; the new run queues where the policy says now."""
    kube = new_job(spec=FILLED_IN["run"])
    passes(kube, CFG, tenants(before))
    assert [q["metadata"]["name"] for q in kube.objects("LocalQueue")] == ["team-a"]
    kube.store[(k8s.FineTuneJob, "team-a", "support-bot")]["spec"]["runId"] = "2"
    passes(kube, CFG, tenants(after))  # the old run is deleted first
    passes(kube, CFG, tenants(after))
    assert [p["metadata"]["name"] for p in kube.objects("PyTorchJob")] == ["train-2"]
    assert sorted(q["metadata"]["name"] for q in kube.objects("LocalQueue")) == queues_after
    assert (("LocalQueue", "team-a") in kube.deleted) is ("team-a" not in queues_after)
