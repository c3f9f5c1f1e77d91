"""A sandbox is isolated on a real network: the operator's NetworkPolicies, enforced by kube-router's
firewall on the real node, let a sandbox pod reach its own job's pods, the cluster DNS and S3, and
nothing else -- not another tenant's sandbox, not a tenant namespace, not the API server, not the
operator. Only the monitoring namespace reaches the trainers' and the operator's metrics ports.

The sandboxes are the operator's own (two suspended FineTuneJobs of two tenants); probe pods are
placed in them and connect with plain TCP. kube-router REJECTs what no policy allows, so a refusal
is a quick `connection refused`; a timeout counts as refused too.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from e2e.localcluster import network
from e2e.localcluster.node import NODE_TOLERATION
from e2e.tests.test_control_plane import _wait_for
from e2e.tests.test_operator_cluster import kube_calls

pytestmark = pytest.mark.cluster

PROBE = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    socket.create_connection((host, port), timeout=3).close()
    print("open")
except ConnectionRefusedError:
    print("refused")
except OSError as exc:
    print("timeout" if isinstance(exc, (socket.timeout, TimeoutError)) else f"error {exc}")
"""
RESOLVE = "import socket, sys; print(socket.gethostbyname(sys.argv[1]))"
SERVE = ("import socketserver, sys\n"
         "class H(socketserver.BaseRequestHandler):\n    def handle(self): self.request.sendall(b'hi')\n"
         "servers = [socketserver.ThreadingTCPServer(('', int(p)), H) for p in sys.argv[1:]]\n"
         "import threading\n"
         "for s in servers[1:]: threading.Thread(target=s.serve_forever, daemon=True).start()\n"
         "servers[0].serve_forever()\n")
JOB_PORT = 23456


