"""Honest conditions on the local cluster: what users wait on (kubectl, kstatus as Flux, kpt and Helm
4's --wait read it, Argo CD's health check) tells an unschedulable or stalled run from a running one,
and a failed or permanently invalid job from one still in progress.

Jobs run on the KWOK pools, steered as in test_operator_cluster.py. kstatus is sigs.k8s.io/cli-utils'
own code (e2e/runtimes/kstatus/) and the health check runs in Argo CD's Lua VM (e2e/runtimes/argocd-lua/,
through tests/chart/test_argocd_health.py's runner), both on the objects the operator wrote
(`make cluster-build` builds both).
"""

from __future__ import annotations

import time

import pytest

from e2e.localcluster import kstatus
from e2e.tests.test_control_plane import _wait_for
from e2e.tests.test_operator_cluster import (SIM_DURATION, SIM_EXIT_CODE, cfg, credentials, ftj,  # noqa: F401 (cfg)
                                             get_or_none, items, printed_columns, run_policy,
                                             start_suspended_and_annotate)
from e2e.tests.test_tenancy import policy, tenant_namespace
from tests.chart.argocd_cases import HEALTH_LUA
from tests.chart.test_argocd_health import run_scripts

pytestmark = pytest.mark.cluster

# progressStallSeconds of the operator installed for the stall test: a few reconcile passes.
STALL_SECONDS = 15
LONG = "600s"  # a KWOK pod that runs this long outlives the test


@pytest.fixture(scope="module")
def stall_operator(operator):
    """The chart's operator with a short progressStallSeconds, for this module; the default again after."""
    operator.up(log=lambda *_: None, overrides={"progressStallSeconds": STALL_SECONDS})
    yield operator
    operator.up(log=lambda *_: None)


# ---- reading -------------------------------------------------------------------------------------


def conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def words(condition: dict) -> tuple[str, str, str]:
    return condition["status"], condition["reason"], condition["message"]


def wait_job(kube, namespace: str, name: str, check, what: str, timeout: float = 90) -> dict:
    """The FineTuneJob once the operator has written a status for its latest generation that passes check."""
    def current():
        obj = get_or_none(kube, "finetunejob", name, namespace)
        status = (obj or {}).get("status") or {}
        return obj if obj and status.get("observedGeneration") == obj["metadata"]["generation"] and check(obj) else None
    return _wait_for(current, timeout, f"FineTuneJob {namespace}/{name}: {what}", interval=1)


def argocd_health(obj: dict) -> tuple[str, str]:
    """Argo CD's health of the object: the same with the libraries of an argocd-cm script (the
    documented install) and with every library open."""
    restricted, open_libs = (run_scripts(HEALTH_LUA, [obj], open_libs)[0] for open_libs in (False, True))
    assert restricted == open_libs and "error" not in restricted, (restricted, open_libs)
    return restricted["status"], restricted["message"]


