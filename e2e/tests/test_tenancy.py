"""Tenant policies and real Kueue on the local control plane (KWOK GPU pools): a TenantPolicy governs
its namespaces (violations, defaults, status, a running-job limit, a GPU-hour budget), and two tenants
share GPUs through Kueue in one cohort (quota, borrowing, reclaim by preemption, readmission).

Objects that are cluster-scoped (policies, flavors, ClusterQueues, PriorityClasses) carry a suffix
unique to the test run and are deleted at the end of each test.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from e2e.localcluster import kueue
from e2e.localcluster.paths import REPO_ROOT
from e2e.tests.test_control_plane import _wait_for
from e2e.tests.test_operator_cluster import (
    SIM_DURATION,
    annotate_replicas,
    annotate_run,
    cfg,  # noqa: F401 - a fixture
    conditions,
    credentials,
    events_with_reason,
    ftj,
    get_or_none,
    owned_namespaces,
    printed_columns,
    job_uid,
    sandbox_of,
    start_suspended_and_annotate,
    status_of,
    wait_phase,
    wait_status,
)
from finetune_operator.builders import names as n

pytestmark = pytest.mark.cluster

TENANT_LABEL = "finetune.dev/tenant"
GPU = "nvidia.com/gpu"


def tenant_namespace(kube, name: str, tenant: str) -> str:
    kube.run("label", "namespace", name, f"{TENANT_LABEL}={tenant}", "--overwrite")
    return name


def extra_namespace(kube, request, name: str, tenant: str) -> str:
    kube.apply({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {"finetune.dev/test": "true", TENANT_LABEL: tenant}}})
    request.addfinalizer(lambda: kube.run("delete", "namespace", name, "--wait=false", check=False))
    return name


def policy(name: str, tenant: str, **spec) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "TenantPolicy", "metadata": {"name": name},
            "spec": {"namespaceSelector": {"matchLabels": {TENANT_LABEL: tenant}}, **spec}}


def policy_status(kube, name: str) -> dict:
    return (get_or_none(kube, "tenantpolicy", name) or {}).get("status") or {}


def wait_policy(kube, name: str, check, what: str, timeout: float = 60) -> dict:
    return _wait_for(lambda: (s := policy_status(kube, name)) and check(s) and s, timeout,
                     f"TenantPolicy {name}: {what}", interval=1)


def gpu_job(name: str, **changes) -> dict:
    return ftj(name, resources={"workers": 1, "gpusPerWorker": 8, "nodePool": "a100", "cpu": "1", "memory": "1Gi"},
               **changes)


def running_reason(status: dict) -> str:
    return conditions(status).get("Running", {}).get("reason", "")


# ---- the policy ----------------------------------------------------------------------------------


def test_a_policy_governs_its_namespaces_refuses_violations_and_shows_its_jobs(kube, operator, cfg, namespace,
                                                                              suffix, cluster_objects):
    tenant = f"gov-{suffix}"
    tenant_namespace(kube, namespace, tenant)
    name = f"gov-{suffix}"
    cluster_objects(policy(name, tenant, nodePools=["cpu"], limits={"maxWorkers": 1, "maxMemoryPerWorker": "2Gi",
                                                                     "defaultActiveDeadlineSeconds": 900}))
    wait_policy(kube, name, lambda s: s.get("namespaces") == [namespace], "its namespace listed")

    kube.apply(credentials(), ftj("too-big", resources={"workers": 2, "gpusPerWorker": 0, "nodePool": "cpu",
                                                         "cpu": "1", "memory": "1Gi"}),
               ftj("wrong-pool", resources={"workers": 1, "gpusPerWorker": 8, "nodePool": "a100", "cpu": "1",
                                            "memory": "1Gi"}),
               ftj("fits"), namespace=namespace)
    for job, field, limit in (("too-big", "spec.resources.workers", "limits.maxWorkers: 1"),
                              ("wrong-pool", "spec.resources.nodePool", "allowed pools: cpu")):
        status = wait_status(kube, namespace, job, lambda s: conditions(s).get("Validated", {}).get("status") == "False",
                             "Validated=False")
        validated = conditions(status)["Validated"]
        assert validated["reason"] == "PolicyViolation", validated
        assert field in validated["message"] and limit in validated["message"] and f"TenantPolicy {name}" in \
            validated["message"], validated
        assert owned_namespaces(kube, job_uid(kube, namespace, job)) == []
    assert {e["involvedObject"]["name"] for e in events_with_reason(kube, namespace, "PolicyViolation")} >= \
        {"too-big", "wrong-pool"}

    status = wait_phase(kube, namespace, "fits", "Succeeded", timeout=120)
    assert status["tenantPolicy"] == name
    ptj = kube.get("pytorchjob", n.pytorchjob_name("1"), sandbox_of(kube, cfg, namespace, "fits"))
    assert ptj["spec"]["runPolicy"]["activeDeadlineSeconds"] == 900  # the policy's default deadline

    counted = wait_policy(kube, name, lambda s: s["jobs"].get("Succeeded") == 1 and s["jobs"].get("Pending") == 2,
                          "jobs by phase")
    assert conditions(counted)["Ready"]["status"] == "True"
    table = kube.run("get", "tenantpolicy", name).stdout
    assert namespace in table and "GPU-HOURS" in table, table

    # A second policy selecting the same namespace: neither governs it, and both say so.
    other = f"gov-other-{suffix}"
    cluster_objects(policy(other, tenant))
    wait_policy(kube, name, lambda s: conditions(s)["Ready"]["reason"] == "AmbiguousTenantPolicy", "overlap reported")
    kube.apply(ftj("after-overlap"), namespace=namespace)
    status = wait_status(kube, namespace, "after-overlap",
                         lambda s: conditions(s).get("Validated", {}).get("reason") == "AmbiguousTenantPolicy",
                         "AmbiguousTenantPolicy")
    assert name in conditions(status)["Validated"]["message"] and other in conditions(status)["Validated"]["message"]


def test_a_running_job_limit_makes_later_jobs_wait_oldest_first(kube, operator, cfg, namespace, suffix,
                                                                 cluster_objects):
    tenant = f"limit-{suffix}"
    tenant_namespace(kube, namespace, tenant)
    cluster_objects(policy(f"limit-{suffix}", tenant, maxRunningJobs=1))
    start_suspended_and_annotate(kube, cfg, namespace, ftj("first"), {"Master": {SIM_DURATION: "15s"}})
    kube.apply(ftj("second"), namespace=namespace)

    held = wait_status(kube, namespace, "second", lambda s: running_reason(s) == "RunningJobLimit", "held")
    assert held["phase"] == "Queued" and "allows 1 running job(s)" in conditions(held)["Running"]["message"]
    assert owned_namespaces(kube, job_uid(kube, namespace, "second")) == []
    wait_phase(kube, namespace, "first", "Succeeded", timeout=120)
    wait_phase(kube, namespace, "second", "Succeeded", timeout=120)


def test_a_gpu_hour_budget_counts_usage_holds_new_runs_and_survives_deletion(kube, operator, cfg, namespace, suffix,
                                                                             cluster_objects):
    tenant = f"budget-{suffix}"
    tenant_namespace(kube, namespace, tenant)
    name = f"budget-{suffix}"
    # 0.02 GPU-hours = 72 GPU-seconds: one 8-GPU pod for 15 s uses it up.
    budget = policy(name, tenant, nodePools=["a100"], budget={"gpuHours": 0.02, "period": "Day"})
    cluster_objects(budget)
    start_suspended_and_annotate(kube, cfg, namespace, gpu_job("spender"), {"Master": {SIM_DURATION: "15s"}})
    spent = wait_phase(kube, namespace, "spender", "Succeeded", timeout=120)
    assert spent["gpuSeconds"] >= 8 * 14, spent

    usage = wait_policy(kube, name, lambda s: s["usage"].get("gpuSeconds", 0) >= spent["gpuSeconds"],
                        "the job's GPU-seconds counted")["usage"]
    assert usage["budgetExhausted"] and usage["gpuHours"] >= 0.02

    # An operator restart neither loses nor counts again what was used (the ledger is in the status).
    time.sleep(2 * cfg.reconcileIntervalSeconds)  # the finished job's last GPU-seconds are counted
    before = policy_status(kube, name)["usage"]["gpuSeconds"]
    operator.kill()
    operator.up()
    time.sleep(3 * cfg.reconcileIntervalSeconds)  # passes of the restarted operator over the policy
    assert policy_status(kube, name)["usage"]["gpuSeconds"] == before
    kube.apply(gpu_job("waiting"), namespace=namespace)
    held = wait_status(kube, namespace, "waiting", lambda s: running_reason(s) == "BudgetExhausted", "held")
    assert held["phase"] == "Queued" and "GPU-hours this day" in conditions(held)["Running"]["message"]
    metrics = operator.metrics_text()
    assert f'finetune_tenant_gpu_hours_budget{{policy="{name}"}} 0.02' in metrics
    assert f'finetune_tenant_gpu_seconds_total{{policy="{name}"}}' in metrics

    # Usage stays when the job that used it is deleted.
    spender_uid = job_uid(kube, namespace, "spender")
    kube.run("delete", "finetunejob", "spender", "-n", namespace)
    after = wait_policy(kube, name, lambda s: all(a["uid"] != spender_uid for a in s["usage"].get("accounted", [])),
                        "the deleted job out of the ledger")
    assert after["usage"]["gpuSeconds"] >= usage["gpuSeconds"] and after["usage"]["budgetExhausted"]
    assert status_of(kube, namespace, "waiting")["phase"] == "Queued"

    # A larger budget lets the waiting job start.
    budget["spec"]["budget"]["gpuHours"] = 100
    kube.apply(budget)
    wait_phase(kube, namespace, "waiting", "Succeeded", timeout=120)


def test_a_used_up_budget_holds_a_queued_run_kueue_has_not_admitted(kube, operator, cfg, namespace, suffix,
                                                                     cluster_objects):
    """A run created while the budget allowed it, still waiting in a ClusterQueue, waits for the budget
    too once it is used up: Kueue would admit it whatever the budget, so its Workload is deactivated."""
    tenant = f"kbudget-{suffix}"
    tenant_namespace(kube, namespace, tenant)
    flavor, open_queue, held_queue = f"a100-kb-{suffix}", f"kb-open-{suffix}", f"kb-held-{suffix}"
    quota = {GPU: kueue.Quota(16), "cpu": "96", "memory": "1360Gi", "ephemeral-storage": "1Ti"}
    held = kueue.cluster_queue(held_queue, {flavor: quota})
    held["spec"]["stopPolicy"] = "Hold"  # admits nothing until the test says so
    spending = kueue.cluster_queue(open_queue, {flavor: quota})
    spending["spec"]["stopPolicy"] = "Hold"  # until the spender's run is annotated
    budget = policy(tenant, tenant, nodePools=["a100"], kueue={"clusterQueues": [open_queue, held_queue]},
                    budget={"gpuHours": 0.02, "period": "Month"})
    cluster_objects(kueue.pool_flavor("a100", flavor), spending, held, budget)

    kube.apply(credentials(), gpu_job("queued", runPolicy={"queueName": held_queue}), namespace=namespace)
    queued_sandbox = annotate_run(kube, cfg, namespace, "queued", {"Master": {SIM_DURATION: "5s"}})
    wait_status(kube, namespace, "queued", lambda s: s.get("queue", {}).get("workload"), "its Workload")

    # Another job of the tenant (the open queue, its default) uses the budget up. A queued run made
    # suspended gets no PyTorchJob until resumed (Kueue would admit it at once): the queue holds it instead.
    kube.apply(gpu_job("spender"), gpu_job("paused", runPolicy={"suspend": True}), namespace=namespace)
    annotate_run(kube, cfg, namespace, "spender", {"Master": {SIM_DURATION: "15s"}})
    spending["spec"]["stopPolicy"] = "None"
    kube.apply(spending)
    spent = wait_phase(kube, namespace, "spender", "Succeeded", timeout=120)
    assert spent["gpuSeconds"] >= 8 * 14, spent
    # The run made suspended, in the same open queue all along: its sandbox and LocalQueue, no run.
    paused_sandbox = sandbox_of(kube, cfg, namespace, "paused")
    assert get_or_none(kube, "localqueue", open_queue, paused_sandbox) is not None
    assert get_or_none(kube, "pytorchjob", n.pytorchjob_name("1"), paused_sandbox) is None
    assert status_of(kube, namespace, "paused")["phase"] == "Suspended"
    usage = wait_policy(kube, tenant, lambda s: s["usage"].get("gpuSeconds", 0) >= spent["gpuSeconds"],
                        "the spender's GPU-seconds counted", timeout=120)["usage"]
    assert usage["budgetExhausted"], usage

    held_run = wait_status(kube, namespace, "queued", lambda s: running_reason(s) == "BudgetExhausted", "held")
    workload = held_run["queue"]["workload"]
    assert held_run["phase"] == "Queued" and f"Kueue Workload {workload} is deactivated" in \
        conditions(held_run)["Running"]["message"]
    assert kube.get("workload", workload, queued_sandbox)["spec"]["active"] is False

    # The queue opens: the inactive Workload is not admitted while the budget is used up.
    held["spec"]["stopPolicy"] = "None"
    kube.apply(held)
    time.sleep(3 * cfg.reconcileIntervalSeconds)
    still = status_of(kube, namespace, "queued")
    assert running_reason(still) == "BudgetExhausted" and not still["queue"]["admitted"], still

    # A larger budget: the Workload is active again, admitted, and the run finishes.
    budget["spec"]["budget"]["gpuHours"] = 100
    kube.apply(budget)
    wait_phase(kube, namespace, "queued", "Succeeded", timeout=120)


# ---- Kueue ---------------------------------------------------------------------------------------


def test_two_tenants_share_gpus_through_kueue_borrow_and_reclaim(kube, operator, cfg, namespace, suffix,
                                                                 cluster_objects, request):
    """Tenants A and B own 8 A100 GPUs each in one cohort. Of A's three 8-GPU jobs, one waits with
    Kueue's reason and one runs on B's idle quota; B's job reclaims it: A's borrowing job is
    preempted, then admitted again and finished."""
    flavor, cohort = f"a100-{suffix}", f"cohort-{suffix}"
    cq_a, cq_b = f"tenant-a-{suffix}", f"tenant-b-{suffix}"
    ns_a = tenant_namespace(kube, namespace, f"a-{suffix}")
    ns_b = extra_namespace(kube, request, f"t-tenant-b-{suffix}", f"b-{suffix}")
    share = {GPU: kueue.Quota(8, borrowing_limit=8), "cpu": "96", "memory": "1360Gi", "ephemeral-storage": "1Ti"}
    held_a = kueue.cluster_queue(cq_a, {flavor: share}, cohort=cohort)
    held_a["spec"]["stopPolicy"] = "Hold"  # no admission until the runs are annotated
    cluster_objects(kueue.pool_flavor("a100", flavor), held_a, kueue.cluster_queue(cq_b, {flavor: share}, cohort=cohort),
                    policy(f"a-{suffix}", f"a-{suffix}", nodePools=["a100"], kueue={"clusterQueues": [cq_a]}),
                    policy(f"b-{suffix}", f"b-{suffix}", nodePools=["a100"], kueue={"clusterQueues": [cq_b]}))

    jobs = ("a1", "a2", "a3")
    kube.apply(credentials(), *(gpu_job(job) for job in jobs), namespace=ns_a)
    # Each run lasts long enough for the waiting one (and a preemption) to be seen through the operator's
    # passes. Which two Kueue admits first is its choice (Workloads created in the same second tie in its
    # FIFO), so the test finds out which one waits rather than assuming it.
    for job in jobs:
        sandbox = sandbox_of(kube, cfg, ns_a, job)
        ptj = _wait_for(lambda: get_or_none(kube, "pytorchjob", n.pytorchjob_name("1"), sandbox), 60, f"{job}'s run")
        assert ptj["spec"]["runPolicy"]["suspend"] is True  # created suspended, left to Kueue
        assert ptj["metadata"]["labels"][n.LABEL_KUEUE_QUEUE] == cq_a
        local_queue = kube.get("localqueue", cq_a, sandbox)
        assert local_queue["spec"]["clusterQueue"] == cq_a
        annotate_replicas(kube, sandbox, n.pytorchjob_name("1"), {"Master": {SIM_DURATION: "90s"}})
    queued = wait_status(kube, ns_a, "a1", lambda s: s.get("queue", {}).get("workload"), "a Workload")
    assert queued["phase"] == "Queued" and queued["queue"]["clusterQueue"] == cq_a

    held_a["spec"]["stopPolicy"] = "None"
    kube.apply(held_a)

    # Kueue's own words: the cohort's 16 GPUs are in use ("insufficient unused quota for ... in flavor ...")
    def waits_for_quota(status: dict) -> bool:
        queue = status.get("queue", {})
        return queue.get("reason") == "Pending" and "quota" in queue.get("message", "")

    def one_waits():
        statuses = {job: status_of(kube, ns_a, job) for job in jobs}
        waiting = [job for job, s in statuses.items() if waits_for_quota(s)]
        admitted = [job for job, s in statuses.items() if s.get("queue", {}).get("admitted")]
        return (waiting[0], statuses[waiting[0]]) if len(waiting) == 1 and len(admitted) == 2 else None

    try:
        third, waiting = _wait_for(one_waits, 90, "one of A's three runs waiting with Kueue's reason")
    except AssertionError as exc:
        states = {j: (status_of(kube, ns_a, j).get("phase"), status_of(kube, ns_a, j).get("queue")) for j in jobs}
        raise AssertionError(f"{exc}; the jobs: {states}") from None
    assert waiting["phase"] == "Queued" and running_reason(waiting) == "Queued"
    assert f"quota for {GPU} in flavor {flavor}" in conditions(waiting)["Running"]["message"], waiting
    # Its place in the ClusterQueue, from Kueue's visibility API through the chart's RBAC: next in line.
    waiting = wait_status(kube, ns_a, third, lambda s: s.get("queue", {}).get("workloadsAhead") == 0, "its place")
    assert "(Pending, next in line)" in conditions(waiting)["Running"]["message"], waiting
    row = printed_columns(kube, ns_a, third, wide=True)  # what `kubectl get ftj -o wide` shows of the waiting run
    assert (row["PHASE"], row["REASON"], row["QUEUE"], row["KUEUE"]) == ("Queued", "Queued", cq_a, "Pending"), row
    first_two = tuple(job for job in jobs if job != third)
    running = {job: wait_phase(kube, ns_a, job, "Running", timeout=60) for job in first_two}
    assert all(s["queue"]["admitted"] for s in running.values())
    cohort_usage = kube.get("clusterqueue", cq_a)["status"]["flavorsUsage"][0]["resources"]
    assert {r["name"]: r.get("borrowed") for r in cohort_usage}[GPU] == "8"  # A borrows B's idle GPUs

    kube.apply(credentials(), gpu_job("b1"), namespace=ns_b)
    preempted = _wait_for(lambda: next((j for j in first_two if status_of(kube, ns_a, j).get("preemptions")), None),
                          90, "a preempted run of tenant A")
    status = status_of(kube, ns_a, preempted)
    assert status["preemptions"] >= 1
    wait_phase(kube, ns_b, "b1", "Succeeded", timeout=120)
    for job in jobs:
        wait_phase(kube, ns_a, job, "Succeeded", timeout=300)
    row = printed_columns(kube, ns_a, preempted, wide=True)
    assert row["PHASE"] == "Succeeded" and row["QUEUE"] == cq_a and int(row["PREEMPTIONS"]) >= 1, row
    reasons = {e["reason"] for e in json.loads(kube.run("get", "events", "-n", ns_a, "-o", "json").stdout)["items"]
               if e["involvedObject"]["name"] == preempted}
    assert {"Queued", "Completed"} <= reasons, reasons  # its wait in Kueue and its end, as Events on the job


def test_the_tenant_example_applies_as_it_is(kube, operator):
    """examples/tenants/platform.yaml (two teams, Kueue queues in a cohort, TenantPolicies) is accepted by
    the API server as it is, and the policies take effect."""
    path = REPO_ROOT / "examples" / "tenants" / "platform.yaml"
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    try:
        kube.run("apply", "--server-side", "--field-manager=e2e-tests", "-f", str(path))
        for name in ("team-a", "team-b"):
            status = wait_policy(kube, name, lambda s: conditions(s).get("Ready", {}).get("status") == "True",
                                 "Ready")
            assert status["namespaces"] == [name]
        assert kube.get("clusterqueue", "team-a")["spec"]["cohortName"] == "gpus"
        # and the team's example job is accepted in its namespace as it is (a dry run: nothing is made)
        kube.run("apply", "--dry-run=server", "--server-side", "--field-manager=e2e-tests", "-n", "team-a",
                 "-f", str(path.parent / "team-a-job.yaml"))
    finally:
        for doc in reversed(documents):
            kube.run("delete", doc["kind"].lower(), doc["metadata"]["name"], "--wait=false", "--ignore-not-found",
                     check=False)
