"""Following the cluster's own addresses (excepted from every sandbox's S3 egress): the API server's,
and with discoverClusterNetworks the ranges the cluster reports. The reads themselves are tested on the
real API server (e2e test_hostile_tenants.py)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from finetune_operator import cluster_networks, endpoints
from finetune_operator.builders.sandbox import s3_ip_block
from finetune_operator.config import OperatorConfig
from finetune_operator.metrics import Metrics
from finetune_operator.reconcile import Reconciler

CFG = OperatorConfig.model_validate({
    "trainerImage": "registry.example.com/ml/trainer:1",
    "nodePools": {"gpu": {}}, "defaultNodePool": "gpu",
    "clusterNetworks": ["10.244.0.0/16"], "discoverClusterNetworks": False,
})
DISCOVERING = CFG.model_copy(update={"discoverClusterNetworks": True})


class Cluster:
    """What the Kube reads return, one answer per read: strings, or an exception to raise."""

    def __init__(self, endpoints=(), nodes=(), services=()) -> None:
        self.answers = {"api_server_endpoints": list(endpoints), "node_networks": list(nodes),
                        "service_cidrs": list(services)}
        self.asked: list[str] = []

    async def _answer(self, what: str) -> tuple[str, ...]:
        self.asked.append(what)
        answer = self.answers[what].pop(0) if self.answers[what] else ()
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def api_server_endpoints(self) -> tuple[str, ...]:
        return await self._answer("api_server_endpoints")

    async def node_networks(self) -> tuple[str, ...]:
        return await self._answer("node_networks")

    async def service_cidrs(self) -> tuple[str, ...]:
        return await self._answer("service_cidrs")


def follow(cfg: OperatorConfig, cluster: Cluster, refreshes: int) -> tuple[list[bool], list[str]]:
    async def run() -> tuple[list[bool], list[str]]:
        known = cluster_networks.ClusterNetworks(cfg)
        await known.read(cluster)
        reconciler = Reconciler(cluster, known.excepting(), Metrics())
        got = [await cluster_networks.refresh(reconciler, known) for _ in range(refreshes)]
        return got, reconciler.cfg.clusterNetworks
    return asyncio.run(run())


API_SERVER_CASES = [
    # (what, reads after the one at start, the refreshes' answers, clusterNetworks in the end)
    ("unchanged", [("192.0.2.10",)], [False], ["10.244.0.0/16", "192.0.2.10/32"]),
    ("moved", [("192.0.2.20", "192.0.2.21")], [True], ["10.244.0.0/16", "192.0.2.20/32", "192.0.2.21/32"]),
    ("an unreadable slice keeps what is known", [PermissionError("forbidden")], [False],
     ["10.244.0.0/16", "192.0.2.10/32"]),
    ("an empty slice keeps what is known", [()], [False], ["10.244.0.0/16", "192.0.2.10/32"]),
    ("garbage addresses are skipped", [("not-an-ip", "192.0.2.30")], [True], ["10.244.0.0/16", "192.0.2.30/32"]),
    ("moved, then unreadable", [("2001:db8::5",), RuntimeError("connection reset")], [True, False],
     ["10.244.0.0/16", "2001:db8::5/128"]),
]


@pytest.mark.parametrize("what,reads,answers,networks", API_SERVER_CASES, ids=[c[0] for c in API_SERVER_CASES])
def test_the_reconciler_follows_the_api_servers_addresses(what, reads, answers, networks, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cluster = Cluster(endpoints=[("192.0.2.10",), *reads])
    assert follow(CFG, cluster, len(answers)) == (answers, networks)
    assert set(cluster.asked) == {"api_server_endpoints"}, "nodes read without discoverClusterNetworks"


NODE = ("10.244.1.0/24", "10.0.0.11")
DISCOVERY_CASES = [
    # (what, node reads, service reads (start, then one refresh), the refresh's answer, clusterNetworks in the end)
    ("Service ranges, pod ranges and node addresses", [NODE, NODE], [("10.96.0.0/16",), ("10.96.0.0/16",)], False,
     ["10.244.0.0/16", "192.0.2.10/32", "10.0.0.11/32", "10.96.0.0/16", "10.244.1.0/24"]),
    ("a node that joined is excepted on the next read", [NODE, NODE + ("10.244.2.0/24", "10.0.0.12")],
     [("10.96.0.0/16",)] * 2, True,
     ["10.244.0.0/16", "192.0.2.10/32", "10.0.0.11/32", "10.0.0.12/32", "10.96.0.0/16", "10.244.1.0/24",
      "10.244.2.0/24"]),
    ("neighbouring node ranges merge", [("10.244.2.0/24", "10.244.3.0/24", "fd00:10:244:1::/64")] * 2, [(), ()],
     False, ["10.244.0.0/16", "192.0.2.10/32", "10.244.2.0/23", "fd00:10:244:1::/64"]),
    ("no ServiceCIDR API (before 1.33): the nodes still count", [NODE, NODE],
     [LookupError("404 the server could not find the requested resource")] * 2, False,
     ["10.244.0.0/16", "192.0.2.10/32", "10.0.0.11/32", "10.244.1.0/24"]),
    ("unreadable nodes keep what is known", [NODE, PermissionError("forbidden")], [(), ()], False,
     ["10.244.0.0/16", "192.0.2.10/32", "10.0.0.11/32", "10.244.1.0/24"]),
    ("garbage and a default route are no ranges", [("0.0.0.0/0", "::/0", "node-a.example", "10.0.0.11")] * 2,
     [("not-a-cidr",), ()], False, ["10.244.0.0/16", "192.0.2.10/32", "10.0.0.11/32"]),
]


@pytest.mark.parametrize("what,nodes,services,changed,networks", DISCOVERY_CASES, ids=[c[0] for c in DISCOVERY_CASES])
def test_discovery_excepts_what_the_cluster_reports_of_itself(what, nodes, services, changed, networks, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cluster = Cluster(endpoints=[("192.0.2.10",)] * 2, nodes=nodes, services=services)
    assert follow(DISCOVERING, cluster, 1) == ([changed], networks)


def test_discovered_ranges_are_excepted_from_a_sandboxs_s3_egress():
    """The chart's S3 default (the whole internet) with discovery: each reported range inside it is excepted."""
    cfg = endpoints.excepting_cluster(DISCOVERING.model_copy(update={"clusterNetworks": []}), (),
                                      endpoints.reported_networks(["10.96.0.0/16", "10.244.1.0/24", "10.0.0.11"]))
    excepted = set(s3_ip_block("0.0.0.0/0", cfg.clusterNetworks)["ipBlock"]["except"])
    assert excepted >= {"10.96.0.0/16", "10.244.1.0/24", "10.0.0.11/32", "169.254.0.0/16"}


