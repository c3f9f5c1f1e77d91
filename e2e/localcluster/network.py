"""The real node's network on this machine: a bridge for the pods, the sysctls and a firewall that
keeps every packet of the pod network on the machine.

Pods are attached to the bridge `ftobr0` by the CNI bridge plugin. The bridge's address is the
node's InternalIP and the address where host services that pods use (the API server, S3,
Prometheus, the kubelet) listen; the host reaches them there too. Pods get two routes, their own
subnet (on the bridge) and the Service range via the bridge's address, and no default route; nothing
is masqueraded. On top of that the chain FTO-ISOLATE drops anything that would leave the pod network
through another interface, or enter it from one, so no pod can reach beyond this machine even if
it found a route; its IPv6 twin drops all IPv6 of the bridge (the pod network is IPv4 only, and
IPv6 link-local addresses would bypass the IPv4 NetworkPolicies).

Like a cloud node, the node routes pods to the cloud metadata addresses: they belong to a network
namespace of their own (`fto-metadata`, joined to the host by a veth), reached through a routing
table that only pod traffic uses, so the host's own metadata service (on a cloud VM) stays the
host's. Nothing listens there unless a test does: it shows that a sandbox's NetworkPolicies, not a
missing route, keep its pods from the metadata service.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

BRIDGE = "ftobr0"
CLUSTER_CIDR = "10.244.0.0/16"
NODE_POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"                 # the bridge's address: InternalIP of node-0, host services
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
# KWOK's simulated pods get addresses from a range of their own, never one of the real node's.
SIMULATED_POD_CIDR = "10.250.0.0/16"
# The API server's NodePort range (kube-router lets node ports through before any policy): kept
# narrow and below the ephemeral range where the host services' free ports come from.
NODE_PORT_RANGE = "30000-30099"
ISOLATION_CHAIN = "FTO-ISOLATE"
CNI_NETWORK = "finetune-local"
# The metadata stand-in: AWS/GCP/Azure/Oracle's and Alibaba's instance metadata addresses.
METADATA_ADDRESSES = ("169.254.169.254", "100.100.100.200")
METADATA_NETNS = "fto-metadata"
METADATA_LINK = "ftometa0"             # the host's end of the veth; the namespace's end is eth0
METADATA_ROUTE_TABLE = "4242"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def _delete_all(*argv: str) -> None:
    """Run a deleting command until nothing is left for it to delete (a rule added more than once)."""
    while _run(*argv, check=False).returncode == 0:
        pass


def metadata_rules() -> list[tuple[str, ...]]:
    """The `ip rule` selectors that send pod traffic for the metadata addresses to their table."""
    return [("from", CLUSTER_CIDR, "to", f"{a}/32", "lookup", METADATA_ROUTE_TABLE) for a in METADATA_ADDRESSES]


def isolation_rules() -> list[list[str]]:
    """Rules of FTO-ISOLATE (iptables arguments after `-A FTO-ISOLATE`), a pure function."""
    return [
        *(["-s", CLUSTER_CIDR, "-d", address, "-o", METADATA_LINK, "-m", "comment", "--comment",
           "the metadata stand-in, on this machine", "-j", "RETURN"] for address in METADATA_ADDRESSES),
        *(["-s", address, "-d", CLUSTER_CIDR, "-i", METADATA_LINK, "-m", "comment", "--comment",
           "the metadata stand-in's replies", "-j", "RETURN"] for address in METADATA_ADDRESSES),
        ["-s", CLUSTER_CIDR, "!", "-o", BRIDGE, "-m", "comment", "--comment",
         "pod traffic stays on this machine", "-j", "DROP"],
        ["-d", CLUSTER_CIDR, "!", "-i", BRIDGE, "-m", "comment", "--comment",
         "nothing from outside reaches the pods", "-j", "DROP"],
    ]


def ipv6_isolation_rules() -> list[list[str]]:
    """Rules of FTO-ISOLATE in ip6tables, a pure function. The pod network is IPv4 only, but the
    kernel gives every pod interface (and the bridge) an IPv6 link-local address: without these,
    pods would reach each other and the host's services over fe80:: with no NetworkPolicy applied
    (kube-router enforces the IPv4 policies only)."""
    return [
        ["-i", BRIDGE, "-m", "comment", "--comment", "no IPv6 from the pods", "-j", "DROP"],
        ["-o", BRIDGE, "-m", "comment", "--comment", "no IPv6 to the pods", "-j", "DROP"],
    ]


def cni_config(ipam_dir: Path) -> dict:
    """The CNI network of node-0 (bridge + host-local IPAM; containerd adds loopback), a pure function."""
    subnet = ipaddress.ip_network(NODE_POD_CIDR)
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,       # the bridge holds NODE_IP, the pods' only gateway
                "isDefaultGateway": False,
                "ipMasq": False,
                "hairpinMode": True,     # a pod reaching itself through its Service
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"subnet": str(subnet), "gateway": NODE_IP,
                                 "rangeStart": str(subnet.network_address + 10),
                                 "rangeEnd": str(subnet.broadcast_address - 1)}]],
                    # No default route: the Service range and the metadata addresses through the
                    # node, the subnet on the bridge.
                    "routes": [{"dst": SERVICE_CIDR}, *({"dst": f"{a}/32"} for a in METADATA_ADDRESSES)],
                },
            },
        ],
    }


class HostNetwork:
    def __init__(self, cni_conf_dir: Path, ipam_dir: Path):
        self.cni_conf_dir = cni_conf_dir
        self.ipam_dir = ipam_dir

    def setup(self) -> None:
        if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            _run("ip", "link", "add", BRIDGE, "type", "bridge")
        addresses = _run("ip", "-o", "-4", "addr", "show", "dev", BRIDGE).stdout
        if f" {NODE_IP}/" not in addresses:
            _run("ip", "addr", "add", f"{NODE_IP}/{NODE_POD_CIDR.split('/')[1]}", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for key, value in {
            f"net/ipv6/conf/{BRIDGE}/disable_ipv6": "1",  # no link-local address of the host on the pod network
            "net/ipv4/ip_forward": "1",               # Service traffic DNATed back to a pod
            "net/bridge/bridge-nf-call-iptables": "1",  # policy on traffic between pods of the bridge
            "net/bridge/bridge-nf-call-ip6tables": "1",
        }.items():
            Path("/proc/sys", key).write_text(value)
        self._isolate()
        self._metadata_stand_in()
        self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        self.ipam_dir.mkdir(parents=True, exist_ok=True)
        (self.cni_conf_dir / f"10-{CNI_NETWORK}.conflist").write_text(json.dumps(cni_config(self.ipam_dir), indent=2))

    # (tool, rules, the built-in chains that jump to FTO-ISOLATE first, before kube-proxy's and
    # kube-router's chains can accept anything)
    FIREWALLS = (("iptables", isolation_rules, ("FORWARD",)), ("ip6tables", ipv6_isolation_rules, ("FORWARD", "INPUT")))

    def _isolate(self) -> None:
        for tool, rules, hooks in self.FIREWALLS:
            if _run(tool, "-w", "-n", "-L", ISOLATION_CHAIN, check=False).returncode != 0:
                _run(tool, "-w", "-N", ISOLATION_CHAIN)
            _run(tool, "-w", "-F", ISOLATION_CHAIN)
            for rule in rules():
                _run(tool, "-w", "-A", ISOLATION_CHAIN, *rule)
            for hook in hooks:
                _delete_all(tool, "-w", "-D", hook, "-j", ISOLATION_CHAIN)
                _run(tool, "-w", "-I", hook, "1", "-j", ISOLATION_CHAIN)

    def _metadata_stand_in(self) -> None:
        """The namespace holding the metadata addresses and the way there from the pods only."""
        if METADATA_NETNS not in _run("ip", "netns", "list").stdout.split():
            _run("ip", "netns", "add", METADATA_NETNS)
        inside = ("ip", "netns", "exec", METADATA_NETNS)
        if _run("ip", "link", "show", METADATA_LINK, check=False).returncode != 0:
            _run("ip", "link", "add", METADATA_LINK, "type", "veth", "peer", "name", "eth0", "netns", METADATA_NETNS)
        # The host answers the namespace's ARP for pod addresses (the veth has no addresses of its own).
        Path(f"/proc/sys/net/ipv4/conf/{METADATA_LINK}/proxy_arp").write_text("1")
        _run("ip", "link", "set", METADATA_LINK, "up")
        have = _run(*inside, "ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
        for address in METADATA_ADDRESSES:
            if f" {address}/" not in have:
                _run(*inside, "ip", "addr", "add", f"{address}/32", "dev", "eth0")
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "link", "set", "eth0", "up")
        _run(*inside, "ip", "route", "replace", CLUSTER_CIDR, "dev", "eth0")
        for address in METADATA_ADDRESSES:
            _run("ip", "route", "replace", f"{address}/32", "dev", METADATA_LINK, "table", METADATA_ROUTE_TABLE)
        for rule in metadata_rules():
            _delete_all("ip", "rule", "del", *rule)
            _run("ip", "rule", "add", *rule)

    def teardown(self) -> None:
        for rule in metadata_rules():
            _delete_all("ip", "rule", "del", *rule)
        _run("ip", "link", "del", METADATA_LINK, check=False)
        _run("ip", "netns", "del", METADATA_NETNS, check=False)
        for tool, _, hooks in self.FIREWALLS:
            for hook in hooks:
                _delete_all(tool, "-w", "-D", hook, "-j", ISOLATION_CHAIN)
            _run(tool, "-w", "-F", ISOLATION_CHAIN, check=False)
            _run(tool, "-w", "-X", ISOLATION_CHAIN, check=False)
        _run("ip", "link", "del", BRIDGE, check=False)
