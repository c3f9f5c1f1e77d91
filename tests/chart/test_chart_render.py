"""The Helm chart without a cluster: lint, render (default and all-features values), the shape of
every rendered object, security settings, RBAC, Helm conventions (alerts and metric names:
test_alerts.py and test_metrics.py)."""

from __future__ import annotations

import ipaddress
import re

import pytest
import yaml

from finetune_operator import endpoints, k8s
from finetune_operator.builders.sandbox import s3_ip_block
from finetune_operator.config import OperatorConfig
from tests.chart.chartkit import ALL_FEATURES, CHART, REPO, RELEASE_NAMESPACE, by_kind, named, one

VALUE_SETS = {"default": (), "all-features": ("--values", str(ALL_FEATURES))}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
                  "CustomResourceDefinition"}
OPTIONAL_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request, helm_cli) -> tuple[str, list[dict]]:
    return request.param, helm_cli.render(*VALUE_SETS[request.param])


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_helm_lint_strict_passes(helm_cli, value_set):
    result = helm_cli.run("lint", "--strict", str(CHART), *VALUE_SETS[value_set])
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_every_rendered_object_is_well_formed(rendered):
    _, objects = rendered
    assert objects
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind"), obj
        name = obj.get("metadata", {}).get("name")
        assert name and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) and len(name) <= 63, obj["metadata"]
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace"), f"{obj['kind']}/{name} has no namespace"
        labels = obj["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/instance") == "ftop", f"{obj['kind']}/{name} lacks the release labels"


def test_rendered_names_are_unique(rendered):
    _, objects = rendered
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("value_set, expected_kinds", [
    ("default", {"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                 "Deployment", "Service", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
                 "NetworkPolicy"}),
    ("all-features", {"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                      "Deployment", "Service", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
                      "NetworkPolicy", "ServiceMonitor", "PodMonitor", "PrometheusRule"}),
])
def test_monitoring_is_off_by_default_and_on_with_all_features(helm_cli, value_set, expected_kinds):
    assert {o["kind"] for o in helm_cli.render(*VALUE_SETS[value_set])} == expected_kinds


def test_chart_crd_is_identical_to_the_generated_crd():
    chart_crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert chart_crds == sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    for name in chart_crds:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), f"{name}: run make chart-crds"


def test_deployment_runs_one_restricted_replica(rendered):
    _, objects = rendered
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp"}


def test_probes_and_ports_follow_the_operator_config(rendered):
    _, objects = rendered
    config = OperatorConfig.from_yaml(named(objects, "ConfigMap", "-config")["data"]["config.yaml"])
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": config.operatorMetricsPort, "health": config.livenessPort}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    service = one(objects, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": config.operatorMetricsPort,
                                         "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"].items()


def test_config_map_is_a_valid_operator_config(rendered):
    _, objects = rendered
    config = OperatorConfig.from_yaml(named(objects, "ConfigMap", "-config")["data"]["config.yaml"])
    assert config.defaultNodePool in config.nodePools


def test_config_change_restarts_the_operator(helm_cli):
    def checksum(*args):
        deployment = one(helm_cli.render(*args), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum() != checksum("--set", "config.trainerImage=example.com/trainer:2")


def test_watch_namespaces_become_operator_arguments(helm_cli):
    objects = helm_cli.render("--values", str(ALL_FEATURES))
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["--config", "/etc/finetune-operator/config.yaml", "--namespace", "team-a",
                                 "--namespace", "team-b", "--verbose"]


# ---- RBAC ------------------------------------------------------------------------------------

def _is_tenant_role(role: dict) -> bool:
    return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in role["metadata"].get("labels", {}))


def rules_for(objects: list[dict], api_group: str, resource: str) -> set[str]:
    """Verbs the operator's own ClusterRoles grant (not the tenant roles aggregated into edit/view)."""
    verbs: set[str] = set()
    for role in [r for r in by_kind(objects, "ClusterRole") if not _is_tenant_role(r)]:
        for rule in role["rules"]:
            if api_group in rule["apiGroups"] and resource in rule["resources"]:
                verbs.update(rule["verbs"])
    return verbs