def unschedulable_pods(kube, sandbox: str) -> dict[str, str]:
    """pod name -> the scheduler's message, for the sandbox's pods it cannot place."""
    return {p["metadata"]["name"]: c.get("message", "") for p in items(kube, "pods", sandbox)
            for c in p["status"].get("conditions") or []
            if c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable"}


# ---- unschedulable -------------------------------------------------------------------------------

UNSCHEDULABLE_CASES = [
    # resources, pod annotations per replica (the pods that do fit run long, so the run stays unfinished)
    pytest.param({"workers": 1, "gpusPerWorker": 0, "nodePool": "cpu", "cpu": "64", "memory": "1Gi"},
                 {"Master": {SIM_DURATION: LONG}}, id="more-cpu-than-a-node-has"),
    # Two A100 nodes of 8 GPUs: the third pod of 8 GPUs fits nowhere while the others run.
    pytest.param({"workers": 3, "gpusPerWorker": 8, "nodePool": "a100", "cpu": "1", "memory": "1Gi"},
                 {"Master": {SIM_DURATION: LONG}, "Worker": {SIM_DURATION: LONG}}, id="a-gpu-worker-too-many"),
]


@pytest.mark.parametrize("resources, annotations", UNSCHEDULABLE_CASES)
def test_an_unschedulable_run_is_pending_with_the_schedulers_message(kube, operator, cfg, namespace, resources,
                                                                    annotations):
    job = ftj("unplaceable", resources=resources, runPolicy=run_policy())
    sandbox = start_suspended_and_annotate(kube, cfg, namespace, job, annotations)

    def reported_as_pods_are(obj: dict) -> bool:
        running = conditions(obj).get("Running", {})
        pods = unschedulable_pods(kube, sandbox)
        return running.get("reason") == "Unschedulable" and running["message"] in {
            f"pod {pod}: {message}" for pod, message in pods.items()}

    obj = wait_job(kube, namespace, "unplaceable", reported_as_pods_are,
                   "Running False (Unschedulable) with a pending pod's scheduler message")
    got = conditions(obj)
    message = got["Running"]["message"]
    assert obj["status"]["phase"] == "Pending"
    assert got["Running"]["status"] == "False"
    assert words(got["Ready"]) == ("False", "Unschedulable", message)
    assert words(got["Reconciling"]) == ("True", "Unschedulable", message)
    assert got["Stalled"]["status"] == "False"
    assert "Insufficient" in message, message  # the scheduler's own words

    result = kstatus.compute_one(obj)
    assert (result.status, result.message) == ("InProgress", message)
    assert [(c.type, c.status, c.reason) for c in result.conditions] == [("Reconciling", "True", "Unschedulable")]
    assert argocd_health(obj) == ("Progressing", message)

    assert printed_columns(kube, namespace, "unplaceable")["REASON"] == "Unschedulable"
    assert printed_columns(kube, namespace, "unplaceable")["PHASE"] == "Pending"


# ---- a pod that cannot start, on the real node ---------------------------------------------------

PULL_REASONS = {"ErrImagePull", "ImagePullBackOff"}  # the kubelet alternates between the two


def test_a_run_whose_image_cannot_be_pulled_is_pending_with_the_kubelets_words_and_one_event(
        kube, operator, cfg, namespace, suffix, cluster_objects):
    """A tenant's own image (allowed by its TenantPolicy) that no registry serves: the pod is placed on the
    real node and the kubelet cannot pull it. The run is Pending with the kubelet's reason, not Starting
    forever, and the tenant gets one Warning event, however often the kubelet retries."""
    tenant = f"pull-{suffix}"
    tenant_namespace(kube, namespace, tenant)
    cluster_objects(policy(tenant, tenant, nodePools=["local"], images={"registries": ["localhost/finetune-absent/"]}))
    image = "localhost/finetune-absent/trainer:1"
    job = ftj("unpullable", image=image, runPolicy=run_policy(),
              resources={"workers": 1, "gpusPerWorker": 0, "nodePool": "local", "cpu": "100m", "memory": "512Mi"})
    kube.apply(credentials(), job, namespace=namespace)

    obj = wait_job(kube, namespace, "unpullable",
                   lambda o: conditions(o).get("Running", {}).get("reason") in PULL_REASONS,
                   "Running False with the kubelet's pull error", timeout=120)
    running = conditions(obj)["Running"]
    assert obj["status"]["phase"] == "Pending" and running["status"] == "False"
    assert running["message"].startswith(f"pod train-1-master-0 container pytorch: {running['reason']}"), running
    assert image in running["message"], running  # the kubelet's words name the image
    assert kstatus.compute_one(obj).status == "InProgress"
    assert printed_columns(kube, namespace, "unpullable")["PHASE"] == "Pending"

    def pull_events() -> list[dict]:
        return [e for e in items(kube, "events", namespace) if e.get("reason") in PULL_REASONS
                and e["involvedObject"]["name"] == "unpullable"]

    [event] = _wait_for(pull_events, 30, "a Warning event of the pull error", interval=1)
    assert event["type"] == "Warning" and event["message"].startswith("pod train-1-master-0 container pytorch: ")
    # Let the kubelet back off and retry while the operator passes over the job: still one event.
    sandbox = obj["status"]["sandboxNamespace"]
    _wait_for(lambda: any(e.get("reason") == "BackOff" and e.get("count", 1) >= 2
                          for e in items(kube, "events", sandbox)), 120, "the kubelet's pull back-off repeated",
              interval=2)
    time.sleep(cfg.reconcileIntervalSeconds + 2)
    assert len(pull_events()) == 1, pull_events()


# ---- outcomes ------------------------------------------------------------------------------------


def _failed(kube, cfg, namespace) -> None:
    start_suspended_and_annotate(kube, cfg, namespace, ftj("job", runPolicy=run_policy()),
                                 {"Master": {SIM_EXIT_CODE: "3", SIM_DURATION: "1s"}})


def _invalid(kube, cfg, namespace) -> None:
    kube.apply(credentials(), ftj("job", resources={"workers": 1, "gpusPerWorker": 0, "nodePool": "h100"}),
               namespace=namespace)


def _succeeded(kube, cfg, namespace) -> None:
    kube.apply(credentials(), ftj("job", runPolicy=run_policy()), namespace=namespace)


def _suspended(kube, cfg, namespace) -> None:
    kube.apply(credentials(), ftj("job", runPolicy=run_policy(suspend=True)), namespace=namespace)


OUTCOMES = [
    # how the job is made, the phase it settles in, kstatus's status, the condition of the operator whose
    # reason and message Stalled carries and kstatus shows (None: kstatus's own words), Argo CD's health
    # and the condition whose message it shows
    pytest.param(_failed, "Failed", "Failed", "Failed", ("Degraded", "Failed"), id="failed"),
    pytest.param(_invalid, "Pending", "Failed", "Validated", ("Degraded", "Stalled"), id="invalid"),
    pytest.param(_succeeded, "Succeeded", "Current", None, ("Healthy", "Succeeded"), id="succeeded"),
    pytest.param(_suspended, "Suspended", "InProgress", None, ("Suspended", "Suspended"), id="suspended"),
]


@pytest.mark.parametrize("make, phase, expected, cause, argocd", OUTCOMES)
def test_kstatus_and_argocd_of_a_settled_job(kube, operator, cfg, namespace, make, phase, expected, cause, argocd):
    make(kube, cfg, namespace)
    settled = (lambda o: conditions(o).get("Validated", {}).get("status") == "False") if cause == "Validated" else \
        (lambda o: o["status"].get("phase") == phase)
    obj = wait_job(kube, namespace, "job", settled, f"phase {phase}", timeout=120)
    got = conditions(obj)
    assert obj["status"]["phase"] == phase
    health, shown = argocd
    assert argocd_health(obj) == (health, got[shown]["message"])

    result = kstatus.compute_one(obj)
    assert result.status == expected, (result, {t: words(c) for t, c in got.items()})
    if cause is None:
        return
    _, reason, message = words(got[cause])
    assert words(got["Stalled"]) == ("True", reason, message)
    assert words(got["Ready"]) == ("False", reason, message)
    assert result.message == message
    assert [(c.type, c.status, c.reason) for c in result.conditions] == [("Stalled", "True", reason)]


# ---- stalled -------------------------------------------------------------------------------------


def test_a_run_that_reports_no_progress_is_stalled(kube, stall_operator, cfg, namespace):
    job = ftj("silent", runPolicy=run_policy())
    # KWOK pods run without a trainer: no progress document ever comes.
    start_suspended_and_annotate(kube, cfg, namespace, job, {"Master": {SIM_DURATION: LONG}})
    wait_job(kube, namespace, "silent", lambda o: conditions(o).get("Running", {}).get("status") == "True",
             "Running True")
    obj = wait_job(kube, namespace, "silent", lambda o: o["status"].get("phase") == "Stalled", "phase Stalled",
                   timeout=STALL_SECONDS + 4 * stall_operator.config()["reconcileIntervalSeconds"] + 30)
    got = conditions(obj)
    stalled = got["Stalled"]
    assert (stalled["status"], stalled["reason"]) == ("True", "ProgressStalled")
    assert f"threshold {STALL_SECONDS}s" in stalled["message"] and "none since the run started" in stalled["message"]
    assert words(got["Ready"]) == ("False", "ProgressStalled", stalled["message"])
    assert (got["Reconciling"]["status"], got["Reconciling"]["reason"]) == ("False", "Stalled")
    assert (got["Running"]["status"], got["Running"]["reason"]) == ("True", "ProgressStalled")

    result = kstatus.compute_one(obj)
    assert (result.status, result.message) == ("Failed", stalled["message"])
    assert [(c.type, c.status, c.reason) for c in result.conditions] == [("Stalled", "True", "ProgressStalled")]
    assert argocd_health(obj) == ("Degraded", stalled["message"])
    assert printed_columns(kube, namespace, "silent")["REASON"] == "ProgressStalled"
