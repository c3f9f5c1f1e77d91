"""Objects the real node needs in the API (pure builders): RBAC for the node's own components
(kubelet access for the API server, kube-router, Prometheus' discovery) and the cluster DNS,
CoreDNS as a Deployment on node-0 behind the `kube-dns` Service."""

from __future__ import annotations

from . import network
from .node import NODE_NAME, NODE_TOLERATION

DNS_NAMESPACE = "kube-system"
DNS_NAME = "coredns"
# Identities (certificate CNs) of the node's processes and of Prometheus.
APISERVER_KUBELET_CLIENT = "kube-apiserver-kubelet-client"
KUBE_PROXY_USER = "system:kube-proxy"          # bound to system:node-proxier by the API server itself
KUBE_ROUTER_USER = "finetune:kube-router"
PROMETHEUS_USER = "finetune:prometheus"

COREFILE = f"""\
.:53 {{
    errors
    health :8080
    ready :8181
    kubernetes {network.CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    prometheus :9153
    cache 5
    loadbalance
}}
"""


def _cluster_role(name: str, rules: list[dict]) -> dict:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
            "rules": rules}


def _bind_user(name: str, role: str, user: str) -> dict:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}


def _read(groups: list[str], resources: list[str]) -> dict:
    return {"apiGroups": groups, "resources": resources, "verbs": ["get", "list", "watch"]}


def node_rbac() -> list[dict]:
    return [
        # `kubectl logs/exec/port-forward`: the API server calls the kubelet with this identity.
        _bind_user("finetune:apiserver-kubelet", "system:kubelet-api-admin", APISERVER_KUBELET_CLIENT),
        _cluster_role(KUBE_ROUTER_USER, [
            _read([""], ["pods", "namespaces", "nodes", "services", "endpoints"]),
            _read(["networking.k8s.io"], ["networkpolicies"]),
            _read(["discovery.k8s.io"], ["endpointslices"]),
        ]),
        _bind_user(KUBE_ROUTER_USER, KUBE_ROUTER_USER, KUBE_ROUTER_USER),
        *prometheus_rbac(),
    ]


def prometheus_rbac() -> list[dict]:
    """What Kubernetes discovery reads for the Prometheus Operator's scrape jobs (roles pod,
    endpoints and endpointslice, the latter two with their Services)."""
    return [
        _cluster_role(PROMETHEUS_USER, [_read([""], ["pods", "services", "endpoints", "nodes"]),
                                        _read(["discovery.k8s.io"], ["endpointslices"])]),
        _bind_user(PROMETHEUS_USER, PROMETHEUS_USER, PROMETHEUS_USER),
    ]


def dns_objects(image: str) -> list[dict]:
    labels = {"k8s-app": "kube-dns"}
    meta = {"namespace": DNS_NAMESPACE, "labels": labels}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": DNS_NAME, **meta}},
        _cluster_role("system:coredns", [
            _read([""], ["services", "pods", "namespaces"]),
            _read(["discovery.k8s.io"], ["endpointslices"]),
        ]),
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": DNS_NAME, "namespace": DNS_NAMESPACE}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": DNS_NAME, **meta},
         "data": {"Corefile": COREFILE}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": DNS_NAME, **meta},
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": labels},
             "template": {
                 "metadata": {"labels": labels},
                 "spec": {
                     "serviceAccountName": DNS_NAME,
                     "priorityClassName": "system-cluster-critical",
                     "dnsPolicy": "Default",
                     "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
                     "tolerations": [NODE_TOLERATION],
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{
                         "name": "coredns",
                         "image": image,
                         "imagePullPolicy": "Never",
                         "args": ["-conf", "/etc/coredns/Corefile"],
                         "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                   {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                   {"name": "metrics", "containerPort": 9153, "protocol": "TCP"}],
                         "resources": {"requests": {"cpu": "20m", "memory": "40Mi"}, "limits": {"memory": "128Mi"}},
                         "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                             "capabilities": {"drop": ["ALL"]}},
                         "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10,
                                           "failureThreshold": 5},
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                         "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                     }],
                     "volumes": [{"name": "config", "configMap": {"name": DNS_NAME}}],
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", **meta},
         "spec": {"selector": labels, "clusterIP": network.DNS_SERVICE_IP,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                            {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153}]}},
    ]
