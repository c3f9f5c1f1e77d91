"""The cluster's own addresses, kept current: excepted from every sandbox's S3 egress, and never where
a wildcard S3 endpoint may lead.

Always: the API server (the `kubernetes` Service address from the pod's environment and the
EndpointSlice `default/kubernetes`; managed control planes replace them). With
OperatorConfig.discoverClusterNetworks, also what the cluster reports of itself: its Service ranges
(ServiceCIDR objects) and every node's pod ranges (spec.podCIDRs) and addresses (InternalIP,
ExternalIP), so that a node pool that grows is followed without a configuration change. Both are read
when the operator starts and every apiServerRefreshSeconds after; a read that fails or finds nothing
keeps what was known (an API server always has an endpoint and a cluster always has a node, so none is
a moment of change). The next pass of each job applies its sandbox's NetworkPolicy with the new excepts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from finetune_operator import endpoints, k8s
from finetune_operator.config import OperatorConfig

if TYPE_CHECKING:
    from finetune_operator.reconcile import Reconciler

log = logging.getLogger(__name__)


async def _read(what: str, read: Callable[[], Awaitable[tuple[str, ...]]]) -> tuple[str, ...] | None:
    try:
        return await read()
    except Exception as exc:  # noqa: BLE001 - RBAC, an API server without the API, a transient error: say so
        log.warning("cannot read %s: %s", what, exc)
        return None


async def api_server_endpoints(kube: k8s.Kube) -> tuple[endpoints.Address, ...] | None:
    """The API server's endpoint addresses; None when they cannot be read."""
    found = await _read("the API server's endpoints (EndpointSlice default/kubernetes)", kube.api_server_endpoints)
    return None if found is None else tuple(a for a in map(endpoints.ip_literal, found) if a is not None)


async def reported_networks(kube: k8s.Kube) -> tuple[endpoints.Network, ...] | None:
    """The Service ranges and the nodes' pod ranges and addresses; None when the nodes cannot be read
    (an API server older than ServiceCIDR, 1.33, still gives the nodes)."""
    nodes = await _read("the nodes' pod ranges and addresses", kube.node_networks)
    if nodes is None:
        return None
    services = await _read("the Service ranges (ServiceCIDR objects)", kube.service_cidrs) or ()
    return endpoints.reported_networks((*services, *nodes))


def warning(cfg: OperatorConfig) -> str | None:
    """What to tell the platform team when no clusterNetworks are configured and none are discovered (the
    chart's default): the S3 egress then reaches, inside the cluster, every pod without a NetworkPolicy."""
    if cfg.clusterNetworks or cfg.discoverClusterNetworks:
        return None
    return (f"config.clusterNetworks is empty: trainer pods may connect to {', '.join(cfg.s3Egress.cidrs)} on port(s) "
            f"{', '.join(map(str, cfg.s3Egress.ports))} with only the cloud metadata ranges and the API server "
            "excepted, which inside the cluster reaches every pod listening there without a NetworkPolicy of its own; "
            "set it to the cluster's pod, Service and node CIDRs, set discoverClusterNetworks, or narrow "
            "s3Egress.cidrs to the S3 service")


@dataclass
class ClusterNetworks:
    """What is known of the cluster's addresses, and the configuration that excepts them."""

    cfg: OperatorConfig
    api_server: tuple[endpoints.Address, ...] = ()
    reported: tuple[endpoints.Network, ...] = ()

    def excepting(self) -> OperatorConfig:
        return endpoints.excepting_cluster(self.cfg, endpoints.api_server_addresses() + self.api_server,
                                           self.reported)

    async def read(self, kube: k8s.Kube) -> bool:
        """Read the cluster again; True when what is known changed."""
        before = (self.api_server, self.reported)
        found = await api_server_endpoints(kube)
        if found:
            self.api_server = found
        if self.cfg.discoverClusterNetworks:
            reported = await reported_networks(kube)
            if reported:
                self.reported = reported
        return (self.api_server, self.reported) != before

    def describe(self) -> str:
        parts = [f"the API server ({', '.join(map(str, self.api_server)) or 'no endpoint found yet'})"]
        if self.cfg.discoverClusterNetworks:
            parts.append(f"the ranges the cluster reports ({', '.join(map(str, self.reported)) or 'none read yet'})")
        return " and ".join(parts)


async def refresh(reconciler: Reconciler, known: ClusterNetworks) -> bool:
    """Read the cluster again and give the reconciler the configuration excepting it; True when it changed."""
    if not await known.read(reconciler.kube):
        return False
    current = known.excepting()
    if current.clusterNetworks == reconciler.cfg.clusterNetworks:
        return False
    log.warning("the cluster's addresses changed; now excepted from every sandbox's S3 egress: %s", known.describe())
    reconciler.cfg = current
    return True


async def follow(reconciler: Reconciler, known: ClusterNetworks) -> None:
    """Read the cluster every apiServerRefreshSeconds, for as long as the operator runs."""
    while True:
        await asyncio.sleep(known.cfg.apiServerRefreshSeconds)
        try:
            await refresh(reconciler, known)
        except Exception:  # noqa: BLE001 - the loop outlives any one failed read
            log.exception("refreshing the cluster's addresses failed")
