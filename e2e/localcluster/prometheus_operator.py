"""What the Prometheus Operator makes of a ServiceMonitor or PodMonitor: the Prometheus
scrape_configs (a pure function), for the monitors the chart renders.

The prometheus-operator Go module does not build here, so this is its config generator re-stated
for the fields our monitors use, rule for rule and in its order. Followed: prometheus-operator
v0.93.0 (commit 6adcebc5, 2026-08-08), pkg/prometheus/promcfg.go: generateServiceMonitorConfig,
generatePodMonitorConfig, generateK8SSDConfig, getNamespacesFromNamespaceSelector,
initRelabelings, generateRunningFilter, generateRelabelConfig, appendShardingRelabelingWithLabel
and appendServiceMonitorConfigs/appendPodMonitorConfigs (ServiceMonitors first, then PodMonitors,
each sorted by namespace/name). The Prometheus resource is taken with its defaults: no scrape
classes, no enforced namespace label or limits, no override of honorLabels, one shard, no
topology sharding or retention policies. Its config-reloader then expands `$(SHARD)` in the
generated file; `scrape_configs` does that too (expand_shard).

A field the generator would read that is not supported here raises UnsupportedField rather than
being ignored: a monitor that uses it would be scraped differently by the real operator.
"""

from __future__ import annotations

import re
from typing import Any

SHARD_ENV_VAR = "SHARD"
HASH_LABEL = "__tmp_hash"
DISABLE_SHARDING_LABEL = "__tmp_disable_sharding"
# Prometheus resource spec.serviceDiscoveryRole -> kubernetes_sd role of ServiceMonitor jobs.
ENDPOINT_ROLES = {"Endpoints": "endpoints", "EndpointSlice": "endpointslice"}

SUPPORTED_SPEC = {
    "ServiceMonitor": {"selector", "namespaceSelector", "endpoints", "jobLabel"},
    "PodMonitor": {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel"},
}
SUPPORTED_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings",
                      "metricRelabelings", "filterRunning"}
SUPPORTED_SELECTOR = {"matchLabels", "matchExpressions"}
SUPPORTED_NAMESPACE_SELECTOR = {"any", "matchNames"}
RELABEL_FIELDS = (("sourceLabels", "source_labels"), ("separator", "separator"), ("targetLabel", "target_label"),
                  ("regex", "regex"), ("modulus", "modulus"), ("replacement", "replacement"), ("action", "action"))


class UnsupportedField(ValueError):
    """The monitor uses a field this re-statement of the generator does not implement."""


def sanitize_label_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _refuse_unknown(where: str, given: dict, supported: set[str]) -> None:
    unknown = sorted(set(given) - supported)
    if unknown:
        raise UnsupportedField(f"{where}: {', '.join(unknown)} not supported")


def _namespaces(selector: dict, monitor_namespace: str) -> list[str]:
    if selector.get("any"):
        return []
    return list(selector.get("matchNames") or []) or [monitor_namespace]


def _kubernetes_sd(role: str, namespaces: list[str], apiserver: dict | None) -> dict:
    sd: dict[str, Any] = {"role": role}
    if namespaces:
        sd["namespaces"] = {"names": namespaces}
    if apiserver:
        _refuse_unknown("apiserver", apiserver, {"host", "tls_config"})
        sd["api_server"] = apiserver["host"]
        if "tls_config" in apiserver:
            sd["tls_config"] = dict(apiserver["tls_config"])
    return {"kubernetes_sd_configs": [sd]}


def _selector_rules(selector: dict, meta: str) -> list[dict]:
    """The monitor's label selector as keep/drop rules on the discovered object's labels
    (`meta` is __meta_kubernetes_service or __meta_kubernetes_pod)."""
    rules = []
    for key in sorted(selector.get("matchLabels") or {}):
        name = sanitize_label_name(key)
        rules.append({"action": "keep", "source_labels": [f"{meta}_label_{name}", f"{meta}_labelpresent_{name}"],
                      "regex": f"({selector['matchLabels'][key]});true"})
    for expression in selector.get("matchExpressions") or []:
        name, operator = sanitize_label_name(expression["key"]), expression["operator"]
        values = "|".join(expression.get("values") or [])
        if operator in ("In", "NotIn"):
            rules.append({"action": "keep" if operator == "In" else "drop",
                          "source_labels": [f"{meta}_label_{name}", f"{meta}_labelpresent_{name}"],
                          "regex": f"({values});true"})
        elif operator in ("Exists", "DoesNotExist"):
            rules.append({"action": "keep" if operator == "Exists" else "drop",
                          "source_labels": [f"{meta}_labelpresent_{name}"], "regex": "true"})
        else:
            raise UnsupportedField(f"selector operator {operator!r}")
    return rules


