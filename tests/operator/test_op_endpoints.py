"""S3 endpoints are policy: the endpoint table (what a tenant may name, what is refused and why)."""

from __future__ import annotations

import ipaddress

import pytest

from finetune_operator import endpoints
from finetune_operator.config import OperatorConfig

CFG = OperatorConfig.model_validate({
    "trainerImage": "registry.example.com/ml/trainer:1",
    "nodePools": {"gpu": {}}, "defaultNodePool": "gpu",
    "s3Endpoint": "http://minio.storage.svc:9000",
    "allowedS3Endpoints": ["https://s3.eu-west-1.amazonaws.com", "https://*.objects.example.com",
                           "http://10.0.5.7:9000"],
    "s3Egress": {"cidrs": ["0.0.0.0/0"], "ports": [443, 9000]},
    "clusterNetworks": ["10.244.0.0/16", "10.96.0.0/12"],
})
API_SERVER = (ipaddress.ip_address("10.96.0.1"),)


def ips(*addresses: str):
    return tuple(ipaddress.ip_address(a) for a in addresses)


CASES = [
    # (what, endpoint, resolved addresses (None: not asked yet; NO_ANSWER: asked, no answer in time), expected reasons)
    ("empty: the configured endpoint", "", None, []),
    ("the configured endpoint by name", "http://minio.storage.svc:9000", None, []),
    ("an allowed origin", "https://s3.eu-west-1.amazonaws.com", None, []),
    ("an allowed origin, trailing slash", "https://s3.eu-west-1.amazonaws.com/", None, []),
    ("an allowed origin with the default port written", "https://s3.eu-west-1.amazonaws.com:443", None, []),
    ("an allowed IP literal", "http://10.0.5.7:9000", None, []),
    ("a subdomain of a wildcard, public address", "https://team-a.objects.example.com", ips("203.0.113.10"), []),
    ("a subdomain of a wildcard, not resolved yet", "https://team-a.objects.example.com", None, []),
    ("a subdomain of a wildcard whose DNS gave no answer in time", "https://team-a.objects.example.com", "NO_ANSWER",
     ["EndpointUnresolvable"]),
    ("the wildcard's own domain", "https://objects.example.com", None, ["EndpointNotAllowed"]),
    ("a subdomain resolving into the pod network", "https://x.objects.example.com", ips("10.244.3.4"),
     ["EndpointAddressBlocked"]),
    ("a subdomain resolving to the API server", "https://x.objects.example.com", ips("10.96.0.1"),
     ["EndpointAddressBlocked"]),
    ("a subdomain resolving to the metadata service", "https://x.objects.example.com", ips("169.254.169.254"),
     ["EndpointAddressBlocked"]),
    ("a subdomain resolving to loopback (one of two)", "https://x.objects.example.com",
     ips("203.0.113.10", "127.0.0.1"), ["EndpointAddressBlocked"]),
    ("a subdomain resolving to AWS's IPv6 metadata", "https://x.objects.example.com", ips("fd00:ec2::254"),
     ["EndpointAddressBlocked"]),
    ("a subdomain resolving to GCP's IPv6 metadata", "https://x.objects.example.com", ips("fd20:ce::254"),
     ["EndpointAddressBlocked"]),
    ("a subdomain resolving to Azure's WireServer", "https://x.objects.example.com", ips("168.63.129.16"),
     ["EndpointAddressBlocked"]),
    ("a subdomain resolving to an IPv4-mapped metadata address", "https://x.objects.example.com",
     ips("::ffff:169.254.169.254"), ["EndpointAddressBlocked"]),
    ("a subdomain that does not resolve", "https://x.objects.example.com", (), ["EndpointUnresolvable"]),
    ("another host", "https://s3.evil.example.com", None, ["EndpointNotAllowed"]),
    ("an allowed host on another port", "https://s3.eu-west-1.amazonaws.com:8443", None,
     ["EndpointPortNotAllowed", "EndpointNotAllowed"]),
    ("an allowed host with the other scheme", "http://s3.eu-west-1.amazonaws.com:443", None, ["EndpointNotAllowed"]),
    ("the metadata service", "http://169.254.169.254", None, ["EndpointPortNotAllowed", "EndpointNotAllowed"]),
    ("the metadata service on an allowed port", "http://169.254.169.254:9000", None, ["EndpointNotAllowed"]),
    ("AWS's IPv6 metadata service", "http://[fd00:ec2::254]:9000", None, ["EndpointNotAllowed"]),
    ("loopback", "http://127.0.0.1:9000", None, ["EndpointNotAllowed"]),
    ("userinfo", "https://user:pw@s3.eu-west-1.amazonaws.com", None, ["EndpointUserinfo"]),
    ("userinfo hiding the host", "https://s3.eu-west-1.amazonaws.com@169.254.169.254", None, ["EndpointUserinfo"]),
    ("a path", "https://s3.eu-west-1.amazonaws.com/latest/meta-data", None, ["EndpointPath"]),
    ("a query", "https://s3.eu-west-1.amazonaws.com?x=1", None, ["EndpointPath"]),
    ("a fragment", "https://s3.eu-west-1.amazonaws.com#x", None, ["EndpointPath"]),
    ("file scheme", "file:///etc/passwd", None, ["EndpointScheme"]),
    ("gopher scheme", "gopher://s3.eu-west-1.amazonaws.com", None, ["EndpointScheme"]),
    ("no scheme", "s3.eu-west-1.amazonaws.com", None, ["EndpointScheme"]),
    ("no host", "https://", None, ["EndpointInvalid"]),
    ("a port out of range", "https://s3.eu-west-1.amazonaws.com:99999", None, ["EndpointInvalid"]),
    ("upper case, trailing dot", "HTTPS://S3.EU-WEST-1.AMAZONAWS.COM.", None, []),
]


