"""The chart's ServiceMonitor and PodMonitor as the Prometheus Operator turns them into scrape jobs
(e2e/localcluster/prometheus_operator.py), checked by the real Prometheus: `promtool check config`
accepts them, and a Prometheus process runs them on targets that carry what Kubernetes discovery
gives the operator's endpoint and the trainer pods (its `__meta_kubernetes_*` labels), scraping a
real exporter. Only the discovery is replaced (static targets instead of the API server); the
relabelings, honor_labels and the scrape are Prometheus' own.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from e2e.localcluster import build, prometheus, prometheus_operator
from e2e.localcluster.prometheus_operator import UnsupportedField
from tests.chart.chartkit import CHART, RELEASE_NAMESPACE, Helm

RELEASE = "ftop"
SERVICE_JOB = f"serviceMonitor/{RELEASE_NAMESPACE}/{RELEASE}-finetune-operator/0"
POD_JOB = f"podMonitor/{RELEASE_NAMESPACE}/{RELEASE}-finetune-operator-trainers/0"
SANDBOX = "ftj-team-a-support-bot-0a1b2c3d4e"
FULL_NAME = "support-bot-with-a-name-longer-than-a-label-may-hold-so-it-is-cut-there"


@pytest.fixture(scope="module")
def monitors(helm_cli: Helm) -> list[dict]:
    return prometheus.chart_monitors(helm_cli.binary, CHART, RELEASE, RELEASE_NAMESPACE)


@pytest.fixture(scope="module")
def jobs(monitors) -> dict[str, dict]:
    return {job["job_name"]: job for job in prometheus_operator.scrape_configs(monitors)}


# ---- the generated jobs ----------------------------------------------------------------------------------

def _rules(job: dict) -> list[dict]:
    return job["relabel_configs"]


def test_one_job_per_monitor_endpoint_named_as_the_operator_names_them(jobs):
    assert list(jobs) == [SERVICE_JOB, POD_JOB]


@pytest.mark.parametrize("job_name, field, expected", [
    (SERVICE_JOB, "honor_labels", True),    # the operator's per-job `namespace` survives
    (POD_JOB, "honor_labels", False),       # a trainer's own labels never override the target's
    (SERVICE_JOB, "kubernetes_sd_configs", [{"role": "endpoints", "namespaces": {"names": [RELEASE_NAMESPACE]}}]),
    (POD_JOB, "kubernetes_sd_configs", [{"role": "pod"}]),   # namespaceSelector any: every namespace
    (SERVICE_JOB, "metrics_path", "/metrics"),
    (POD_JOB, "scrape_interval", prometheus.SCRAPE_INTERVAL),
])
def test_job_fields(jobs, job_name, field, expected):
    assert jobs[job_name][field] == expected


@pytest.mark.parametrize("job_name, rule", [
    (SERVICE_JOB, {"action": "keep", "source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": "metrics"}),
    (SERVICE_JOB, {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"}),
    (POD_JOB, {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"}),
    (POD_JOB, {"action": "keep", "source_labels": ["__meta_kubernetes_pod_label_training_kubeflow_org_replica_type",
                                                   "__meta_kubernetes_pod_labelpresent_training_kubeflow_org_replica_type"],
               "regex": "(master);true"}),
    (POD_JOB, {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics"}),
    (POD_JOB, {"source_labels": ["__meta_kubernetes_namespace"], "regex": "ftj-.+", "action": "keep"}),
])
def test_job_has_rule(jobs, job_name, rule):
    assert rule in _rules(jobs[job_name])


def test_the_pod_monitors_relabelings_come_after_the_operators_defaults(jobs):
    """`namespace` is first the pod's namespace (the operator's default), then the tenant's."""
    rules = _rules(jobs[POD_JOB])
    default = rules.index({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"})
    tenant = rules.index({"source_labels": ["__meta_kubernetes_pod_label_finetune_dev_tenant"], "target_label": "namespace"})
    assert default < tenant


def test_the_sandbox_prefix_of_the_values_selects_the_namespaces(helm_cli):
    monitors = prometheus.chart_monitors(helm_cli.binary, CHART, RELEASE, RELEASE_NAMESPACE,
                                         ("--set=config.sandboxPrefix=train",))
    pod_job = prometheus_operator.scrape_configs(monitors)[1]
    assert {"source_labels": ["__meta_kubernetes_namespace"], "regex": "train-.+", "action": "keep"} in _rules(pod_job)


def test_endpointslice_discovery_reads_the_slices_port_and_target(monitors):
    job = prometheus_operator.scrape_configs(monitors, service_discovery_role="EndpointSlice")[0]
    assert job["kubernetes_sd_configs"][0]["role"] == "endpointslice"
    sources = {tuple(r.get("source_labels", ())) for r in _rules(job)}
    assert ("__meta_kubernetes_endpointslice_port_name",) in sources
    assert ("__meta_kubernetes_endpointslice_address_target_kind",
            "__meta_kubernetes_endpointslice_address_target_name") in sources


@pytest.mark.parametrize("change", [
    {"spec": {"sampleLimit": 10}},
    {"endpoints": {"tlsConfig": {"insecureSkipVerify": True}}},
    {"endpoints": {"relabelings": [{"sourceLabels": ["a"], "action": "replace", "bogus": 1}]}},
    {"selector": {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}},
    {"kind": "Probe"},
], ids=["spec-field", "endpoint-field", "relabeling-field", "selector-operator", "kind"])
def test_what_is_not_supported_is_refused(monitors, change):
    monitor = json.loads(json.dumps(next(m for m in monitors if m["kind"] == "ServiceMonitor")))
    monitor["spec"].update(change.get("spec", {}))
    monitor["spec"]["endpoints"][0].update(change.get("endpoints", {}))
    monitor["spec"]["selector"].update(change.get("selector", {}))
    monitor["kind"] = change.get("kind", monitor["kind"])
    with pytest.raises(UnsupportedField):
        prometheus_operator.scrape_configs([monitor])


# ---- the real Prometheus -----------------------------------------------------------------------------------

def test_promtool_accepts_the_generated_configuration(jobs, promtool, tmp_path):
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "30s"}, "scrape_configs": list(jobs.values())},
                                     sort_keys=False))
    result = subprocess.run([str(promtool), "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def _meta(prefix: str, kind: str, mapping: dict[str, str]) -> dict[str, str]:
    """Labels and their `present` twins as Kubernetes discovery writes them."""
    labels = {}
    for key, value in mapping.items():
        name = prometheus_operator.sanitize_label_name(key)
        labels[f"{prefix}_{kind}_{name}"] = value
        labels[f"{prefix}_{kind}present_{name}"] = "true"
    return labels


def _trainer_pod(address: str, *, name: str, namespace: str = SANDBOX, replica: str = "master", phase: str = "Running",
                 port: str = "metrics", tenant: str = "team-a") -> dict:
    labels = {"app.kubernetes.io/managed-by": "finetune-operator", "finetune.dev/tenant": tenant,
              "finetune.dev/job-name": FULL_NAME[:63].rstrip("-"), "finetune.dev/job-uid": "0a1b2c3d",
              "training.kubeflow.org/replica-type": replica}
    return {"targets": [address], "labels": {
        "__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_phase": phase, "__meta_kubernetes_pod_container_name": "pytorch",
        "__meta_kubernetes_pod_container_port_name": port,
        **_meta("__meta_kubernetes_pod", "label", labels),
        **_meta("__meta_kubernetes_pod", "annotation", {"finetune.dev/job-name": FULL_NAME}),
    }}


def _operator_endpoint(address: str, *, service: str, instance: str = RELEASE) -> dict:
    return {"targets": [address], "labels": {
        "__meta_kubernetes_namespace": RELEASE_NAMESPACE, "__meta_kubernetes_service_name": service,
        **_meta("__meta_kubernetes_service", "label",
                {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/instance": instance}),
        "__meta_kubernetes_endpoint_port_name": "metrics",
        "__meta_kubernetes_endpoint_address_target_kind": "Pod",
        "__meta_kubernetes_endpoint_address_target_name": "ftop-finetune-operator-5d9f-abcde",
        "__meta_kubernetes_pod_name": "ftop-finetune-operator-5d9f-abcde",
        "__meta_kubernetes_pod_container_name": "operator", "__meta_kubernetes_pod_phase": "Running",
    }}


# (pod name, what differs from a running master in the sandbox, kept as a target)
TRAINER_PODS = [
    ("train-1-master-0", {}, True),
    ("train-1-worker-0", {"replica": "worker", "port": "pytorchjob-port"}, False),
    ("train-1-worker-1", {"replica": "worker"}, False),           # a worker declaring `metrics` (older runs)
    ("train-0-master-0", {"phase": "Succeeded"}, False),
    ("train-2-master-0", {"phase": "Failed"}, False),
    ("impostor", {"namespace": "team-a", "tenant": "team-b"}, False),   # labelled like a trainer in a tenant namespace
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]


@pytest.fixture(scope="module")
def exporter() -> str:
    """One exporter for every target: a per-job series with its own `namespace`, as the operator's."""
    registry = CollectorRegistry()
    Gauge("finetune_job_step", "step", ["namespace", "name"], registry=registry).labels("team-a", "support-bot").set(150)
    Gauge("finetune_jobs", "jobs by phase", ["phase"], registry=registry).labels("Running").set(1)
    port = _free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield f"127.0.0.1:{port}"
    server.shutdown()


@pytest.fixture(scope="module")
def running_prometheus(jobs, exporter, tmp_path_factory):
    """The real Prometheus running the generated jobs on static targets that carry the discovery's labels."""
    work = tmp_path_factory.mktemp("prometheus")
    groups = {SERVICE_JOB: [_operator_endpoint(exporter, service=f"{RELEASE}-finetune-operator-metrics"),
                            _operator_endpoint(exporter, service="other-release-metrics", instance="other")],
              POD_JOB: [_trainer_pod(exporter, name=name, **changes) for name, changes, _ in TRAINER_PODS]}
    scrape_configs = []
    for name, job in jobs.items():
        job = {key: value for key, value in job.items() if key != "kubernetes_sd_configs"}
        scrape_configs.append({**job, "static_configs": groups[name]})
    (work / "prometheus.yml").write_text(yaml.safe_dump(
        {"global": {"scrape_interval": "1s"}, "scrape_configs": scrape_configs}, sort_keys=False))
    port = _free_port()
    build.build(build.PROMETHEUS, log=lambda *_: None)
    with open(work / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([str(build.PROMETHEUS.binary("prometheus")), f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                query = urllib.parse.quote('count(up == 1) by (job)')
                if len(_get(f"{url}/api/v1/query?query={query}")["result"]) == 2:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (work / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _active_targets(url: str, job: str) -> list[dict]:
    return [t for t in _get(f"{url}/api/v1/targets?state=active")["activeTargets"] if t["scrapePool"] == job]


def test_only_the_running_master_in_a_sandbox_is_a_trainer_target(running_prometheus):
    kept = sorted(t["labels"]["pod"] for t in _active_targets(running_prometheus, POD_JOB))
    assert kept == sorted(name for name, _, keep in TRAINER_PODS if keep)


def test_only_the_releases_service_is_an_operator_target(running_prometheus):
    kept = [t["labels"]["service"] for t in _active_targets(running_prometheus, SERVICE_JOB)]
    assert kept == [f"{RELEASE}-finetune-operator-metrics"]


@pytest.mark.parametrize("job, expected", [
    (SERVICE_JOB, {"namespace": "team-a", "name": "support-bot", "job": f"{RELEASE}-finetune-operator-metrics",
                   "service": f"{RELEASE}-finetune-operator-metrics", "endpoint": "metrics",
                   "pod": "ftop-finetune-operator-5d9f-abcde", "container": "operator"}),
    # The trainer target's own labels win: the exported namespace/name are kept aside as exported_*.
    (POD_JOB, {"namespace": "team-a", "name": FULL_NAME, "sandbox": SANDBOX, "pod": "train-1-master-0",
               "exported_namespace": "team-a", "exported_name": "support-bot", "container": "pytorch",
               "job": f"{RELEASE_NAMESPACE}/{RELEASE}-finetune-operator-trainers", "endpoint": "metrics"}),
])
def test_series_labels_per_job(running_prometheus, job, expected):
    query = urllib.parse.quote(f'finetune_job_step{{job="{expected["job"]}"}}')
    series = [s["metric"] for s in _get(f"{running_prometheus}/api/v1/query?query={query}")["result"]]
    assert len(series) == 1, series
    labels = {k: v for k, v in series[0].items() if k not in ("__name__", "instance")}
    assert labels == expected


def test_series_without_a_namespace_get_the_targets(running_prometheus):
    query = urllib.parse.quote(f'finetune_jobs{{job="{RELEASE}-finetune-operator-metrics"}}')
    series = _get(f"{running_prometheus}/api/v1/query?query={query}")["result"]
    assert [s["metric"]["namespace"] for s in series] == [RELEASE_NAMESPACE]


def test_no_target_is_down(running_prometheus):
    query = urllib.parse.quote("up == 0")
    assert _get(f"{running_prometheus}/api/v1/query?query={query}")["result"] == []
