"""The Helm chart on the local control plane: the rendered manifests pass the API server's own
validation, `helm install` runs the operator image as a container on the real node, its service
account can do what the operator needs and nothing more (RBAC and the admission guard, asked of the
real API server), a FineTuneJob from examples/ succeeds with that installation (so a verb missing
from the chart's RBAC fails it), and `helm uninstall` leaves no operator object behind.

The tests of this module share one release (namespaced mode: it watches one tenant namespace) and
run in file order; the last one uninstalls it. The session's cluster-wide release is scaled down
meanwhile, so that exactly one operator acts on the tenant namespace.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from e2e.localcluster import build, network
from e2e.localcluster.cluster import TENANT_GROUP
from e2e.localcluster.node import NODE_NAME
from e2e.localcluster.operator_release import OperatorRelease, local_operator_config, local_values as chart_values
from e2e.localcluster.paths import REPO_ROOT
from e2e.tests.test_sandbox_network import JOB_PORT, RESOLVE, Probes, _client, _server

pytestmark = pytest.mark.cluster

CHART = REPO_ROOT / "charts" / "finetune-operator"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
EXAMPLE = REPO_ROOT / "examples" / "finetunejob-lora.yaml"
RELEASE = "fto"
INSTANCE_SELECTOR = f"app.kubernetes.io/instance={RELEASE}"
# Kinds of the monitoring stack (prometheus-operator); the local cluster has no such CRDs.
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def wait_for(check, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class HelmRunner:
    def __init__(self, kubeconfig: Path):
        build.build(build.HELM, log=lambda *_: None)
        self.binary = build.HELM.binary("helm")
        self.kubeconfig = kubeconfig

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([str(self.binary), "--kubeconfig", str(self.kubeconfig), *args],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result


def make_namespace(kube, name: str, labels: dict[str, str]) -> str:
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
    return name


@pytest.fixture(scope="module")
def helm(local_cluster) -> HelmRunner:
    return HelmRunner(local_cluster.kubeconfig)


@pytest.fixture(scope="module")
def release_namespace(kube):
    # The operator's namespace enforces the `restricted` Pod Security Standard: the pod must pass it.
    name = make_namespace(kube, f"fto-helm-{uuid.uuid4().hex[:6]}", {
        "pod-security.kubernetes.io/enforce": "restricted", "finetune.dev/test": "true"})
    yield name
    kube.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def tenant_namespace(kube):
    name = make_namespace(kube, f"t-helm-tenant-{uuid.uuid4().hex[:6]}", {"finetune.dev/test": "true"})
    kube.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "tenant-edit", "namespace": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": TENANT_GROUP}]})
    yield name
    kube.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module", autouse=True)
def only_this_release_acts(local_cluster):
    """The session's cluster-wide operator (if one runs) steps aside for this module's release."""
    session_release = OperatorRelease(local_cluster)
    was_running = session_release.running()
    if was_running:
        session_release.kill()
    yield
    if was_running:
        session_release.up(log=lambda *_: None)


@pytest.fixture(scope="module")
def local_values(local_cluster, tenant_namespace, tmp_path_factory) -> dict:
    """Values for the local cluster: the operator image on the real node, watching the tenant
    namespace only, talking to the local S3 server."""
    config = local_operator_config(local_cluster, {"reconcileIntervalSeconds": 3, "progressPollSeconds": 2})
    # The operator's own egress restricted too: its API server addresses looked up at install.
    return {**chart_values(local_cluster, config, [tenant_namespace]),
            "networkPolicy": {"enabled": True, "egress": {"enabled": True}}}


@pytest.fixture(scope="module")
def values_file(local_values, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("helm") / "local-values.yaml"
    path.write_text(yaml.safe_dump(local_values))
    return path


@pytest.fixture(scope="module")
def release(helm, kube, release_namespace, values_file):
    installed = helm("install", RELEASE, str(CHART), "--namespace", release_namespace, "--values", str(values_file),
                     "--wait", "--timeout", "180s", check=False, timeout=240)
    if installed.returncode != 0:
        pods = kube.run("get", "pods", "-n", release_namespace, "-o", "wide", check=False).stdout
        raise AssertionError(f"helm install failed:\n{installed.stderr}\n{pods}")
    yield release_namespace
    helm("uninstall", RELEASE, "--namespace", release_namespace, "--wait", check=False)


def operator_sa(release_namespace: str) -> str:
    return f"system:serviceaccount:{release_namespace}:{RELEASE}-finetune-operator"


def operator_pod(kube, release_namespace: str) -> dict:
    pods = kube.get("pods", namespace=release_namespace, selector=INSTANCE_SELECTOR)["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


# ---- the rendered manifests against the real API server -------------------------------------------------

@pytest.mark.parametrize("value_set", ["default", "all-features"])
def test_rendered_manifests_pass_server_side_dry_run(helm, kube, release_namespace, tenant_namespace, value_set):
    args = ["template", "dry", str(CHART), "--namespace", release_namespace]
    if value_set == "all-features":
        args += ["--values", str(ALL_FEATURES), "--set", f"watchNamespaces={{{tenant_namespace}}}",
                 "--set", f"monitoring.dashboard.namespace={release_namespace}"]
    objects = [o for o in yaml.safe_load_all(helm(*args).stdout) if o]
    checked = [o for o in objects if o["kind"] not in PROMETHEUS_OPERATOR_KINDS]
    assert len(checked) >= 8
    result = kube.run("apply", "--dry-run=server", "--server-side", "--field-manager=helm-dry-run", "-f", "-",
                      input=yaml.safe_dump_all(checked))
    assert result.stdout.count("(server dry run)") == len(checked), result.stdout


@pytest.mark.parametrize("values, warned", [
    ([], False),  # the chart's defaults: clusterNetworks empty, the cluster's own ranges discovered
    (["--set", "config.discoverClusterNetworks=false"], True),
    (["--set", "config.discoverClusterNetworks=false", "--set", "config.clusterNetworks={10.244.0.0/16,10.96.0.0/16}"],
     False),
], ids=["default", "not-discovering", "cluster-networks-set"])
def test_install_notes_warn_while_cluster_networks_are_not_set(helm, release_namespace, values, warned):
    notes = helm("install", "notes", str(CHART), "--namespace", release_namespace, "--dry-run=client",
                 *values).stdout.split("NOTES:", 1)[1]
    assert "kubectl get finetunejobs -A" in notes
    assert ("WARNING: config.clusterNetworks is empty" in notes) is warned, notes
    if warned:  # what the sandboxes reach, in the chart's values
        assert "Trainer pods may connect to 0.0.0.0/0\non port(s) 443" in notes, notes


# ---- helm install ----------------------------------------------------------------------------------------

def test_operator_pod_runs_on_the_real_node_with_the_chart_service_account(kube, release, local_cluster):
    pod = wait_for(lambda: (p := operator_pod(kube, release)) and p["status"].get("phase") == "Running" and p,
                   60, "the operator pod to run")
    assert pod["spec"]["nodeName"] == NODE_NAME
    status = pod["status"]["containerStatuses"][0]
    assert status["image"] == local_cluster.image("operator") and status["imageID"]
    assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-finetune-operator"
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True"
    deployment = kube.get("deployment", f"{RELEASE}-finetune-operator", namespace=release)
    assert deployment["status"].get("availableReplicas") == 1


def _pod_url(kube, release: str, port: int, path: str) -> str:
    return f"http://{operator_pod(kube, release)['status']['podIP']}:{port}{path}"


def test_operator_answers_its_health_and_metrics_endpoints(kube, release, local_values):
    config = local_values["config"]
    # The kubelet's readiness probe passed (helm --wait); the host reaches the pod's address.
    health = wait_for(lambda: _read(_pod_url(kube, release, config["livenessPort"], "/healthz")), 60,
                      "the operator's /healthz")
    assert json.loads(health)
    metrics = wait_for(lambda: _read(_pod_url(kube, release, config["operatorMetricsPort"], "/metrics")), 30,
                       "the operator's metrics")
    assert 'finetune_jobs{phase="Running"}' in metrics


def test_the_operators_egress_reaches_the_api_server_dns_and_s3_and_nothing_else(kube, release, local_cluster,
                                                                                   tenant_namespace):
    """With networkPolicy.egress.enabled (the API server's addresses looked up by helm on the real
    cluster) the operator pod connects to S3 and the API server, resolves names, and cannot open a
    port that a plain tenant pod serves to everyone else."""
    kube.apply(_server(local_cluster, "egress-target", [JOB_PORT]), _client(local_cluster, "egress-client"),
               namespace=tenant_namespace)
    try:
        target_ip = wait_for(lambda: (p := kube.get("pod", "egress-target", namespace=tenant_namespace))["status"]
                             .get("phase") == "Running" and p["status"]["podIP"], 120, "the egress target pod")
        wait_for(lambda: kube.get("pod", "egress-client", namespace=tenant_namespace)["status"].get("phase")
                 == "Running", 120, "the egress client pod")
        probes = Probes(kube)
        name = operator_pod(kube, release)["metadata"]["name"]
        # The control: the tenant's server is open to a pod that no egress policy restricts.
        probes.eventually(tenant_namespace, "egress-client", target_ip, JOB_PORT, "open")
        probes.eventually(release, name, network.NODE_IP, local_cluster.state.ports["s3"], "open")
        probes.eventually(release, name, network.KUBERNETES_SERVICE_IP, 443, "open")
        probes.eventually(release, name, target_ip, JOB_PORT, "refused")
        resolved = kube.run("exec", "-n", release, name, "--", "python3", "-c", RESOLVE,
                            "kube-dns.kube-system.svc.cluster.local", timeout=60).stdout.strip()
        assert resolved == network.DNS_SERVICE_IP
    finally:
        kube.run("delete", "pod", "egress-target", "egress-client", "-n", tenant_namespace, "--wait=false",
                 check=False)


def _read(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


# ---- what the service account may and may not do (RBAC, asked of the API server) -------------------------

CAN_I_CASES = [
    # (verb, resource, namespace ('' = all namespaces, None = cluster-scoped), "TENANT" = the watched tenant namespace)
    ("watch", "finetunejobs.finetune.dev", "", True),
    ("patch", "finetunejobs.finetune.dev/status", "TENANT", True),
    ("create", "namespaces", None, True),
    ("delete", "namespaces", None, True),
    ("create", "pytorchjobs.kubeflow.org", "ftj-any-sandbox", True),
    ("list", "pods", "ftj-any-sandbox", True),
    ("create", "secrets", "ftj-any-sandbox", True),
    ("get", "secrets", "TENANT", True),
    ("create", "events", "TENANT", True),
    ("list", "events", "ftj-any-sandbox", True),
    ("get", "endpointslices.discovery.k8s.io#kubernetes", "default", True),  # the API server's addresses
    ("get", "localqueues.visibility.kueue.x-k8s.io/pendingworkloads", "ftj-any-sandbox", True),  # queue positions
    ("list", "localqueues.visibility.kueue.x-k8s.io", "ftj-any-sandbox", False),
    ("get", "endpointslices.discovery.k8s.io", "default", False),  # that one only
    ("list", "nodes", None, True),  # config.discoverClusterNetworks: the nodes' pod ranges and addresses
    ("list", "servicecidrs.networking.k8s.io", None, True),  # and the Service ranges
    ("watch", "nodes", None, False),
    ("patch", "nodes", None, False),
    ("get", "endpointslices.discovery.k8s.io#kubernetes", "kube-system", False),
    ("list", "secrets", "", False),
    ("watch", "secrets", "", False),
    ("list", "secrets", "TENANT", False),
    ("get", "secrets", "kube-system", False),
    ("get", "secrets", "default", False),
    ("delete", "secrets", "kube-system", True),  # RBAC allows it (sandbox copies); the admission guard stops it
    ("create", "pods", "TENANT", False),
    ("create", "pods/exec", "ftj-any-sandbox", False),
    ("create", "serviceaccounts/token", "kube-system", False),
    ("delete", "nodes", None, False),
    ("update", "finetunejobs.finetune.dev", "TENANT", False),
    ("patch", "finetunejobs.finetune.dev/scale", "TENANT", False),
    ("create", "serviceaccounts", "kube-system", True),  # RBAC allows it; the admission guard stops it
    ("escalate", "clusterroles", None, False),
    ("bind", "clusterroles", None, False),
    ("create", "clusterrolebindings", None, False),
    ("create", "rolebindings", "TENANT", False),
    ("impersonate", "users", None, False),
    ("impersonate", "groups", None, False),
    ("impersonate", "serviceaccounts", "kube-system", False),
    ("delete", "customresourcedefinitions", None, False),
    ("patch", "validatingadmissionpolicies", None, False),
]


@pytest.mark.parametrize("verb, resource, namespace, allowed", CAN_I_CASES,
                         ids=[f"{v}-{r.split('.')[0]}{'-' + r.split('#')[1] if '#' in r else ''}-{n or 'cluster'}"
                              for v, r, n, _ in CAN_I_CASES])
def test_service_account_can_do_only_what_the_operator_needs(kube, release, tenant_namespace, verb, resource,
                                                             namespace, allowed):
    resource, _, subresource = resource.partition("/")  # kubectl reads TYPE/NAME: pass a subresource apart
    resource, _, name = resource.partition("#")
    args = ["auth", "can-i", verb, f"{resource}/{name}" if name else resource, f"--as={operator_sa(release)}"]
    if subresource:
        args.append(f"--subresource={subresource}")
    if namespace == "":
        args.append("--all-namespaces")
    elif namespace is not None:
        args += ["-n", tenant_namespace if namespace == "TENANT" else namespace]
    answer = kube.run(*args, check=False).stdout.strip()
    assert answer == ("yes" if allowed else "no"), f"can-i {verb} {resource} in {namespace}: {answer}"


GUARD_CASES = [
    # (what the operator's service account tries, kubectl args; namespace placeholders filled in)
    ("a Secret in a tenant namespace", ["create", "secret", "generic", "stolen", "--from-literal=k=v", "-n", "TENANT"]),
    ("a Secret in kube-system", ["create", "secret", "generic", "stolen", "--from-literal=k=v", "-n", "kube-system"]),
    ("a ConfigMap in default", ["create", "configmap", "planted", "--from-literal=k=v", "-n", "default"]),
    ("deleting a ConfigMap of the tenant", ["delete", "configmap", "kube-root-ca.crt", "-n", "TENANT"]),
    ("deleting a tenant namespace", ["delete", "namespace", "TENANT", "--dry-run=server"]),
    ("an unlabelled namespace", ["create", "namespace", "not-a-sandbox"]),
]


@pytest.mark.parametrize("attempt, args", GUARD_CASES, ids=[c[0] for c in GUARD_CASES])
def test_admission_guard_confines_the_operators_writes_to_sandboxes(kube, release, tenant_namespace, attempt, args):
    args = [tenant_namespace if a == "TENANT" else a for a in args]
    if "--dry-run=server" not in args:
        args.append("--dry-run=server")

    def denied():  # a new policy takes a moment to be enforced
        result = kube.run(*args, f"--as={operator_sa(release)}", check=False)
        assert "created" not in result.stdout or result.returncode != 0, result.stdout
        return result.returncode != 0 and "may only write in its sandbox namespaces" in result.stderr and result
    wait_for(denied, 30, f"the admission guard to deny {attempt}")


MANAGED = {"app.kubernetes.io/managed-by": "finetune-operator", "finetune.dev/test": "true"}
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}
POD_SECURITY_CASES = [
    # (what the operator's service account tries: the labels of a sandbox namespace it creates)
    ("no Pod Security label", MANAGED, False),
    ("Pod Security privileged", {**MANAGED, "pod-security.kubernetes.io/enforce": "privileged"}, False),
    ("Pod Security baseline", {**MANAGED, "pod-security.kubernetes.io/enforce": "baseline"}, False),
    ("restricted at an old version", {**MANAGED, **RESTRICTED, "pod-security.kubernetes.io/enforce-version": "v1.20"},
     False),
    ("restricted, latest", {**MANAGED, **RESTRICTED}, True),
]


@pytest.mark.parametrize("what, labels, allowed", POD_SECURITY_CASES, ids=[c[0] for c in POD_SECURITY_CASES])
def test_admission_guard_lets_the_operator_make_only_restricted_sandboxes(kube, release, what, labels, allowed):
    """A stolen operator token cannot make a namespace where privileged pods are admitted."""
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": f"ftj-helm-psa-{uuid.uuid4().hex[:6]}", "labels": labels}}
    result = kube.run("create", "--dry-run=server", f"--as={operator_sa(release)}", "-f", "-",
                      input=json.dumps(namespace), check=False)
    if allowed:
        assert result.returncode == 0 and "created (server dry run)" in result.stdout, result.stderr
    else:
        assert result.returncode != 0 and "must enforce Pod Security restricted" in result.stderr, result


def test_admission_guard_keeps_a_sandboxs_pod_security(kube, release):
    sandbox = make_namespace(kube, f"ftj-helm-psa-{uuid.uuid4().hex[:6]}", {**MANAGED, **RESTRICTED})
    try:
        result = kube.run("label", "namespace", sandbox, "pod-security.kubernetes.io/enforce=privileged",
                          "--overwrite", "--dry-run=server", f"--as={operator_sa(release)}", check=False)
        assert result.returncode != 0 and "must enforce Pod Security restricted" in result.stderr, result
    finally:
        kube.run("delete", "namespace", sandbox, "--wait=false", check=False)


def test_admission_guard_lets_the_operator_write_in_its_sandboxes(kube, release):
    sandbox = make_namespace(kube, f"ftj-helm-guard-{uuid.uuid4().hex[:6]}", {**MANAGED, **RESTRICTED})
    try:
        result = kube.run("create", "secret", "generic", "s3-credentials", "--from-literal=k=v", "-n", sandbox,
                          "--dry-run=server", f"--as={operator_sa(release)}")
        assert "created (server dry run)" in result.stdout
    finally:
        kube.run("delete", "namespace", sandbox, "--wait=false", check=False)


# ---- a FineTuneJob with this installation -----------------------------------------------------------------

def test_a_finetunejob_from_examples_succeeds_with_the_helm_installation(kube, release, tenant_namespace,
                                                                          local_values):
    name = next(d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d["kind"] == "FineTuneJob")["metadata"]["name"]
    kube.run("apply", "-n", tenant_namespace, "-f", str(EXAMPLE))
    wait = kube.run("wait", "-n", tenant_namespace, "--for=condition=Succeeded", f"finetunejob/{name}",
                    "--timeout=180s", timeout=200, check=False)
    status = kube.get("finetunejob", name, namespace=tenant_namespace).get("status", {})
    assert "condition met" in wait.stdout, json.dumps(status, indent=1)
    assert status["phase"] == "Succeeded"
    # The helm-installed operator (it watches only this namespace) saw the job succeed, and no API
    # call it made was refused.
    metrics = _read(_pod_url(kube, release, local_values["config"]["operatorMetricsPort"], "/metrics")) or ""
    assert 'finetune_jobs{phase="Succeeded"} 1.0' in metrics, metrics
    pod = operator_pod(kube, release)
    # Its Events name the pod that wrote them (the pod's hostname), so two replicas' Events stay apart.
    events = kube.get("events", namespace=tenant_namespace)["items"]
    ours = [e for e in events if e.get("reportingComponent") == "finetune-operator"
            and e["involvedObject"]["name"] == name]
    assert ours and {e["reportingInstance"] for e in ours} == {f"finetune-operator-{pod['metadata']['name']}"}, ours
    log = kube.run("logs", "-n", release, pod["metadata"]["name"], "-c", "operator").stdout
    # A request kopf retries (the API server answering 429 "storage is (re)initializing" right after
    # a CRD was applied) is no refusal; anything else at ERROR is.
    errors = [line for line in log.splitlines() if "[ERROR" in line and "failed; will retry" not in line]
    assert "forbidden" not in log.lower() and not errors, log[-4000:]
    # The chart's Role in `default` lets it read the API server's endpoint (excepted from sandbox egress).
    assert f"excepted from every sandbox's S3 egress besides clusterNetworks: the API server ({network.NODE_IP})" \
        in log, log[-4000:]
    # discoverClusterNetworks (on in the local configuration): read with the chart's RBAC.
    assert re.search(rf"the ranges the cluster reports \([^)]*{re.escape(network.SERVICE_CIDR)}", log), log[-4000:]
    kube.run("delete", "finetunejob", name, "-n", tenant_namespace, "--timeout=120s", timeout=150)


# ---- helm uninstall (last: it removes the shared release) -------------------------------------------------

NAMESPACED_KINDS = ["deployments", "replicasets", "pods", "services", "configmaps", "serviceaccounts", "roles",
                    "rolebindings"]
CLUSTER_KINDS = ["clusterroles", "clusterrolebindings", "validatingadmissionpolicies",
                 "validatingadmissionpolicybindings"]


def test_helm_uninstall_leaves_no_operator_objects_behind(helm, kube, release, tenant_namespace, local_values):
    helm("uninstall", RELEASE, "--namespace", release, "--wait", "--timeout", "120s")

    def leftovers() -> list[str]:
        found = []
        for namespace in (release, tenant_namespace):
            out = kube.run("get", ",".join(NAMESPACED_KINDS), "-n", namespace, "-l", INSTANCE_SELECTOR, "-o", "name")
            found += out.stdout.split()
        found += kube.run("get", ",".join(CLUSTER_KINDS), "-l", INSTANCE_SELECTOR, "-o", "name").stdout.split()
        return found
    wait_for(lambda: not leftovers(), 60, "the release's objects to go")
    sandboxes = kube.run("get", "namespaces", "-o", "name").stdout.split()
    assert not [s for s in sandboxes if f"ftj-{tenant_namespace}" in s]
    assert helm("list", "--namespace", release, "-q").stdout.strip() == ""
    # The kubelet stopped the operator's container when its pod went.
    wait_for(lambda: not kube.get("pods", namespace=release)["items"], 60, "the operator pod to go")
    assert not kube.cluster.node_runtime.container_pids(release)
