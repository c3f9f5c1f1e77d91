"""The local Prometheus scrapes the operator and the trainers through the scrape jobs the
Prometheus Operator makes of the chart's ServiceMonitor and PodMonitor (e2e/localcluster/
prometheus.py): with the operator installed by its chart and a two-worker job training for real
on node-0, the per-job series carry the FineTuneJob's namespace and name, the trainer's also its
sandbox, only the Master pod is a target, it is up from its container's start (before the rendezvous
with the worker completes), and no target of those jobs is down."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from datetime import datetime

import pytest

from e2e.localcluster.operator_release import NAMESPACE, RELEASE
from e2e.tests.test_control_plane import _wait_for
from e2e.tests.test_end_to_end import _demo_documents, _explain_failure, _status, _wait_phase, small_job

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

# The `job` label the Prometheus Operator gives the series: the Service's name for a
# ServiceMonitor, <namespace>/<name> of a PodMonitor.
OPERATOR_JOB = f"{RELEASE}-metrics"
TRAINER_JOB = f"{NAMESPACE}/{RELEASE}-trainers"
GENERATED_JOBS = f"{OPERATOR_JOB}|{TRAINER_JOB}"


def _api(local_cluster, path: str) -> dict:
    with urllib.request.urlopen(f"{local_cluster.prometheus_url}/api/v1/{path}", timeout=5) as response:
        return json.load(response)["data"]


def _query(local_cluster, promql: str) -> list[dict]:
    return _api(local_cluster, f"query?query={urllib.parse.quote(promql)}")["result"]


def _targets(local_cluster, scrape_pool: str) -> list[dict]:
    return [t for t in _api(local_cluster, "targets?state=active")["activeTargets"] if t["scrapePool"] == scrape_pool]


def _down(local_cluster) -> list[dict]:
    return [s["metric"] for s in _query(local_cluster, f'up{{job=~"{GENERATED_JOBS}"}} == 0')]


@pytest.fixture(scope="module")
def scrape_pools(local_cluster, operator) -> dict[str, str]:
    """The generated jobs, loaded by the running Prometheus (the session's cluster.up() reloads them)."""
    local_cluster.configure_prometheus()
    generated = [job["job_name"] for job in local_cluster.prometheus_scrape_configs()]
    loaded = _api(local_cluster, "status/config")["yaml"]
    assert all(f"job_name: {name}" in loaded for name in generated), loaded
    return {"operator": next(n for n in generated if n.startswith("serviceMonitor/")),
            "trainer": next(n for n in generated if n.startswith("podMonitor/"))}


def test_operator_and_trainer_series_carry_the_jobs_namespace_and_only_live_targets(
        kube, local_cluster, operator, scrape_pools, namespace):
    hyperparameters = {**_demo_documents()[1]["spec"]["hyperparameters"], "maxSteps": 24}
    secret, job = small_job("scraped", hyperparameters=hyperparameters, checkpoint={"everySteps": 12, "keep": 1},
                            evaluation={"compareToBase": False, "maxSamples": 8})
    assert job["spec"]["resources"]["workers"] == 2
    kube.apply(secret, job, namespace=namespace)
    name = job["metadata"]["name"]
    selector = f'namespace="{namespace}", name="{name}"'

    # The operator's per-job series: the FineTuneJob's namespace survives (honorLabels).
    operator_series = _wait_for(lambda: _query(local_cluster, f"finetune_job_step{{{selector}}}"), 180,
                                "the operator's finetune_job_step of the job in Prometheus", interval=1)
    assert {s["metric"]["job"] for s in operator_series} == {OPERATOR_JOB}
    assert not _query(local_cluster, f'finetune_job_step{{exported_namespace="{namespace}"}}')
    assert {s["metric"]["namespace"] for s in _query(local_cluster, f'finetune_jobs{{job="{OPERATOR_JOB}"}}')} \
        == {NAMESPACE}

    # The trainer's series: the job's namespace and name, its sandbox, from the Master pod only.
    trainer_series = _wait_for(lambda: _query(local_cluster, f"finetune_trainer_step{{{selector}}}"), 300,
                               "the trainer's finetune_trainer_step of the job in Prometheus", interval=1)
    sandbox = _status(kube, namespace, name)["sandboxNamespace"]
    pods = {p["metadata"]["name"]: p for p in kube.get("pods", namespace=sandbox)["items"]}
    masters = [n for n, p in pods.items()
               if p["metadata"]["labels"].get("training.kubeflow.org/replica-type") == "master"]
    assert len(pods) == 2 and len(masters) == 1, list(pods)
    declared = {n: [port["name"] for c in p["spec"]["containers"] for port in c.get("ports") or []] for n, p in pods.items()}
    assert [n for n, ports in declared.items() if "metrics" in ports] == masters, declared
    assert [(s["metric"]["job"], s["metric"]["sandbox"], s["metric"]["pod"]) for s in trainer_series] \
        == [(TRAINER_JOB, sandbox, masters[0])]

    # The Master's target was up from its container's start (5 s for the launcher to bind the port), not
    # only once rank 0 served: while torchrun waited for the worker in the rendezvous too.
    state = pods[masters[0]]["status"]["containerStatuses"][0]["state"]
    started = datetime.fromisoformat((state.get("running") or state["terminated"])["startedAt"].replace("Z", "+00:00"))
    since_start = max(int(time.time() - started.timestamp()) - 5, 1)
    master_up = _query(local_cluster, f'min_over_time(up{{job="{TRAINER_JOB}", sandbox="{sandbox}"}}[{since_start}s])')
    assert [(s["metric"]["pod"], s["value"][1]) for s in master_up] == [(masters[0], "1")], master_up

    # Targets: the operator's pod and this job's Master, both up; the worker is no target.
    trainer_targets = [t for t in _targets(local_cluster, scrape_pools["trainer"]) if t["labels"]["sandbox"] == sandbox]
    assert [(t["labels"]["pod"], t["health"]) for t in trainer_targets] == [(masters[0], "up")], trainer_targets
    operator_targets = _targets(local_cluster, scrape_pools["operator"])
    assert [(t["labels"]["namespace"], t["health"]) for t in operator_targets] == [(NAMESPACE, "up")], operator_targets
    assert _down(local_cluster) == []

    status = _wait_phase(kube, namespace, name, timeout=420)
    assert status["phase"] == "Succeeded", _explain_failure(local_cluster, status)
    # The finished pods go from the targets (phase Succeeded), and leave none down behind them.
    _wait_for(lambda: not [t for t in _targets(local_cluster, scrape_pools["trainer"])
                           if t["labels"]["sandbox"] == sandbox], 60, "the finished Master to leave the targets")
    time.sleep(5)
    assert _down(local_cluster) == []
