"""Pure pieces of the local cluster's real node: its network, containerd, kubelet, kube-proxy and
kube-router configurations, Prometheus' scrape configuration and the Go builds."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest

from e2e.localcluster import build, network, node, prometheus, versions
from e2e.localcluster.addons import COREFILE, dns_objects, node_rbac

PATHS = node.NodePaths(Path("/checkout/.cluster/node"))


# ---- network ---------------------------------------------------------------------------------------

def test_the_node_address_is_the_gateway_of_its_pod_subnet():
    subnet = ipaddress.ip_network(network.NODE_POD_CIDR)
    assert ipaddress.ip_address(network.NODE_IP) == subnet.network_address + 1
    assert subnet.subnet_of(ipaddress.ip_network(network.CLUSTER_CIDR))


@pytest.mark.parametrize("a, b", [
    (network.CLUSTER_CIDR, network.SERVICE_CIDR),
    (network.CLUSTER_CIDR, network.SIMULATED_POD_CIDR),
    (network.SERVICE_CIDR, network.SIMULATED_POD_CIDR),
    (network.CLUSTER_CIDR, "169.254.0.0/16"),   # link-local, the cloud metadata range
    (network.CLUSTER_CIDR, "127.0.0.0/8"),
])
def test_address_ranges_do_not_overlap(a, b):
    assert not ipaddress.ip_network(a).overlaps(ipaddress.ip_network(b))


def test_pods_get_no_default_route_and_no_masquerading():
    config = network.cni_config(Path("/x/ipam"))
    bridge = config["plugins"][0]
    assert bridge["type"] == "bridge" and bridge["bridge"] == network.BRIDGE
    assert bridge["isDefaultGateway"] is False and bridge["ipMasq"] is False
    routes = [r["dst"] for r in bridge["ipam"]["routes"]]
    assert routes == [network.SERVICE_CIDR]
    assert "0.0.0.0/0" not in routes
    (pool,) = bridge["ipam"]["ranges"][0]
    assert pool["gateway"] == network.NODE_IP and pool["subnet"] == network.NODE_POD_CIDR
    assert ipaddress.ip_address(pool["rangeStart"]) > ipaddress.ip_address(network.NODE_IP)
    assert bridge["ipam"]["dataDir"] == "/x/ipam"


def test_isolation_drops_pod_traffic_through_any_other_interface():
    rules = [" ".join(r) for r in network.isolation_rules()]
    assert any(r.startswith(f"-s {network.CLUSTER_CIDR} ! -o {network.BRIDGE}") and r.endswith("-j DROP") for r in rules)
    assert any(r.startswith(f"-d {network.CLUSTER_CIDR} ! -i {network.BRIDGE}") and r.endswith("-j DROP") for r in rules)


def test_node_ports_lie_below_the_ephemeral_range_of_the_host_services():
    low, high = map(int, network.NODE_PORT_RANGE.split("-"))
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert low < high < ephemeral_low


# ---- containerd, kubelet, kube-proxy, kube-router --------------------------------------------------

def test_containerd_config_is_valid_toml_with_what_this_vm_needs():
    config = tomllib.loads(node.containerd_config(PATHS, "localhost/finetune-pause:abc"))
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "localhost/finetune-pause:abc"
    assert cri["restrict_oom_score_adj"] is True
    assert cri["enable_unprivileged_ports"] is True
    assert cri["cni"]["conf_dir"] == str(PATHS.cni_conf_dir)
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert config["root"].startswith("/checkout/.cluster/node/") and config["state"].startswith("/checkout/.cluster/node/")
    assert config["grpc"]["address"] == str(PATHS.containerd_socket)


def test_kubelet_config_keeps_its_state_under_the_cluster_folder_and_never_drops_images():
    config = node.kubelet_config(PATHS, Path("/ca.crt"), Path("/k.crt"), Path("/k.key"), 1234)
    assert config["address"] == network.NODE_IP and config["readOnlyPort"] == 0
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["authorization"]["mode"] == "Webhook"
    assert config["failCgroupV1"] is False and config["cgroupDriver"] == "cgroupfs" and config["failSwapOn"] is False
    assert config["clusterDNS"] == [network.DNS_SERVICE_IP]
    assert config["imageGCHighThresholdPercent"] == 100
    assert config["podLogsDir"].startswith("/checkout/.cluster/node/")
    assert config["registerWithTaints"] == [node.NODE_TAINT]
    argv = node.kubelet_argv(Path("/bin/kubelet"), PATHS, Path("/kc"))
    assert f"--node-ip={network.NODE_IP}" in argv and f"--hostname-override={node.NODE_NAME}" in argv
    assert any(a.startswith("--root-dir=/checkout/.cluster/node/") for a in argv)


def test_kube_router_runs_only_its_firewall():
    argv = node.kube_router_argv(Path("/bin/kube-router"), Path("/kc"), 20244)
    for flag in ("--run-firewall=true", "--run-router=false", "--run-service-proxy=false", "--enable-cni=false",
                 f"--service-cluster-ip-range={network.SERVICE_CIDR}",
                 f"--service-node-port-range={network.NODE_PORT_RANGE}"):
        assert flag in argv


def test_kube_proxy_serves_services_of_the_cluster_cidr_only_on_the_node_address():
    config = node.kube_proxy_config(Path("/kc"), 1, 2)
    assert config["mode"] == "iptables" and config["clusterCIDR"] == network.CLUSTER_CIDR
    assert config["nodePortAddresses"] == [f"{network.NODE_IP}/32"]
    assert config["iptables"]["masqueradeAll"] is False


def test_ephemeral_node_state_excludes_the_image_store():
    assert PATHS.containerd_root not in PATHS.ephemeral()
    assert all(str(p).startswith(str(PATHS.root)) for p in PATHS.ephemeral())


# ---- DNS and RBAC addons ----------------------------------------------------------------------------

def test_coredns_serves_the_cluster_domain_on_the_dns_service_address():
    objects = {o["kind"]: o for o in dns_objects("localhost/finetune-coredns:x")}
    assert objects["Service"]["spec"]["clusterIP"] == network.DNS_SERVICE_IP
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert node.NODE_TOLERATION in pod["tolerations"]
    assert f"kubernetes {network.CLUSTER_DOMAIN} " in COREFILE and "forward" not in COREFILE
    directives = {line.split()[0] for line in COREFILE.splitlines()[1:] if line.strip() and line.strip() != "}"}
    assert directives - {"pods", "fallthrough", "ttl"} <= set(build.COREDNS_PLUGINS) | {"prometheus"}


def test_node_components_get_read_only_cluster_roles():
    roles = [o for o in node_rbac() if o["kind"] == "ClusterRole"]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, role["metadata"]["name"]


# ---- Prometheus ---------------------------------------------------------------------------------------

def _scrape_jobs():
    config = prometheus.prometheus_config(api_server="https://10.244.0.1:6443", pki=Path("/pki"), own_port=1,
                                          training_operator_port=2, targets_dir=Path("/targets"))
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_only_the_operator_pods_keep_the_labels_they_export():
    jobs = _scrape_jobs()
    assert jobs["finetune-operator"]["honor_labels"] is True
    assert jobs["pods"]["honor_labels"] is False
    actions = {r.get("action") for r in jobs["pods"]["relabel_configs"]
               if r.get("source_labels") == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]}
    assert actions == {"drop"}


def test_pod_targets_are_the_ports_named_metrics_of_running_pods():
    relabel = _scrape_jobs()["pods"]["relabel_configs"]
    assert {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics", "action": "keep"} in relabel
    assert {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"} in relabel


# ---- Go builds ----------------------------------------------------------------------------------------

def test_the_coredns_build_links_only_the_plugins_of_the_corefile():
    main = build.COREDNS.main_go
    assert "coremain.Run()" in main
    for plugin in build.COREDNS_PLUGINS:
        assert f'"github.com/coredns/coredns/plugin/{plugin}"' in main
    assert "plugin/forward" not in main and "core/plugin" not in main


def test_kube_router_dependency_upgrades_are_pinned_versions():
    for upgrade in versions.KUBE_ROUTER_UPGRADES:
        module, _, version = upgrade.partition("@")
        assert module and version.startswith("v") and "-" not in version, upgrade
    assert build.KUBE_ROUTER.upgrades == versions.KUBE_ROUTER_UPGRADES


@pytest.mark.parametrize("component", list(build.COMPONENTS.values()), ids=list(build.COMPONENTS))
def test_every_component_is_cached_under_its_version(component):
    assert component.bin_dir.name == f"{component.name}-{component.version}"
    assert component.binaries
