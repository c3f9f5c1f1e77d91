"""S3 endpoints are policy, not free text: which `spec.storage.endpoint` a tenant may name.

An endpoint is an origin (`http(s)://host[:port]`, nothing else) that the platform allowed:
OperatorConfig.s3Endpoint, or an entry of OperatorConfig.allowedS3Endpoints (an exact origin, or
`https://*.example.com` for every subdomain). Whatever the allow-list says, an endpoint never
reaches an address where a tenant has no business: link-local and cloud metadata addresses,
loopback, unspecified and multicast addresses; and, unless the platform named that exact origin,
not the cluster's own ranges (OperatorConfig.clusterNetworks) or the API server. The host is
checked as written and again as DNS resolves it (the reconcile resolves, `check_endpoint` judges).
The endpoint's port must be one of the S3 egress ports, so it never widens the sandbox's egress.

Each refusal is a Problem with a reason of its own (see REASONS).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from finetune_operator.config import OperatorConfig

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The cloud metadata ranges: instance metadata (AWS, GCP, Azure, Oracle and others at 169.254.169.254,
# AWS IPv6 fd00:ec2::254, GCP IPv6 fd20:ce::254, Alibaba 100.100.100.200), Azure's WireServer
# 168.63.129.16 (the VM agent's channel to the platform) and all link-local. Excepted from every
# ipBlock of a sandbox's egress.
METADATA_NETWORKS: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "100.100.100.200/32", "168.63.129.16/32", "fd00:ec2::254/128", "fd20:ce::254/128",
    "fe80::/10",
))
# Never a tenant's S3: the metadata ranges, loopback, unspecified and multicast.
NEVER_NETWORKS: tuple[Network, ...] = METADATA_NETWORKS + tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "0.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32", "::1/128", "::/128", "ff00::/8",
))
SCHEMES = {"http": 80, "https": 443}

REASONS = {
    "EndpointInvalid": "not an http(s) URL with a host",
    "EndpointScheme": "the scheme is not http or https",
    "EndpointUserinfo": "the URL carries a user name or password",
    "EndpointPath": "the URL has a path, query or fragment (an endpoint is an origin)",
    "EndpointPortNotAllowed": "the port is not one of the sandbox's S3 egress ports",
    "EndpointNotAllowed": "the origin is not in the operator's allowed S3 endpoints",
    "EndpointAddressBlocked": "the host is or resolves to an address no tenant endpoint may reach",
    "EndpointUnresolvable": "the host does not resolve",
}


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str  # lower case; an IPv6 literal without brackets
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class EndpointProblem:
    reason: str
    message: str


def parse_origin(url: str) -> Origin | EndpointProblem:
    """The endpoint as an origin, or the first structural problem."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        return EndpointProblem("EndpointInvalid", f"{url!r} is not a URL: {exc}")
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        return EndpointProblem("EndpointScheme", f"scheme {parts.scheme!r} is not http or https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return EndpointProblem("EndpointUserinfo", "an endpoint may not carry a user name or password")
    if not host:
        return EndpointProblem("EndpointInvalid", f"{url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return EndpointProblem("EndpointPath", "an endpoint is scheme://host[:port], without path, query or fragment")
    return Origin(scheme, host.lower().rstrip("."), port or SCHEMES[scheme])


def ip_literal(host: str) -> Address | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _matches(origin: Origin, allowed: Origin) -> bool:
    if (origin.scheme, origin.port) != (allowed.scheme, allowed.port):
        return False
    if allowed.host.startswith("*."):
        return origin.host.endswith(allowed.host[1:]) and origin.host != allowed.host[2:]
    return origin.host == allowed.host


def parse_allowed(url: str) -> Origin | EndpointProblem:
    """An allow-list entry: an origin whose host may start with `*.` (any subdomain)."""
    wildcard = "://*." in url
    parsed = parse_origin(url.replace("://*.", "://", 1))
    if isinstance(parsed, EndpointProblem) or not wildcard:
        return parsed
    return Origin(parsed.scheme, "*." + parsed.host, parsed.port)


def allowed_origins(cfg: OperatorConfig) -> list[Origin]:
    entries = ([cfg.s3Endpoint] if cfg.s3Endpoint else []) + list(cfg.allowedS3Endpoints)
    return [o for o in map(parse_allowed, entries) if isinstance(o, Origin)]


def _in(address: Address, networks) -> Network | None:
    return next((n for n in networks if address.version == n.version and address in n), None)


def blocked_networks(cfg: OperatorConfig, api_server: tuple[Address, ...] = ()) -> tuple[Network, ...]:
    """Where a tenant endpoint may not lead unless the platform named its exact origin."""
    cluster = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.clusterNetworks)
    return cluster + tuple(ipaddress.ip_network(a) for a in api_server)


def needs_resolution(url: str, cfg: OperatorConfig) -> str | None:
    """The host to resolve before `check_endpoint` can judge `url`: only a name that a wildcard entry
    allowed (the operator resolves no name a tenant made up, and an exact entry is the platform's)."""
    origin = parse_origin(url)
    if isinstance(origin, EndpointProblem) or ip_literal(origin.host) is not None:
        return None
    match = next((a for a in allowed_origins(cfg) if _matches(origin, a)), None)
    return origin.host if match is not None and match.host.startswith("*.") else None


def check_endpoint(url: str, cfg: OperatorConfig, resolved: tuple[Address, ...] | None = None,
                   api_server: tuple[Address, ...] = (), *, unanswered: bool = False) -> list[EndpointProblem]:
    """Problems of a tenant's `spec.storage.endpoint` (the empty endpoint is the configured one).

    `resolved`: the addresses the host resolved to (None: not asked yet, so only the written form is
    judged; an empty tuple: it did not resolve). `unanswered`: it was asked and gave no answer in
    time, which is no pass (a transient problem: asked again on the next pass)."""
    if not url:
        return []
    origin = parse_origin(url)
    if isinstance(origin, EndpointProblem):
        return [origin]
    problems = []
    if origin.port not in cfg.s3Egress.ports:
        problems.append(EndpointProblem(
            "EndpointPortNotAllowed",
            f"port {origin.port} is not one of the S3 egress ports {sorted(cfg.s3Egress.ports)}"))
    allowed = allowed_origins(cfg)
    match = next((a for a in allowed if _matches(origin, a)), None)
    if match is None:
        problems.append(EndpointProblem(
            "EndpointNotAllowed",
            f"{origin} is not an allowed S3 endpoint (allowed: {', '.join(map(str, allowed)) or 'none'})"))
    if problems:
        return problems
    literal = ip_literal(origin.host)
    wildcard = match.host.startswith("*.")
    addresses = (literal,) if literal is not None else (resolved if wildcard else ())
    if addresses is None:
        if unanswered:
            return [EndpointProblem("EndpointUnresolvable", f"{origin.host} gave no DNS answer in time; asked again "
                                                            "on the next pass")]
        return problems  # not asked yet: the reconcile resolves it before any request goes there
    if wildcard and literal is None and not addresses:
        return [EndpointProblem("EndpointUnresolvable", f"{origin.host} does not resolve")]
    forbidden = NEVER_NETWORKS if not wildcard else NEVER_NETWORKS + blocked_networks(cfg, api_server)
    for address in addresses:
        network = _in(ip_literal(str(address)) or address, forbidden)
        if network is not None:
            # The message names the rule, not the address: the operator is no DNS oracle.
            return [EndpointProblem(
                "EndpointAddressBlocked",
                f"{origin.host} {'is' if literal is not None else 'resolves to'} an address where no tenant "
                "endpoint may lead (cloud metadata, link-local, loopback, the API server or the cluster's own "
                "ranges)")]
    return problems


def resolve(host: str) -> tuple[Address, ...]:
    """Every address `host` resolves to (empty when it does not); blocking, for the I/O executor."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        return ()
    addresses = []
    for info in infos:
        address = ip_literal(str(info[4][0]).split("%", 1)[0])
        if address is not None and address not in addresses:
            addresses.append(address)
    return tuple(addresses)


def excepting_cluster(cfg: OperatorConfig, api_server: tuple[Address, ...],
                      discovered: tuple[Network, ...] = ()) -> OperatorConfig:
    """The configuration with the API server's addresses, and the ranges the cluster reports of itself
    (`reported_networks`, where discoverClusterNetworks is on), among the cluster's own ranges: excepted
    from every S3 ipBlock of a sandbox's egress (a default of 0.0.0.0/0 on port 443 would otherwise reach
    an API server that listens on 443), and never where a wildcard endpoint may lead."""
    extra = [str(ipaddress.ip_network(a)) for a in api_server] + [str(n) for n in discovered]
    merged = list(dict.fromkeys([*cfg.clusterNetworks, *extra]))
    return cfg.model_copy(update={"clusterNetworks": merged})


def reported_networks(reported: Iterable[str]) -> tuple[Network, ...]:
    """Ranges and addresses the cluster reports of itself (ServiceCIDRs, nodes' pod ranges and addresses)
    as networks: what is no address or range is skipped, a default route is never one (it would except
    all of S3), and neighbours merge (the /24s of a node pool become one range)."""
    networks: list[Network] = []
    for text in reported:
        try:
            network = ipaddress.ip_network(str(text).strip(), strict=False)
        except ValueError:
            continue
        if network.prefixlen > 0:
            networks.append(network)
    return tuple(n for version in (4, 6)
                 for n in ipaddress.collapse_addresses(n for n in networks if n.version == version))


def api_server_addresses(env: dict[str, str] | None = None) -> tuple[Address, ...]:
    """The API server as pods reach it (KUBERNETES_SERVICE_HOST): never a tenant endpoint."""
    env = dict(os.environ) if env is None else env
    address = ip_literal(env.get("KUBERNETES_SERVICE_HOST", ""))
    return (address,) if address is not None else ()