# What the operator (operator/finetune_operator/k8s.py, reconcile.py) and kopf do with each resource.
EXPECTED_CLUSTER_VERBS = [
    ("finetune.dev", "finetunejobs", {"get", "list", "watch", "patch"}),
    ("finetune.dev", "finetunejobs/status", {"get", "patch"}),
    ("apiextensions.k8s.io", "customresourcedefinitions", {"list", "watch"}),
    ("", "namespaces", {"get", "list", "watch", "create", "patch", "delete"}),
    ("", "configmaps", {"create", "patch", "delete"}),
    ("", "serviceaccounts", {"create", "patch"}),
    ("", "resourcequotas", {"create", "patch"}),
    ("", "limitranges", {"create", "patch"}),
    ("networking.k8s.io", "networkpolicies", {"create", "patch"}),
    ("kubeflow.org", "pytorchjobs", {"get", "list", "create", "patch", "delete"}),
    ("", "pods", {"list"}),
    ("", "events", {"create", "list"}),
    ("finetune.dev", "tenantpolicies", {"get", "list", "watch", "patch"}),
    ("finetune.dev", "tenantpolicies/status", {"get", "patch"}),
    ("kueue.x-k8s.io", "localqueues", {"create", "patch", "delete"}),
    ("kueue.x-k8s.io", "workloads", {"list", "patch"}),
    ("visibility.kueue.x-k8s.io", "localqueues/pendingworkloads", {"get"}),
]


@pytest.mark.parametrize("api_group, resource, verbs", EXPECTED_CLUSTER_VERBS, ids=[r[1] for r in EXPECTED_CLUSTER_VERBS])
def test_cluster_role_grants_exactly_what_the_operator_uses(rendered, api_group, resource, verbs):
    _, objects = rendered
    assert rules_for(objects, api_group, resource) == verbs


@pytest.mark.parametrize("values, verbs", [
    ((), {"list"}),
    (("--set", "config.discoverClusterNetworks=false"), set()),
], ids=["default", "not-discovering"])
def test_nodes_and_service_ranges_are_listed_only_where_the_operator_discovers_them(helm_cli, values, verbs):
    objects = helm_cli.render(*values)
    assert rules_for(objects, "", "nodes") == verbs
    assert rules_for(objects, "networking.k8s.io", "servicecidrs") == verbs


def test_every_resource_the_operator_touches_is_in_the_cluster_role():
    plural = {"Namespace": "namespaces", "ConfigMap": "configmaps", "Secret": "secrets", "ServiceAccount": "serviceaccounts",
              "ResourceQuota": "resourcequotas", "LimitRange": "limitranges", "Pod": "pods", "Event": "events",
              "NetworkPolicy": "networkpolicies", "PyTorchJob": "pytorchjobs", "FineTuneJob": "finetunejobs",
              "LocalQueue": "localqueues", "Workload": "workloads", "TenantPolicy": "tenantpolicies"}
    expected = {r for _, r, _ in EXPECTED_CLUSTER_VERBS} | {"secrets"}
    assert {plural[kind] for _, kind in k8s.RESOURCES} <= expected


@pytest.mark.parametrize("value_set, secret_verbs, namespaced_secret_reads", [
    ("default", {"get", "create", "patch", "delete"}, set()),
    ("all-features", {"create", "patch", "delete"}, {"team-a", "team-b"}),
])
def test_secret_access_is_read_by_name_and_confined_when_namespaces_are_listed(helm_cli, value_set, secret_verbs,
                                                                               namespaced_secret_reads):
    objects = helm_cli.render(*VALUE_SETS[value_set])
    assert rules_for(objects, "", "secrets") == secret_verbs
    roles = {r["metadata"]["namespace"]: r["rules"] for r in by_kind(objects, "Role")}
    # The one Role in default reads the API server's EndpointSlice by name, nothing else.
    assert roles.pop("default") == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                                     "resourceNames": ["kubernetes"], "verbs": ["get"]}]
    assert set(roles) == namespaced_secret_reads
    for rules in roles.values():
        assert rules == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]