def test_the_service_address_from_the_pod_environment_is_always_excepted(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert cluster_networks.ClusterNetworks(CFG).excepting().clusterNetworks == ["10.244.0.0/16", "10.96.0.1/32"]


def test_the_follower_keeps_reading_after_a_failure(monkeypatch):
    """The loop outlives an unexpected error in one refresh and picks up the next move."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    known = cluster_networks.ClusterNetworks(CFG.model_copy(update={"apiServerRefreshSeconds": 0.01}))
    reconciler = Reconciler(Cluster(), known.excepting(), Metrics())
    calls = []

    async def refresh(r, k):
        calls.append(k)
        if len(calls) == 1:
            raise ValueError("unexpected")
        k.api_server = (ipaddress.ip_address("192.0.2.40"),)
        r.cfg = k.excepting()
        return True

    monkeypatch.setattr(cluster_networks, "refresh", refresh)

    async def run() -> None:
        task = asyncio.create_task(cluster_networks.follow(reconciler, known))
        while len(calls) < 2:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())
    assert reconciler.cfg.clusterNetworks == ["10.244.0.0/16", "192.0.2.40/32"]


@pytest.mark.parametrize("overrides, warned", [
    ({}, True),
    ({"clusterNetworks": ["10.244.0.0/16", "10.96.0.0/12"]}, False),
    ({"discoverClusterNetworks": True}, False),
])
def test_an_operator_without_cluster_networks_says_what_its_sandboxes_reach(overrides, warned):
    cfg = CFG.model_copy(update={"clusterNetworks": []}).model_copy(update=overrides)
    warning = cluster_networks.warning(cfg)
    assert (warning is not None) is warned
    if warned:
        assert "0.0.0.0/0" in warning and "443" in warning and "discoverClusterNetworks" in warning
