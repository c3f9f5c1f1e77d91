"""Pure pieces of the local cluster's real node: its network, containerd, kubelet, kube-proxy and
kube-router configurations, Prometheus' scrape configuration, Kueue's configuration, webhooks and
queues, and the Go builds."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from e2e.localcluster import build, cluster, kueue, network, node, nodes, procs, prometheus, versions
from e2e.localcluster.addons import COREFILE, dns_objects, node_rbac

PATHS = node.NodePaths(Path("/checkout/.cluster/node"), Path("/cache/finetune-operator/containerd"))


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
    assert routes == [network.SERVICE_CIDR, *(f"{a}/32" for a in network.METADATA_ADDRESSES)]
    assert "0.0.0.0/0" not in routes
    (pool,) = bridge["ipam"]["ranges"][0]
    assert pool["gateway"] == network.NODE_IP and pool["subnet"] == network.NODE_POD_CIDR
    assert ipaddress.ip_address(pool["rangeStart"]) > ipaddress.ip_address(network.NODE_IP)
    assert bridge["ipam"]["dataDir"] == "/x/ipam"


def test_isolation_drops_pod_traffic_through_any_other_interface():
    rules = [" ".join(r) for r in network.isolation_rules()]
    assert any(r.startswith(f"-s {network.CLUSTER_CIDR} ! -o {network.BRIDGE}") and r.endswith("-j DROP") for r in rules)
    assert any(r.startswith(f"-d {network.CLUSTER_CIDR} ! -i {network.BRIDGE}") and r.endswith("-j DROP") for r in rules)


def test_the_only_way_off_the_bridge_is_to_the_metadata_stand_in_and_back():
    rules = network.isolation_rules()
    drop = next(i for i, r in enumerate(rules) if r[-1] == "DROP")
    exceptions = rules[:drop]
    assert all(r[-1] == "RETURN" for r in exceptions)
    assert {(r[r.index("-d") + 1], r[r.index("-o") + 1]) for r in exceptions if "-o" in r} == \
        {(a, network.METADATA_LINK) for a in network.METADATA_ADDRESSES}
    assert {(r[r.index("-s") + 1], r[r.index("-i") + 1]) for r in exceptions if "-i" in r} == \
        {(a, network.METADATA_LINK) for a in network.METADATA_ADDRESSES}
    assert len(exceptions) == 2 * len(network.METADATA_ADDRESSES)


def test_no_ipv6_enters_or_leaves_the_bridge():
    rules = [" ".join(r) for r in network.ipv6_isolation_rules()]
    assert [r.split(" -m ")[0] + " " + r.rsplit(" ", 2)[-2] + " " + r.rsplit(" ", 1)[-1] for r in rules] == [
        f"-i {network.BRIDGE} -j DROP", f"-o {network.BRIDGE} -j DROP"]
    tools = {tool: hooks for tool, _, hooks in network.HostNetwork.FIREWALLS}
    assert tools == {"iptables": ("FORWARD",), "ip6tables": ("FORWARD", "INPUT")}


def test_node_ports_lie_below_the_ephemeral_range_of_the_host_services():
    low, high = map(int, network.NODE_PORT_RANGE.split("-"))
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert low < high < ephemeral_low


def test_free_ports_are_distinct():
    names = [f"component-{i}" for i in range(64)]
    ports = procs.free_ports(names)
    assert list(ports) == names and len(set(ports.values())) == len(names)


# ---- containerd, kubelet, kube-proxy, kube-router --------------------------------------------------

def test_containerd_config_is_valid_toml_with_what_this_vm_needs():
    config = tomllib.loads(node.containerd_config(PATHS, "localhost/finetune-pause:abc"))
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "localhost/finetune-pause:abc"
    assert cri["restrict_oom_score_adj"] is True
    assert cri["enable_unprivileged_ports"] is True
    assert cri["cni"]["conf_dir"] == str(PATHS.cni_conf_dir)
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert config["root"] == "/cache/finetune-operator/containerd" and config["state"].startswith("/checkout/.cluster/node/")
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
    assert not any(PATHS.containerd_root.is_relative_to(p) for p in PATHS.ephemeral())
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

def _scrape_jobs(monitor_jobs=()):
    config = prometheus.prometheus_config(own_port=1, training_operator_port=2, targets_dir=Path("/targets"),
                                          monitor_jobs=list(monitor_jobs))
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_prometheus_scrapes_itself_where_it_listens_and_the_monitors_jobs():
    jobs = _scrape_jobs([{"job_name": "serviceMonitor/finetune-system/finetune-operator/0"}])
    assert jobs["prometheus"]["static_configs"] == [{"targets": [f"{network.NODE_IP}:1"]}]
    assert set(jobs) == {"prometheus", "training-operator", "serviceMonitor/finetune-system/finetune-operator/0",
                         "finetune"}


# ---- Go builds ----------------------------------------------------------------------------------------

def test_the_coredns_build_links_only_the_plugins_of_the_corefile():
    main = build.COREDNS.main_go
    assert "coremain.Run()" in main
    linked = set(re.findall(r'"github.com/coredns/coredns/plugin/([\w]+)"', main))
    # A Corefile directive names its plugin's package, except `prometheus`, served by plugin/metrics.
    directives = set(re.findall(r"^\s*(\w+)", COREFILE, re.M)) - {"pods", "fallthrough", "ttl"}
    assert linked == {"metrics" if d == "prometheus" else d for d in directives}
    assert "plugin/forward" not in main and "core/plugin" not in main


def test_kube_router_dependency_upgrades_are_pinned_versions():
    for upgrade in versions.KUBE_ROUTER_UPGRADES:
        module, _, version = upgrade.partition("@")
        assert module and version.startswith("v") and "-" not in version, upgrade
    assert build.KUBE_ROUTER.upgrades == versions.KUBE_ROUTER_UPGRADES


@pytest.mark.parametrize("component", list(build.COMPONENTS.values()), ids=list(build.COMPONENTS))
def test_every_component_is_cached_under_its_version(component):
    """Our own harnesses (e2e/runtimes/) are keyed by their source too, so an edited one is rebuilt."""
    if not component.main_source:
        assert component.bin_dir.name == f"{component.name}-{component.version}"
    else:
        assert component.bin_dir.name.startswith(f"{component.name}-{component.version}-")
    assert component.binaries


def test_an_edited_harness_gets_a_new_cache_key(tmp_path):
    main_go = tmp_path / "main.go"
    main_go.write_text("package main\n\nfunc main() {}\n")
    harness = build.GoComponent(name="probe", module="example.com/probe", version="v1.0.0", binaries={"probe": "."},
                                main_go_file=main_go)
    before = harness.cache_key
    main_go.write_text("package main\n\nfunc main() { println() }\n")
    assert harness.cache_key != before and harness.cache_key.startswith("v1.0.0-")


@pytest.mark.parametrize("resolved_ahead, go_commands", [
    (True, [["go", "build"]]),             # `make cluster-build`: modules resolved by the stream ahead
    (False, [["go", "get"], ["go", "build"]]),
], ids=["resolved-ahead", "resolved-here"])
def test_a_component_compiles_in_its_resolved_module_and_a_cached_one_not_at_all(tmp_path, monkeypatch,
                                                                                resolved_ahead, go_commands):
    monkeypatch.setenv("FTO_CACHE_DIR", str(tmp_path))
    component = build.GoComponent(name="probe", module="example.com/probe", version="v1.0.0",
                                  binaries={"probe": "example.com/probe/cmd/probe"})
    calls = []

    def go(argv, **kwargs):
        calls.append((argv[:2], kwargs["cwd"]))
        if argv[1] == "build":
            Path(argv[argv.index("-o") + 1]).write_text("binary")
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(build.subprocess, "run", go)
    work = tmp_path / "src" / "probe-v1.0.0"
    if resolved_ahead:
        assert build.resolve(component, log=lambda _: None) == work
        calls.clear()
    build.build(component, log=lambda _: None, resolved=(lambda: work) if resolved_ahead else None)
    assert [argv for argv, _ in calls] == go_commands and {cwd for _, cwd in calls} == {work}
    assert component.binary("probe").read_text() == "binary" and (work / "go.mod").exists()
    calls.clear()
    build.build(component, log=lambda _: None, resolved=lambda: pytest.fail("waited for a cached component"))
    assert calls == []


def test_a_cluster_start_waits_for_the_image_store_being_filled(tmp_path, monkeypatch):
    monkeypatch.setattr(node, "NODE_OWNER_FILE", tmp_path / "owner.json")
    purpose = "make cluster-build, importing images into the node's image store (pid 7)"
    (tmp_path / "owner.json").write_text(json.dumps({"root": "/cache/containerd", "containerd": os.getpid(),
                                                     "purpose": purpose}))
    with pytest.raises(RuntimeError, match=re.escape(f"{purpose} (containerd {os.getpid()}) holds the node's image "
                                                     "store; start the cluster once it is done")):
        cluster.LocalCluster(tmp_path / "checkout" / ".cluster")._claim_node()


def test_the_image_store_config_opens_the_nodes_store_without_cri():
    store = tomllib.loads(node.image_store_config(Path("/cache/containerd"), Path("/tmp/s"), Path("/tmp/s/c.sock")))
    node_config = tomllib.loads(node.containerd_config(PATHS, "localhost/finetune-pause:abc"))
    assert store["root"] == "/cache/containerd" and store["grpc"]["address"] == "/tmp/s/c.sock"
    assert set(store["disabled_plugins"]) == set(node_config["disabled_plugins"]) | {"io.containerd.grpc.v1.cri"}
    assert "plugins" not in store   # overlayfs, the default snapshotter, as the node's CRI uses
    assert node_config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == "overlayfs"


# ---- Kueue ----------------------------------------------------------------------------------------------

KUEUE_CONFIG = kueue.configuration(webhook_port=9443, cert_dir=Path("/c/kueue/certs"), metrics_port=8443,
                                   health_port=8081, visibility_address="10.244.0.1", visibility_port=8082)


@pytest.mark.parametrize("path, expected", [
    (("apiVersion",), "config.kueue.x-k8s.io/v1beta2"),
    (("kind",), "Configuration"),
    (("leaderElection", "leaderElect"), False),
    (("health", "healthProbeBindAddress"), "127.0.0.1:8081"),
    (("metrics", "bindAddress"), "127.0.0.1:8443"),
    (("webhook",), {"host": "127.0.0.1", "port": 9443, "certDir": "/c/kueue/certs"}),
    (("internalCertManagement", "enable"), False),
    (("manageJobsWithoutQueueName",), False),
    (("integrations", "frameworks"), ["kubeflow.org/pytorchjob", "batch/job"]),
    (("featureGates", "VisibilityOnDemand"), True),
    (("visibilityServer",), {"bindAddress": "10.244.0.1", "bindPort": 8082}),
])
def test_kueue_configuration(path, expected):
    value = KUEUE_CONFIG
    for key in path:
        value = value[key]
    assert value == expected


@pytest.mark.parametrize("absent", ["waitForPodsReady", "fairSharing", "pprofBindAddress"])
def test_kueue_configuration_leaves_off(absent):
    assert absent not in KUEUE_CONFIG


@pytest.mark.parametrize("framework", ["pod", "deployment", "/job", "batch/"])
def test_kueue_refuses_frameworks_without_group_and_kind(framework):
    with pytest.raises(ValueError, match="group/kind"):
        kueue.configuration(webhook_port=1, cert_dir=Path("/c"), metrics_port=2, health_port=3,
                            visibility_address="10.244.0.1", visibility_port=4, frameworks=(framework,))


def test_kueue_visibility_api_is_aggregated_from_the_host_process_with_a_verified_certificate():
    service, endpoints, api_service = kueue.visibility_objects(address="10.244.0.1", port=8082, ca_bundle=b"CA")
    assert (service["kind"], service["metadata"]) == ("Service", {"name": "visibility-server",
                                                                   "namespace": "kueue-system"})
    assert "selector" not in service["spec"]  # its endpoint is ours, not a pod's
    assert service["spec"]["ports"] == [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8082}]
    assert endpoints["metadata"]["labels"]["kubernetes.io/service-name"] == "visibility-server"
    assert endpoints["endpoints"] == [{"addresses": ["10.244.0.1"], "conditions": {"ready": True}}]
    assert endpoints["ports"] == [{"name": "https", "port": 8082, "protocol": "TCP"}]  # the Service port's name
    assert api_service["metadata"]["name"] == "v1beta2.visibility.kueue.x-k8s.io"
    assert api_service["spec"]["service"] == {"name": "visibility-server", "namespace": "kueue-system", "port": 443}
    assert api_service["spec"]["caBundle"] == "Q0E=" and "insecureSkipTLSVerify" not in api_service["spec"]
    assert kueue.visibility_dns_name() == "visibility-server.kueue-system.svc"


def _webhook(name: str, group: str, resource: str, path: str) -> dict:
    return {"name": name, "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"name": "webhook-service", "namespace": "system", "path": path}},
            "rules": [{"apiGroups": [group], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": [resource]}]}


UPSTREAM_WEBHOOKS = [{
    "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
    "metadata": {"name": "mutating-webhook-configuration"},
    "webhooks": [
        _webhook("mjob.kb.io", "batch", "jobs", "/mutate-batch-v1-job"),
        _webhook("mpytorchjob.kb.io", "kubeflow.org", "pytorchjobs", "/mutate-kubeflow-org-v1-pytorchjob"),
        _webhook("mworkload.kb.io", "kueue.x-k8s.io", "workloads", "/mutate-kueue-x-k8s-io-v1beta2-workload"),
        _webhook("mpod.kb.io", "", "pods", "/mutate--v1-pod"),
        _webhook("mtfjob.kb.io", "kubeflow.org", "tfjobs", "/mutate-kubeflow-org-v1-tfjob"),
        _webhook("mrayjob.kb.io", "ray.io", "rayjobs", "/mutate-ray-io-v1-rayjob"),
    ],
}]
RENDERED_WEBHOOKS = {w["name"]: w for w in kueue.webhook_configurations(UPSTREAM_WEBHOOKS, port=9443,
                                                                        ca_bundle=b"PEM")[0]["webhooks"]}


@pytest.mark.parametrize("name, url", [
    ("mjob.kb.io", "https://127.0.0.1:9443/mutate-batch-v1-job"),
    ("mpytorchjob.kb.io", "https://127.0.0.1:9443/mutate-kubeflow-org-v1-pytorchjob"),
    ("mworkload.kb.io", "https://127.0.0.1:9443/mutate-kueue-x-k8s-io-v1beta2-workload"),
    ("mpod.kb.io", None),     # not an enabled framework: would intercept every pod
    ("mtfjob.kb.io", None),   # same group as PyTorchJob, another resource
    ("mrayjob.kb.io", None),
])
def test_kueue_webhooks_call_loopback_for_kueue_objects_and_enabled_frameworks(name, url):
    if url is None:
        assert name not in RENDERED_WEBHOOKS
        return
    webhook = RENDERED_WEBHOOKS[name]
    assert webhook["clientConfig"] == {"url": url, "caBundle": "UEVN"}
    assert webhook["failurePolicy"] == "Fail"


def test_kueue_webhook_configurations_get_unique_names_and_leave_upstream_alone():
    (rendered,) = kueue.webhook_configurations(UPSTREAM_WEBHOOKS, port=1, ca_bundle=b"x")
    assert rendered["metadata"] == {"name": "kueue-mutating-webhook-configuration"}
    assert UPSTREAM_WEBHOOKS[0]["metadata"]["name"] == "mutating-webhook-configuration"
    assert "service" in UPSTREAM_WEBHOOKS[0]["webhooks"][0]["clientConfig"]


@pytest.mark.parametrize("patch_path, crd_name", [
    ("patches/webhook_in_workloads.yaml", "workloads.kueue.x-k8s.io"),
    ("patches/webhook_in_clusterqueues.yaml", "clusterqueues.kueue.x-k8s.io"),
    ("patches/cainjection_in_workloads.yaml", None),
    ("patches/other.yaml", None),
])
def test_kueue_crds_convert_through_kueue_where_upstream_patches_them(patch_path, crd_name):
    names = kueue.conversion_crd_names({"patches": [{"path": patch_path}]})
    assert names == ({crd_name} if crd_name else set())


def test_a_converting_crd_calls_kueue_on_loopback():
    crd = {"metadata": {"name": "workloads.kueue.x-k8s.io"}, "spec": {"versions": []}}
    converted = kueue.with_conversion_webhook(crd, port=9443, ca_bundle=b"PEM")
    assert converted["spec"]["conversion"] == {"strategy": "Webhook", "webhook": {
        "clientConfig": {"url": "https://127.0.0.1:9443/convert", "caBundle": "UEVN"},
        "conversionReviewVersions": ["v1"]}}
    assert "conversion" not in crd["spec"]


@pytest.mark.parametrize("flavor, node_labels, tolerations", [
    (kueue.pool_flavor("a100"), {nodes.POOL_LABEL: "a100"}, [kueue.GPU_TOLERATION]),
    (kueue.pool_flavor("cpu"), {nodes.POOL_LABEL: "cpu"}, None),
    (kueue.pool_flavor("a100", name="a100-t1"), {nodes.POOL_LABEL: "a100"}, [kueue.GPU_TOLERATION]),
    (kueue.local_node_flavor(), {nodes.POOL_LABEL: "local"}, [node.NODE_TOLERATION]),
])
def test_flavors_steer_admitted_pods_onto_their_pool(flavor, node_labels, tolerations):
    assert flavor["apiVersion"] == "kueue.x-k8s.io/v1beta2" and flavor["kind"] == "ResourceFlavor"
    assert flavor["spec"]["nodeLabels"] == node_labels
    assert flavor["spec"].get("tolerations") == tolerations


def test_gpu_flavor_tolerates_the_taint_of_its_nodes():
    (node_object,) = [n for n in nodes.SIMULATED_NODES if n["metadata"]["name"] == "a100-0"]
    flavor = kueue.pool_flavor("a100")
    assert set(flavor["spec"]["nodeLabels"].items()) <= set(node_object["metadata"]["labels"].items())
    (taint,) = node_object["spec"]["taints"]
    assert any(t["key"] == taint["key"] and t["effect"] == taint["effect"] for t in flavor["spec"]["tolerations"])


def test_unknown_pool_has_no_flavor():
    with pytest.raises(ValueError, match="no KWOK pool"):
        kueue.pool_flavor("h100")


@pytest.mark.parametrize("pool, capacity", [
    ("a100", {"cpu": "192", "memory": "2720Gi", "nvidia.com/gpu": "16"}),
    ("cpu", {"cpu": "64", "memory": "256Gi"}),
])
def test_pool_capacity_sums_its_nodes(pool, capacity):
    assert kueue.pool_capacity(pool) == capacity


@pytest.mark.parametrize("flavors, groups", [
    ({"a100": {"nvidia.com/gpu": 8}},
     [{"coveredResources": ["nvidia.com/gpu"],
       "flavors": [{"name": "a100", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": "8"}]}]}]),
    ({"a100": {"nvidia.com/gpu": kueue.Quota(8, borrowing_limit=4, lending_limit=2)}},
     [{"coveredResources": ["nvidia.com/gpu"], "flavors": [{"name": "a100", "resources": [
         {"name": "nvidia.com/gpu", "nominalQuota": "8", "borrowingLimit": "4", "lendingLimit": "2"}]}]}]),
    # Flavors sharing a resource share a group; what a flavor lacks gets quota 0.
    ({"a100": {"cpu": 96, "nvidia.com/gpu": 8}, "local": {"cpu": 2, "memory": "4Gi"}},
     [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": [
         {"name": "a100", "resources": [{"name": "cpu", "nominalQuota": "96"}, {"name": "memory", "nominalQuota": "0"},
                                        {"name": "nvidia.com/gpu", "nominalQuota": "8"}]},
         {"name": "local", "resources": [{"name": "cpu", "nominalQuota": "2"},
                                         {"name": "memory", "nominalQuota": "4Gi"},
                                         {"name": "nvidia.com/gpu", "nominalQuota": "0"}]}]}]),
    # Disjoint resources, separate groups.
    ({"a100": {"nvidia.com/gpu": 8}, "local": {"cpu": 2}},
     [{"coveredResources": ["nvidia.com/gpu"],
       "flavors": [{"name": "a100", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": "8"}]}]},
      {"coveredResources": ["cpu"],
       "flavors": [{"name": "local", "resources": [{"name": "cpu", "nominalQuota": "2"}]}]}]),
])
def test_cluster_queue_resource_groups(flavors, groups):
    assert kueue.cluster_queue("q", flavors)["spec"]["resourceGroups"] == groups


@pytest.mark.parametrize("kwargs, spec_subset", [
    ({}, {"namespaceSelector": {},
          "preemption": {"reclaimWithinCohort": "Any", "withinClusterQueue": "LowerPriority"}}),
    ({"cohort": "org"}, {"cohortName": "org"}),
    ({"reclaim_within_cohort": "Never", "within_cluster_queue": "Never"},
     {"preemption": {"reclaimWithinCohort": "Never", "withinClusterQueue": "Never"}}),
    ({"namespace_selector": {"matchLabels": {"team": "a"}}}, {"namespaceSelector": {"matchLabels": {"team": "a"}}}),
])
def test_cluster_queue_spec(kwargs, spec_subset):
    queue = kueue.cluster_queue("q", {"a100": {"nvidia.com/gpu": 8}}, **kwargs)
    assert queue["kind"] == "ClusterQueue" and queue["metadata"] == {"name": "q"}
    for key, value in spec_subset.items():
        assert queue["spec"][key] == value
    assert ("cohortName" in queue["spec"]) == ("cohort" in kwargs)


def test_local_queue_points_at_its_cluster_queue():
    assert kueue.local_queue("lq", "ns", "cq") == {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
        "metadata": {"name": "lq", "namespace": "ns"}, "spec": {"clusterQueue": "cq"}}


@pytest.mark.parametrize("owner_kind, owner_name, found", [
    ("PyTorchJob", "train", "pytorchjob-train-1"),
    ("Job", "train", "job-train-2"),
    ("PyTorchJob", "other", None),
])
def test_owned_workload(owner_kind, owner_name, found):
    workloads = [{"metadata": {"name": "pytorchjob-train-1",
                               "ownerReferences": [{"kind": "PyTorchJob", "name": "train"}]}},
                 {"metadata": {"name": "job-train-2", "ownerReferences": [{"kind": "Job", "name": "train"}]}},
                 {"metadata": {"name": "orphan"}}]
    workload = kueue.owned_workload(workloads, owner_kind, owner_name)
    assert (workload["metadata"]["name"] if workload else None) == found


@pytest.mark.parametrize("conditions, ctype, is_true", [
    ([{"type": "Admitted", "status": "True"}], "Admitted", True),
    ([{"type": "Admitted", "status": "False"}], "Admitted", False),
    ([], "Admitted", False),
])
def test_condition_lookup(conditions, ctype, is_true):
    obj = {"status": {"conditions": conditions}}
    assert kueue.is_true(obj, ctype) is is_true
    assert kueue.condition(obj, ctype) == (conditions[0] if conditions else None)


def test_kueue_is_in_the_versions_table_and_the_component_order():
    assert cluster.versions_table()["kueue"] == versions.KUEUE == build.KUEUE.version
    order = cluster.COMPONENT_ORDER
    assert order.index("kueue") > order.index("training-operator")


def test_kueue_build_stamps_its_version():
    assert f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={versions.KUEUE}" in build.KUEUE.ldflags
    assert build.KUEUE.binaries == {"kueue": "sigs.k8s.io/kueue/cmd/kueue"}