def test_no_role_grants_wildcards_or_privilege_escalation(rendered):
    _, objects = rendered
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
            assert not {"roles", "clusterroles", "rolebindings", "clusterrolebindings", "users", "groups",
                        "serviceaccounts/token"} & set(rule["resources"]), rule
            if "secrets" in rule["resources"]:
                assert not {"list", "watch", "deletecollection"} & set(rule["verbs"]), rule


def test_admission_guard_matches_only_the_operator_service_account(rendered):
    _, objects = rendered
    policy = one(objects, "ValidatingAdmissionPolicy")
    (condition,) = policy["spec"]["matchConditions"]
    sa = one(objects, "ServiceAccount")["metadata"]["name"]
    assert f"system:serviceaccount:{RELEASE_NAMESPACE}:{sa}" in condition["expression"]
    binding = one(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}


# ---- monitoring ------------------------------------------------------------------------------

def test_monitors_scrape_the_named_metrics_ports(helm_cli):
    objects = helm_cli.render("--values", str(ALL_FEATURES))
    assert [e["port"] for e in one(objects, "ServiceMonitor")["spec"]["endpoints"]] == ["metrics"]
    assert [e["port"] for e in one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]] == ["metrics"]


# ---- documentation ---------------------------------------------------------------------------

def leaf_keys(values: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("nodePools", "resources", "labels"):
            keys |= leaf_keys(value, path + ".")
        else:
            keys.add(path)
    return keys


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert leaf_keys(values) - documented == set()


def test_tenant_roles_extend_the_built_in_namespace_roles_with_finetunejobs(rendered):
    _, objects = rendered
    tenant = {r["metadata"]["name"].rsplit("-", 2)[-1]: r for r in by_kind(objects, "ClusterRole") if _is_tenant_role(r)}
    assert set(tenant) == {"edit", "view"}
    edit, view = tenant["edit"], tenant["view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {"create", "delete", "patch"} <= set(edit["rules"][0]["verbs"])
    assert set(view["rules"][0]["verbs"]) == {"get", "list", "watch"}


def test_only_the_monitoring_namespace_reaches_the_operator_metrics_port(rendered):
    value_set, objects = rendered
    policy = one(objects, "NetworkPolicy")
    deployment = one(objects, "Deployment")
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == (["Ingress"] if value_set == "default" else ["Ingress", "Egress"])
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert "metrics" in ports


DNS_RULE = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}


def test_the_operators_egress_is_open_by_default(helm_cli):
    assert "egress" not in one(helm_cli.render(), "NetworkPolicy")["spec"]


def test_the_operators_egress_reaches_only_the_api_server_dns_and_s3(helm_cli):
    """all-features: the API server as given, the cluster DNS, config.s3Egress, and the extra rule."""
    egress = one(helm_cli.render("--values", str(ALL_FEATURES)), "NetworkPolicy")["spec"]["egress"]
    assert egress == [
        {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}, {"ipBlock": {"cidr": "10.96.0.1/32"}}],
         "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]},
        DNS_RULE,
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"protocol": "TCP", "port": 9000}]},
        {"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"protocol": "TCP", "port": 443}]},
    ]


# S3 blocks of the operator's egress, each against the block a sandbox gets for it (one render per
# clusterNetworks): the whole internet, ranges holding one metadata address, private ranges holding
# cluster ranges, a block that is itself a cluster address, ranges that hold nothing to except.
S3_BLOCKS = ["0.0.0.0/0", "::/0", "100.64.0.0/10", "160.0.0.0/3", "10.0.0.0/8", "10.244.0.1/32", "10.244.0.0/16",
             "192.168.0.0/16", "fc00::/7", "fe00::/7", "fd00:ec2::/32", "FD00:0EC2:0:0::/64", "2600:1f00::/24"]
