"""Prometheus' configuration for the local cluster.

The operator and the trainers are scraped the way a cluster with the Prometheus Operator scrapes
them: the chart's ServiceMonitor and PodMonitor, rendered for the release the tests install, are
turned into scrape_configs by prometheus_operator.py (the operator's config generator, re-stated),
with Kubernetes discovery through the API server as the `finetune:prometheus` user. Besides those:
Prometheus itself, the training-operator (a host process) and file_sd targets that host processes
(the operator run from the working tree, tests) drop into a folder.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from . import network, prometheus_operator

MONITOR_KINDS = ("ServiceMonitor", "PodMonitor")
# The local Prometheus scrapes every 2 s; the monitors ask for the same.
SCRAPE_INTERVAL = "2s"
# The Prometheus resource's spec.serviceDiscoveryRole: EndpointSlice (the Endpoints API is
# deprecated since Kubernetes 1.33).
SERVICE_DISCOVERY_ROLE = "EndpointSlice"


def monitoring_values(interval: str = SCRAPE_INTERVAL) -> list[str]:
    """`helm --set` arguments that render the chart's ServiceMonitor and PodMonitor."""
    return [f"--set=monitoring.{monitor}.enabled=true" for monitor in ("serviceMonitor", "podMonitor")] + \
           [f"--set=monitoring.{monitor}.interval={interval}" for monitor in ("serviceMonitor", "podMonitor")]


def chart_monitors(helm: Path, chart: Path, release: str, namespace: str, extra_args: tuple[str, ...] = ()) -> list[dict]:
    """The ServiceMonitor and PodMonitor the chart renders for this release, monitoring enabled."""
    out = subprocess.run([str(helm), "template", release, str(chart), "--namespace", namespace,
                          *monitoring_values(), *extra_args], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"helm template {chart} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc and doc.get("kind") in MONITOR_KINDS]


def monitor_scrape_configs(monitors: list[dict], *, api_server: str, pki: Path) -> list[dict]:
    """What the Prometheus Operator writes for these monitors, discovering through this API server."""
    apiserver = {"host": api_server,
                 "tls_config": {"ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "prometheus.crt"),
                                "key_file": str(pki / "prometheus.key")}}
    return prometheus_operator.scrape_configs(monitors, service_discovery_role=SERVICE_DISCOVERY_ROLE,
                                              apiserver=apiserver)


def prometheus_config(*, own_port: int, training_operator_port: int, targets_dir: Path,
                      monitor_jobs: list[dict] = ()) -> dict:
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "5s"},
        "scrape_configs": [
            # Where it listens: the node's bridge address (not localhost).
            {"job_name": "prometheus", "static_configs": [{"targets": [f"{network.NODE_IP}:{own_port}"]}]},
            {"job_name": "training-operator",
             "static_configs": [{"targets": [f"127.0.0.1:{training_operator_port}"]}]},
            *monitor_jobs,
            # Processes of the host (the operator run from the working tree, tests) drop target files here.
            {"job_name": "finetune", "file_sd_configs": [
                {"files": [str(targets_dir / "*.json")], "refresh_interval": "2s"}]},
        ],
    }