def _restricted_pod(cluster, name: str, argv: list[str], labels: dict | None = None) -> dict:
    """A pod that passes Pod Security `restricted` and the sandbox's LimitRange defaults."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"probe": name, **(labels or {})}},
        "spec": {
            "nodeSelector": {"finetune.dev/pool": "local"}, "tolerations": [NODE_TOLERATION],
            "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "main", "image": cluster.image("base"), "imagePullPolicy": "Never",
                "command": ["python3", "-c", *argv],
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


def _server(cluster, name: str, ports: list[int]) -> dict:
    return _restricted_pod(cluster, name, [SERVE, *map(str, ports)])


def _client(cluster, name: str) -> dict:
    return _restricted_pod(cluster, name, ["import time; time.sleep(3600)"])


class Probes:
    def __init__(self, kube):
        self.kube = kube

    def connect(self, namespace: str, pod: str, host: str, port: int) -> str:
        out = self.kube.run("exec", "-n", namespace, pod, "--", "python3", "-c", PROBE, host, str(port),
                            check=False, timeout=60)
        return out.stdout.strip() or out.stderr.strip()

    def eventually(self, namespace: str, pod: str, host: str, port: int, expected: str) -> None:
        """Policies take effect within seconds of a pod starting: wait for the expected outcome,
        then check that it holds."""
        outcomes = {"open"} if expected == "open" else {"refused", "timeout"}
        _wait_for(lambda: self.connect(namespace, pod, host, port) in outcomes, 60,
                  f"{namespace}/{pod} -> {host}:{port} to be {expected}", interval=1)
        for _ in range(2):
            outcome = self.connect(namespace, pod, host, port)
            assert outcome in outcomes, f"{namespace}/{pod} -> {host}:{port}: {outcome}, expected {expected}"


def _suspended_job(name: str) -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "s3-credentials", "labels": {"finetune.dev/credentials": "true"}},
         "stringData": {"AWS_ACCESS_KEY_ID": "finetune-local", "AWS_SECRET_ACCESS_KEY": "finetune-local-secret"}},
        {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
         "spec": {"model": {"uri": "s3://models/tiny-llama/"},
                  "datasets": [{"uri": "s3://team-a/data/support.jsonl", "format": "chat"}],
                  "method": {"type": "lora"}, "objective": "sft",
                  "resources": {"workers": 3, "gpusPerWorker": 0, "nodePool": "local", "cpu": "100m",
                                "memory": "256Mi"},
                  "output": {"uri": f"s3://team-a/e2e/netpol-{uuid.uuid4().hex[:8]}/"},
                  "credentials": {"secretName": "s3-credentials"},
                  "runPolicy": {"suspend": True}}},
    ]


def _running(kube, namespace: str, *names: str) -> dict[str, str]:
    def ips():
        pods = {p["metadata"]["name"]: p for p in kube.get("pods", namespace=namespace)["items"]}
        if all(pods.get(n, {}).get("status", {}).get("phase") == "Running" for n in names):
            return {n: pods[n]["status"]["podIP"] for n in names}
        return None
    return _wait_for(ips, 120, f"pods {names} running in {namespace}")


@pytest.fixture(scope="module")
def world(kube, local_cluster, operator):
    """Two tenants with one sandbox each, a plain tenant namespace and the monitoring namespace,
    with probe pods in all of them."""
    suffix = uuid.uuid4().hex[:6]
    tenants = [f"t-netpol-a-{suffix}", f"t-netpol-b-{suffix}"]
    for tenant in tenants:
        kube.apply({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": tenant, "labels": {"finetune.dev/test": "true"}}})
        kube.apply(*_suspended_job("isolated"), namespace=tenant)
    sandboxes = [_wait_for(lambda t=t: (kube.get("finetunejob", "isolated", t).get("status") or {})
                           .get("sandboxNamespace"), 120, f"the sandbox of {t}") for t in tenants]
    for sandbox in sandboxes:
        _wait_for(lambda s=sandbox: len(kube.get("networkpolicies", namespace=s)["items"]) == 2, 60,
                  f"the NetworkPolicies of {sandbox}")
    cfg = operator.config()
    metrics_port = cfg["trainerMetricsPort"]
    a, b = sandboxes
    kube.apply(_server(local_cluster, "server", [JOB_PORT, metrics_port]), _client(local_cluster, "client"), namespace=a)
    kube.apply(_server(local_cluster, "server", [JOB_PORT, metrics_port]), namespace=b)
    plain = tenants[0]
    kube.apply(_server(local_cluster, "server", [JOB_PORT]), _client(local_cluster, "client"), namespace=plain)
    monitoring = "monitoring"
    kube.apply(_client(local_cluster, f"client-{suffix}"), namespace=monitoring)
    yield {
        "a": (a, _running(kube, a, "server", "client")), "b": (b, _running(kube, b, "server")),
        "tenant": (plain, _running(kube, plain, "server", "client")),
        "monitoring": (monitoring, _running(kube, monitoring, f"client-{suffix}")),
        "monitoring_client": f"client-{suffix}", "metrics_port": metrics_port,
        "operator_ip": operator.pod()["status"]["podIP"], "operator_metrics_port": cfg["operatorMetricsPort"],
    }
    kube.run("delete", "pod", f"client-{suffix}", "-n", monitoring, "--wait=false", check=False)
    for tenant in tenants:
        kube.run("delete", "namespace", tenant, "--wait=false", check=False)


def test_a_sandbox_pod_reaches_its_own_jobs_pods_dns_and_s3(kube, local_cluster, world):
    probes = Probes(kube)
    sandbox, ips = world["a"]
    probes.eventually(sandbox, "client", ips["server"], JOB_PORT, "open")
    resolved = kube.run("exec", "-n", sandbox, "client", "--", "python3", "-c", RESOLVE,
                        "kubernetes.default.svc.cluster.local").stdout.strip()
    assert resolved == network.KUBERNETES_SERVICE_IP
    probes.eventually(sandbox, "client", network.NODE_IP, local_cluster.state.ports["s3"], "open")


@pytest.mark.parametrize("target", ["another-sandbox", "tenant-namespace", "api-server-service",
                                    "api-server-address", "operator-metrics", "kubelet"])
def test_a_sandbox_pod_is_refused_everywhere_else(kube, local_cluster, world, target):
    """Each target is first shown open from a pod that is allowed there (so it listens and is
    reachable), then refused from the sandbox."""
    sandbox, _ = world["a"]
    tenant = (world["tenant"][0], "client")
    monitoring = (world["monitoring"][0], world["monitoring_client"])
    host, port, allowed_from = {
        "another-sandbox": (world["b"][1]["server"], world["metrics_port"], monitoring),
        "tenant-namespace": (world["tenant"][1]["server"], JOB_PORT, tenant),
        "api-server-service": (network.KUBERNETES_SERVICE_IP, 443, tenant),
        "api-server-address": (network.NODE_IP, local_cluster.state.ports["kube-apiserver"], tenant),
        "operator-metrics": (world["operator_ip"], world["operator_metrics_port"], monitoring),
        "kubelet": (network.NODE_IP, 10250, tenant),
    }[target]
    probes = Probes(kube)
    probes.eventually(*allowed_from, host, port, "open")
    probes.eventually(sandbox, "client", host, port, "refused")


SERVE_IPV6 = ("import socket\n"
              "s = socket.socket(socket.AF_INET6); s.bind(('::', int(__import__('sys').argv[1]))); s.listen()\n"
              "while True: s.accept()[0].close()\n")
LINK_LOCAL = ("print(' '.join(l.split()[0] for l in open('/proc/net/if_inet6') if l.split()[5] == 'eth0' "
              "and l.startswith('fe80')))")


def test_no_pod_reaches_another_or_the_node_over_ipv6_link_local(kube, local_cluster, world):
    """The kernel gives each pod's interface an IPv6 link-local address, and kube-router enforces the
    IPv4 policies only: the node drops all IPv6 of the pod bridge, so fe80:: is no way around them."""
    sandbox_b, _ = world["b"]
    kube.apply(_restricted_pod(local_cluster, "server6", [SERVE_IPV6, str(JOB_PORT)]), namespace=sandbox_b)
    _running(kube, sandbox_b, "server6")
    hexed = kube.run("exec", "-n", sandbox_b, "server6", "--", "python3", "-c", LINK_LOCAL).stdout.strip()
    assert hexed, "the pod has an IPv6 link-local address (the path exists at layer 2)"
    address = ":".join(hexed[i:i + 4] for i in range(0, 32, 4)) + "%eth0"
    probes = Probes(kube)
    # The listener is up inside its own pod...
    assert probes.connect(sandbox_b, "server6", "::1", JOB_PORT) == "open"
    # ...and no pod reaches it over the pod network: not another sandbox, not a tenant namespace.
    for namespace, pod in (world["a"][0], "client"), (world["tenant"][0], "client"):
        outcome = probes.connect(namespace, pod, address, JOB_PORT)
        assert outcome != "open", f"{namespace}/{pod} -> [{address}]:{JOB_PORT}: {outcome}"
    # The node has no address of its own on the pod bridge to be reached at.
    assert Path(f"/proc/sys/net/ipv6/conf/{network.BRIDGE}/disable_ipv6").read_text().strip() == "1"


def test_nothing_outside_a_sandbox_reaches_into_it_but_monitoring_on_the_metrics_port(kube, world):
    probes = Probes(kube)
    sandbox_ip = world["a"][1]["server"]
    tenant, _ = world["tenant"]
    probes.eventually(tenant, "client", sandbox_ip, JOB_PORT, "refused")
    monitoring, _ = world["monitoring"]
    client = world["monitoring_client"]
    probes.eventually(monitoring, client, sandbox_ip, world["metrics_port"], "open")
    probes.eventually(monitoring, client, sandbox_ip, JOB_PORT, "refused")


def test_only_the_monitoring_namespace_reaches_the_operator_metrics_port(kube, world):
    probes = Probes(kube)
    monitoring, _ = world["monitoring"]
    probes.eventually(monitoring, world["monitoring_client"], world["operator_ip"], world["operator_metrics_port"],
                      "open")
    tenant, _ = world["tenant"]
    probes.eventually(tenant, "client", world["operator_ip"], world["operator_metrics_port"], "refused")


def _s3_block_probe(kube, local_cluster, world, cfg, probes: list[tuple[str, int, str]],
                    s3_egress: dict | None = None) -> list[dict]:
    """The builder's own policies for a job in a fresh namespace, with S3 egress (by default to
    10.0.0.0/8 on the port where a tenant's pod listens); each (host, port, expected) is probed from
    the namespace's client pod. Returns the policies' S3 ipBlocks."""
    from finetune_operator.builders import JobRef
    from finetune_operator.builders.sandbox import network_policies
    from finetune_operator.config import S3Egress

    cfg = cfg.model_copy(update={"s3Egress": S3Egress(**(s3_egress or {"cidrs": ["10.0.0.0/8"], "ports": [JOB_PORT]}))})
    namespace = f"t-except-{uuid.uuid4().hex[:6]}"
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace,
                                                                      "labels": {"finetune.dev/test": "true"}}})
    try:
        job = {"metadata": {"name": "isolated", "namespace": namespace, "uid": str(uuid.uuid4())},
               "spec": _suspended_job("isolated")[1]["spec"]}
        policies = network_policies(JobRef.from_body(job), cfg)
        for policy in policies:
            policy["metadata"]["namespace"] = namespace
        kube.apply(*policies, _client(local_cluster, "client"), namespace=namespace)
        _running(kube, namespace, "client")
        for host, port, expected in probes:
            Probes(kube).eventually(namespace, "client", host, port, expected)
        return [peer["ipBlock"] for rule in policies[1]["spec"]["egress"] for peer in rule["to"] if "ipBlock" in peer]
    finally:
        kube.run("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.mark.parametrize("cluster_networks, expected", [([], "open"), (["10.244.0.0/16"], "refused")],
                         ids=["nothing-excepted", "pod-network-excepted"])
def test_a_range_excepted_inside_an_s3_block_is_refused_on_the_real_network(kube, local_cluster, operator, world,
                                                                            cluster_networks, expected):
    """The `except` of an S3 ipBlock is enforced, not only rendered: with S3 egress to 10.0.0.0/8 on a
    port where a tenant's pod listens, that pod is reachable from the sandbox's policies until the pod
    network is a cluster range (then excepted from the block)."""
    from finetune_operator.config import OperatorConfig

    cfg = OperatorConfig.model_validate(operator.config()).model_copy(update={"clusterNetworks": cluster_networks})
    s3_blocks = _s3_block_probe(kube, local_cluster, world, cfg, [(world["tenant"][1]["server"], JOB_PORT, expected)])
    assert s3_blocks == [{"cidr": "10.0.0.0/8", **({"except": cluster_networks} if cluster_networks else {})}]


def test_the_pod_range_the_node_reports_is_refused_on_the_real_network(kube, local_cluster, operator, world,
                                                                        monkeypatch):
    """discoverClusterNetworks with no clusterNetworks configured: the operator's own reading of the real
    cluster finds the node's pod range, and the S3 block that holds it excepts it, so the tenant's pod
    there is refused."""
    from finetune_operator import cluster_networks
    from finetune_operator.config import OperatorConfig

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    known = cluster_networks.ClusterNetworks(OperatorConfig.model_validate(operator.config()).model_copy(
        update={"clusterNetworks": [], "discoverClusterNetworks": True}))
    assert kube_calls(local_cluster, known.read) is True
    s3_blocks = _s3_block_probe(kube, local_cluster, world, known.excepting(),
                                [(world["tenant"][1]["server"], JOB_PORT, "refused")])
    assert network.NODE_POD_CIDR in s3_blocks[0]["except"], s3_blocks


METADATA_PORT = 80


@pytest.fixture(scope="module")
def metadata_service():
    """A listener at the node's metadata stand-in (network.py): the addresses a cloud node routes
    its pods to, in a network namespace of their own."""
    proc = subprocess.Popen(["ip", "netns", "exec", network.METADATA_NETNS, sys.executable, "-c", SERVE,
                             str(METADATA_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    yield
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    assert proc.returncode in (0, -15), err.decode(errors="replace")


@pytest.mark.parametrize("address", network.METADATA_ADDRESSES)
def test_a_sandbox_pod_is_refused_the_metadata_service_it_has_a_route_to(kube, local_cluster, operator, world,
                                                                       metadata_service, address):
    """A pod without policies reaches the metadata service (so it listens and pods have a route); a
    sandbox pod is refused, also when the platform's S3 egress is the whole Internet: the operator
    excepts the metadata ranges from that block, and the exception is enforced while the rest of the
    block is open (a tenant's pod on the same egress)."""
    from finetune_operator.config import OperatorConfig

    probes = Probes(kube)
    probes.eventually(world["tenant"][0], "client", address, METADATA_PORT, "open")
    probes.eventually(world["a"][0], "client", address, METADATA_PORT, "refused")

    cfg = OperatorConfig.model_validate(operator.config()).model_copy(update={"clusterNetworks": []})
    s3_blocks = _s3_block_probe(kube, local_cluster, world, cfg,
                                [(world["tenant"][1]["server"], JOB_PORT, "open"), (address, METADATA_PORT, "refused")],
                                s3_egress={"cidrs": ["0.0.0.0/0"], "ports": [JOB_PORT, METADATA_PORT]})
    (block,) = s3_blocks
    assert block["cidr"] == "0.0.0.0/0"
    assert any(ipaddress.ip_address(address) in ipaddress.ip_network(e) for e in block["except"]), block


def test_no_pod_has_a_route_off_this_machine(kube, world):
    sandbox, _ = world["a"]
    routes = kube.run("exec", "-n", sandbox, "client", "--", "cat", "/proc/net/route").stdout.splitlines()[1:]
    destinations = {line.split()[1] for line in routes}
    assert "00000000" not in destinations, routes  # no default route
    # An address beyond the machine (TEST-NET-3) is unreachable, not merely filtered.
    out = Probes(kube).connect(sandbox, "client", "203.0.113.1", 443)
    assert out.startswith("error") and "unreachable" in out, out