def relabel_configs(relabelings: list[dict]) -> list[dict]:
    """A monitor's RelabelConfigs (camelCase) as Prometheus relabel_configs. Separator and
    replacement are pointers in the CRD types: written when set, even empty."""
    out = []
    for relabeling in relabelings:
        _refuse_unknown("relabeling", relabeling, {field for field, _ in RELABEL_FIELDS})
        rule = {}
        for field, key in RELABEL_FIELDS:
            value = relabeling.get(field)
            if value is not None if field in ("separator", "replacement") else value:
                rule[key] = value.lower() if field == "action" else value
        out.append(rule)
    return out


def _running_filter() -> dict:
    return {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"}


def _sharding_rules(shards: int) -> list[dict]:
    return [
        {"source_labels": ["__address__", HASH_LABEL], "target_label": HASH_LABEL, "regex": "(.+);",
         "replacement": "$1", "action": "replace"},
        {"source_labels": [HASH_LABEL], "target_label": HASH_LABEL, "modulus": shards, "action": "hashmod"},
        {"source_labels": [HASH_LABEL, DISABLE_SHARDING_LABEL], "regex": f"$({SHARD_ENV_VAR});|.+;.+",
         "action": "keep"},
    ]


def _job_head(kind: str, monitor: dict, endpoint: dict, index: int) -> dict:
    meta = monitor["metadata"]
    prefix = "serviceMonitor" if kind == "ServiceMonitor" else "podMonitor"
    return {"job_name": f"{prefix}/{meta['namespace']}/{meta['name']}/{index}",
            "honor_labels": bool(endpoint.get("honorLabels", False))}


def _endpoint_fields(endpoint: dict) -> dict:
    fields = {"interval": "scrape_interval", "scrapeTimeout": "scrape_timeout", "path": "metrics_path"}
    return {key: endpoint[field] for field, key in fields.items() if endpoint.get(field)}


def _tail(config: dict, endpoint: dict, relabelings: list[dict], shards: int) -> dict:
    config["relabel_configs"] = [*relabelings, *relabel_configs(endpoint.get("relabelings") or []),
                                 *_sharding_rules(shards)]
    if endpoint.get("metricRelabelings"):
        config["metric_relabel_configs"] = relabel_configs(endpoint["metricRelabelings"])
    return config


def _check(kind: str, monitor: dict) -> None:
    spec = monitor["spec"]
    _refuse_unknown(f"{kind} spec", spec, SUPPORTED_SPEC[kind])
    _refuse_unknown(f"{kind} selector", spec.get("selector") or {}, SUPPORTED_SELECTOR)
    _refuse_unknown(f"{kind} namespaceSelector", spec.get("namespaceSelector") or {}, SUPPORTED_NAMESPACE_SELECTOR)
    for endpoint in spec.get("endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints") or []:
        _refuse_unknown(f"{kind} endpoint", endpoint, SUPPORTED_ENDPOINT)


def service_monitor_config(monitor: dict, endpoint: dict, index: int, *, role: str = "endpoints",
                           apiserver: dict | None = None, shards: int = 1) -> dict:
    spec, namespace = monitor["spec"], monitor["metadata"]["namespace"]
    config = _job_head("ServiceMonitor", monitor, endpoint, index)
    config |= _kubernetes_sd(role, _namespaces(spec.get("namespaceSelector") or {}, namespace), apiserver)
    config |= _endpoint_fields(endpoint)
    rules = [{"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
             *_selector_rules(spec.get("selector") or {}, "__meta_kubernetes_service")]
    slice_or_endpoint = "endpointslice" if role == "endpointslice" else "endpoint"
    if endpoint.get("port"):
        rules.append({"action": "keep", "source_labels": [f"__meta_kubernetes_{slice_or_endpoint}_port_name"],
                      "regex": endpoint["port"]})
    target = [f"__meta_kubernetes_{slice_or_endpoint}_address_target_kind",
              f"__meta_kubernetes_{slice_or_endpoint}_address_target_name"]
    rules += [
        {"source_labels": target, "separator": ";", "regex": "Node;(.*)", "replacement": "${1}", "target_label": "node"},
        {"source_labels": target, "separator": ";", "regex": "Pod;(.*)", "replacement": "${1}", "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
    ]
    if endpoint.get("filterRunning", True):
        rules.append(_running_filter())
    rules.append({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"})
    rules += _job_label_and_endpoint(spec, endpoint, "__meta_kubernetes_service_label_")
    return _tail(config, endpoint, rules, shards)


def pod_monitor_config(monitor: dict, endpoint: dict, index: int, *, apiserver: dict | None = None,
                       shards: int = 1) -> dict:
    spec, meta = monitor["spec"], monitor["metadata"]
    config = _job_head("PodMonitor", monitor, endpoint, index)
    config |= _kubernetes_sd("pod", _namespaces(spec.get("namespaceSelector") or {}, meta["namespace"]), apiserver)
    config |= _endpoint_fields(endpoint)
    rules = [{"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}]
    if endpoint.get("filterRunning", True):
        rules.append(_running_filter())
    rules += _selector_rules(spec.get("selector") or {}, "__meta_kubernetes_pod")
    if endpoint.get("port"):
        rules.append({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                      "regex": endpoint["port"]})
    rules += [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
    ]
    rules += _job_label_and_endpoint(spec, endpoint, "__meta_kubernetes_pod_label_")
    return _tail(config, endpoint, rules, shards)


def _job_label_and_endpoint(spec: dict, endpoint: dict, label_meta_prefix: str) -> list[dict]:
    """The last target labels of either monitor: `job` from the jobLabel's value, and `endpoint`."""
    rules = []
    if spec.get("jobLabel"):
        rules.append({"source_labels": [label_meta_prefix + sanitize_label_name(spec["jobLabel"])],
                      "target_label": "job", "regex": "(.+)", "replacement": "${1}"})
    if endpoint.get("port"):
        rules.append({"target_label": "endpoint", "replacement": endpoint["port"]})
    return rules


def expand_shard(value: Any, shard: int) -> Any:
    """What the config-reloader does to the generated file: `$(SHARD)` becomes this shard's number."""
    if isinstance(value, str):
        return value.replace(f"$({SHARD_ENV_VAR})", str(shard))
    if isinstance(value, list):
        return [expand_shard(v, shard) for v in value]
    if isinstance(value, dict):
        return {k: expand_shard(v, shard) for k, v in value.items()}
    return value


def generate(monitors: list[dict], *, service_discovery_role: str = "Endpoints", apiserver: dict | None = None,
             shards: int = 1) -> list[dict]:
    """The scrape_configs the generator writes for these monitors, `$(SHARD)` still in them."""
    by_kind: dict[str, dict[str, dict]] = {"ServiceMonitor": {}, "PodMonitor": {}}
    for monitor in monitors:
        kind = monitor.get("kind")
        if kind not in by_kind or not str(monitor.get("apiVersion", "")).startswith("monitoring.coreos.com/"):
            raise UnsupportedField(f"not a ServiceMonitor or PodMonitor: {monitor.get('apiVersion')} {kind}")
        _check(kind, monitor)
        by_kind[kind][f"{monitor['metadata']['namespace']}/{monitor['metadata']['name']}"] = monitor
    if service_discovery_role not in ENDPOINT_ROLES:
        raise UnsupportedField(f"serviceDiscoveryRole {service_discovery_role!r}")
    role = ENDPOINT_ROLES[service_discovery_role]
    configs = []
    for key in sorted(by_kind["ServiceMonitor"]):
        monitor = by_kind["ServiceMonitor"][key]
        configs += [service_monitor_config(monitor, endpoint, i, role=role, apiserver=apiserver, shards=shards)
                    for i, endpoint in enumerate(monitor["spec"].get("endpoints") or [])]
    for key in sorted(by_kind["PodMonitor"]):
        monitor = by_kind["PodMonitor"][key]
        configs += [pod_monitor_config(monitor, endpoint, i, apiserver=apiserver, shards=shards)
                    for i, endpoint in enumerate(monitor["spec"].get("podMetricsEndpoints") or [])]
    return configs


def scrape_configs(monitors: list[dict], *, service_discovery_role: str = "Endpoints",
                   apiserver: dict | None = None, shards: int = 1, shard: int = 0) -> list[dict]:
    """The scrape_configs one Prometheus shard runs for these monitors (generated, then expanded
    by the config-reloader)."""
    return expand_shard(generate(monitors, service_discovery_role=service_discovery_role, apiserver=apiserver,
                                 shards=shards), shard)