CLUSTER_NETWORK_SETS = {"none": [], "ipv4 and ipv6": ["10.244.0.0/16", "10.96.0.0/12", "fd00:10::/64", "fe80::/10"]}


def normalised(block: dict) -> dict:
    """An ipBlock with its ranges written as Python writes them (the chart keeps what it was given)."""
    network = lambda cidr: str(ipaddress.ip_network(cidr, strict=False))  # noqa: E731
    return {"cidr": network(block["cidr"]), **({"except": [network(c) for c in block["except"]]}
                                                 if block.get("except") else {})}


@pytest.mark.parametrize("cluster_networks", list(CLUSTER_NETWORK_SETS))
def test_the_operators_s3_egress_excepts_what_a_sandboxs_does(helm_cli, cluster_networks):
    """Metadata ranges and clusterNetworks inside each S3 block are excepted: the chart computes it with
    bit strings (Helm has no CIDR functions), sandbox.s3_ip_block with ipaddress; both must agree."""
    networks = CLUSTER_NETWORK_SETS[cluster_networks]
    args = ["--set", "networkPolicy.egress.enabled=true", "--set", "networkPolicy.egress.apiServer.cidrs={192.0.2.10/32}",
            "--set", f"config.s3Egress.cidrs={{{','.join(S3_BLOCKS)}}}"]
    if networks:
        args += ["--set", f"config.clusterNetworks={{{','.join(networks)}}}"]
    egress = one(helm_cli.render(*args), "NetworkPolicy")["spec"]["egress"]
    assert egress[0]["ports"] == [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]
    rendered = [normalised(to["ipBlock"]) for to in egress[2]["to"]]
    assert rendered == [s3_ip_block(cidr, networks)["ipBlock"] for cidr in S3_BLOCKS]
    everything = {c for block in rendered[:2] for c in block["except"]}
    assert {str(m) for m in endpoints.METADATA_NETWORKS} <= everything


def test_egress_without_the_api_servers_addresses_fails_where_they_cannot_be_looked_up(helm_cli):
    """helm template (and Argo CD) cannot look the API server up: the render says what to set."""
    result = helm_cli.template("--set", "networkPolicy.egress.enabled=true", check=False)
    assert result.returncode != 0
    assert "networkPolicy.egress.apiServer.cidrs" in result.stderr


# ---- Helm conventions ------------------------------------------------------------------------------------

def test_every_object_carries_the_standard_labels(rendered):
    _, objects = rendered
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", obj["metadata"]["name"]
        assert labels.get("app.kubernetes.io/instance") == "ftop", obj["metadata"]["name"]


@pytest.mark.parametrize("args, base_name, app_name", [
    ((), "ftop-finetune-operator", "finetune-operator"),
    (("--set", "nameOverride=tuner"), "ftop-tuner", "tuner"),
    (("--set", "fullnameOverride=ml-tuning"), "ml-tuning", "finetune-operator"),
], ids=["default", "nameOverride", "fullnameOverride"])
def test_name_overrides_name_every_object(helm_cli, args, base_name, app_name):
    objects = helm_cli.render(*args)
    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["name"] == base_name
    assert deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == app_name
    for obj in objects:
        if obj["kind"] not in ("ClusterRole",) or "aggregate" not in str(obj["metadata"].get("labels")):
            assert obj["metadata"]["name"].startswith(base_name), obj["metadata"]["name"]


@pytest.mark.parametrize("args, image", [
    ((), "ghcr.io/finetune-operator/finetune-trainer:{app_version}"),
    (("--set", "config.trainerImage=registry.example.com/ml/trainer:2.0"), "registry.example.com/ml/trainer:2.0"),
], ids=["appVersion", "set"])
def test_the_trainer_image_follows_the_charts_app_version(helm_cli, args, image):
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    config = yaml.safe_load(named(helm_cli.render(*args), "ConfigMap", "-config")["data"]["config.yaml"])
    assert config["trainerImage"] == image.format(app_version=app_version)
