"""Prometheus' configuration for the local cluster (a pure builder).

Pods are discovered through the API server (kubernetes_sd_configs, as the Prometheus Operator's
PodMonitors do): every declared container port named `metrics` of a running pod is a target,
labelled with its namespace, pod and the pod's labels. The operator's own pods keep the labels
they export (`namespace` is the FineTuneJob's namespace there); every other pod's metrics get the
pod's namespace, whatever the pod exports, so no tenant's trainer can pose as another tenant.
"""

from __future__ import annotations

from pathlib import Path

OPERATOR_POD_LABEL = ("app.kubernetes.io/name", "finetune-operator")


def _label_meta(label: str) -> str:
    return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in label)


def _pod_job(name: str, api_server: str, pki: Path, *, operator: bool) -> dict:
    label_meta = _label_meta(OPERATOR_POD_LABEL[0])
    return {
        "job_name": name,
        "honor_labels": operator,
        # Exporters that send no (or an odd) Content-Type are read as the text format.
        "fallback_scrape_protocol": "PrometheusText0.0.4",
        "kubernetes_sd_configs": [{
            "role": "pod",
            "api_server": api_server,
            "tls_config": {"ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "prometheus.crt"),
                           "key_file": str(pki / "prometheus.key")},
        }],
        "relabel_configs": [
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
            {"source_labels": [label_meta], "regex": OPERATOR_POD_LABEL[1],
             "action": "keep" if operator else "drop"},
            {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        ],
    }


def prometheus_config(*, api_server: str, pki: Path, own_port: int, training_operator_port: int,
                      targets_dir: Path) -> dict:
    return {
        "global": {"scrape_interval": "2s", "evaluation_interval": "5s"},
        "scrape_configs": [
            {"job_name": "prometheus", "static_configs": [{"targets": [f"localhost:{own_port}"]}]},
            {"job_name": "training-operator",
             "static_configs": [{"targets": [f"127.0.0.1:{training_operator_port}"]}]},
            _pod_job("finetune-operator", api_server, pki, operator=True),
            _pod_job("pods", api_server, pki, operator=False),
            # Processes of the host (the operator run from the working tree, tests) drop target files here.
            {"job_name": "finetune", "file_sd_configs": [
                {"files": [str(targets_dir / "*.json")], "refresh_interval": "2s"}]},
        ],
    }