@pytest.mark.parametrize("what, url, resolved, expected", CASES, ids=[c[0] for c in CASES])
def test_endpoint_policy(what, url, resolved, expected):
    unanswered = resolved == "NO_ANSWER"
    problems = endpoints.check_endpoint(url, CFG, None if unanswered else resolved, API_SERVER, unanswered=unanswered)
    assert [p.reason for p in problems] == expected, problems
    for problem in problems:
        assert problem.reason in endpoints.REASONS and problem.message


def test_a_blocked_address_is_not_named_in_the_message():
    (problem,) = endpoints.check_endpoint("https://x.objects.example.com", CFG, ips("10.244.3.4"), API_SERVER)
    assert "10.244.3.4" not in problem.message and "10.244.0.0/16" not in problem.message


@pytest.mark.parametrize("url, host", [
    ("https://x.objects.example.com", "x.objects.example.com"),   # a wildcard entry: resolved and checked
    ("https://s3.eu-west-1.amazonaws.com", None),                 # an exact entry: the platform's own
    ("https://attacker.example.net", None),                       # not allowed: never resolved
    ("http://169.254.169.254:9000", None),                        # a literal
])
def test_only_names_a_wildcard_allowed_are_resolved(url, host):
    assert endpoints.needs_resolution(url, CFG) == host


def test_the_api_server_address_comes_from_the_pod_environment():
    assert endpoints.api_server_addresses({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}) == ips("10.96.0.1")
    assert endpoints.api_server_addresses({}) == ()


@pytest.mark.parametrize("entry", ["ftp://x", "https://user@x", "https://x/path", "nonsense"])
def test_a_bad_allow_list_entry_is_a_configuration_error(entry):
    with pytest.raises(ValueError, match="allowedS3Endpoints"):
        OperatorConfig.model_validate({**CFG.model_dump(), "allowedS3Endpoints": [entry]})


def test_egress_cidrs_inside_the_metadata_range_are_a_configuration_error():
    with pytest.raises(ValueError, match="metadata"):
        OperatorConfig.model_validate({**CFG.model_dump(), "s3Egress": {"cidrs": ["169.254.169.0/24"], "ports": [443]}})
