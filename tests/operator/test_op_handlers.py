"""The kopf wiring's own logic: following the API server's addresses (they are excepted from every
sandbox's S3 egress). The read itself is tested on the real API server (e2e test_hostile_tenants.py)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from finetune_operator import handlers
from finetune_operator.config import OperatorConfig
from finetune_operator.metrics import Metrics
from finetune_operator.reconcile import Reconciler

CFG = OperatorConfig.model_validate({
    "trainerImage": "registry.example.com/ml/trainer:1",
    "nodePools": {"gpu": {}}, "defaultNodePool": "gpu",
    "clusterNetworks": ["10.244.0.0/16"],
})


class EndpointSlice:
    """What `Kube.api_server_endpoints` returns on each read: addresses, or an exception to raise."""

    def __init__(self, *reads: tuple[str, ...] | Exception) -> None:
        self.reads = list(reads)

    async def api_server_endpoints(self) -> tuple[str, ...]:
        read = self.reads.pop(0)
        if isinstance(read, Exception):
            raise read
        return read


CASES = [
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


@pytest.mark.parametrize("what,reads,answers,networks", CASES, ids=[c[0] for c in CASES])
def test_the_reconciler_follows_the_api_servers_addresses(what, reads, answers, networks, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    slice_ = EndpointSlice(("192.0.2.10",), *reads)

    async def follow() -> list[bool]:
        start = await handlers.api_server_endpoints(slice_)
        reconciler = Reconciler(slice_, handlers.excepting_api_server(CFG, start), Metrics())
        got = [await handlers.refresh_api_server(reconciler, CFG) for _ in answers]
        assert reconciler.cfg.clusterNetworks == networks
        return got

    assert asyncio.run(follow()) == answers


def test_the_service_address_from_the_pod_environment_is_always_excepted(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert handlers.excepting_api_server(CFG, ()).clusterNetworks == ["10.244.0.0/16", "10.96.0.1/32"]


def test_the_follower_keeps_reading_after_a_failure(monkeypatch):
    """The loop outlives an unexpected error in one refresh and picks up the next move."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = CFG.model_copy(update={"apiServerRefreshSeconds": 0.01})
    reconciler = Reconciler(EndpointSlice(), handlers.excepting_api_server(cfg, ()), Metrics())
    calls = []

    async def refresh(r, c):
        calls.append(c)
        if len(calls) == 1:
            raise ValueError("unexpected")
        r.cfg = handlers.excepting_api_server(c, (ipaddress.ip_address("192.0.2.40"),))
        return True

    monkeypatch.setattr(handlers, "refresh_api_server", refresh)

    async def run() -> None:
        task = asyncio.create_task(handlers.follow_api_server(reconciler, cfg))
        while len(calls) < 2:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())
    assert reconciler.cfg.clusterNetworks == ["10.244.0.0/16", "192.0.2.40/32"]


@pytest.mark.parametrize("overrides, warned", [
    ({}, True),
    ({"clusterNetworks": ["10.244.0.0/16", "10.96.0.0/12"]}, False),
])
def test_an_operator_without_cluster_networks_says_what_its_sandboxes_reach(overrides, warned):
    cfg = CFG.model_copy(update={"clusterNetworks": []}).model_copy(update=overrides)
    warning = handlers.cluster_networks_warning(cfg)
    assert (warning is not None) is warned
    if warned:
        assert "0.0.0.0/0" in warning and "443" in warning and "clusterNetworks" in warning
