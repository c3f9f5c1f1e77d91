"""Hostile tenants on the real cluster, against the operator installed by its chart: their storage
does not stall anyone else, their endpoints are refused by name, their names cannot collide with
another tenant's, a pass delayed at the worst moment adopts nothing, a stripped finalizer leaves no
sandbox behind, Secrets are copied only with their owner's consent and follow it, 1,000 generated
specs never crash the operator, and no credential reaches its logs."""

from __future__ import annotations

import ipaddress
import json
import random
import re
import string
import time
import uuid

import pytest

from bench import hostile_tenants as bench
from e2e.localcluster import network
from e2e.localcluster import s3 as local_s3
from e2e.localcluster.hostile_s3 import HostileS3
from e2e.tests.test_control_plane import _wait_for
from e2e.tests.test_operator_cluster import (
    credentials,
    ftj,
    get_or_none,
    is_true,
    job_uid,
    kube_calls,
    owned_namespaces,
    sandbox_of,
    status_of,
    wait_status,
)
from finetune_operator.builders import names as n
from finetune_operator.config import OperatorConfig

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cfg(operator) -> OperatorConfig:
    return OperatorConfig.model_validate(operator.config())


def validated(kube, namespace: str, name: str, timeout: float = 90) -> dict:
    """The Validated condition once it has a verdict (True, or False with a reason)."""
    def verdict():
        cond = next((c for c in status_of(kube, namespace, name).get("conditions") or []
                     if c["type"] == "Validated"), None)
        return cond if cond and cond["status"] in ("True", "False") else None
    return _wait_for(verdict, timeout, f"{namespace}/{name} validated", interval=1)


def operator_restarts(operator) -> int:
    return bench.operator_restarts(operator)


# ---- tenant storage never stalls the operator -----------------------------------------------------

@pytest.mark.quiet
@pytest.mark.parametrize("tenants", [1, 10])  # 10 tenants of 2 threads each filled the pool of 16 before
def test_hostile_endpoints_cost_their_tenant_only(local_cluster, operator, tenants):
    results = bench.measure(local_cluster, operator, jobs=50, samples=2, settle_seconds=15, tenants=tenants)
    print(bench.report([results]))
    baseline = max(max(results["before"]), 1.0)
    assert max(results["during"]) <= 2 * baseline, results
    assert results["memory"] < bench.CHART_MEMORY_LIMIT, results
    assert results["restarts"] == 0 and results["hostile_requests"] > 0, results


# ---- endpoints are policy -------------------------------------------------------------------------

# {port}: the local S3's port, one of the allowed egress ports (so the port is not the reason).
ENDPOINT_CASES = [
    ("http://169.254.169.254:{port}", "EndpointNotAllowed"),
    ("http://[fd00:ec2::254]:{port}", "EndpointNotAllowed"),
    ("http://127.0.0.1:{port}", "EndpointNotAllowed"),
    ("http://kubernetes.default.svc:{port}", "EndpointNotAllowed"),
    ("http://10.244.0.1:22", "EndpointPortNotAllowed"),
    ("http://user:pass@10.244.0.1:{port}", "EndpointUserinfo"),
    ("gopher://10.244.0.1:{port}", "EndpointScheme"),
    ("http://10.244.0.1:{port}/latest/meta-data", "EndpointPath"),
]


@pytest.mark.parametrize("endpoint, reason", ENDPOINT_CASES, ids=[c[0] for c in ENDPOINT_CASES])
def test_a_hostile_endpoint_is_refused_by_name_and_nothing_is_created(kube, local_cluster, operator, cfg, namespace,
                                                                     endpoint, reason):
    job = ftj("endpoint", storage={"endpoint": endpoint.format(port=local_cluster.state.ports["s3"])})
    applied = kube.apply(credentials(), job, namespace=namespace, check=False)
    if applied.returncode != 0:  # the schema refused it already (a URL the CRD's rules reject)
        assert "storage.endpoint" in applied.stderr
        return
    cond = validated(kube, namespace, "endpoint")
    assert cond["status"] == "False" and cond["reason"] == reason, cond
    assert "spec.storage.endpoint" in cond["message"]
    assert owned_namespaces(kube, job_uid(kube, namespace, "endpoint")) == []


def bait_service(namespace: str, port: int, target: HostileS3) -> list[dict]:
    """A Service `bait` on the S3 port whose only endpoint is the hostile server on the host: a name
    under the local operator's wildcard (*.svc.cluster.local) that resolves into the cluster's own
    ranges, the way a tenant's own DNS name may lead to an internal address."""
    host, target_port = target.server.server_address[:2]
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bait", "namespace": namespace},
         "spec": {"ports": [{"name": "s3", "port": port, "targetPort": target_port, "protocol": "TCP"}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "bait-host", "namespace": namespace, "labels": {"kubernetes.io/service-name": "bait"}},
         "addressType": "IPv4", "endpoints": [{"addresses": [host]}],
         "ports": [{"name": "s3", "port": target_port, "protocol": "TCP"}]},
    ]


def test_a_wildcard_endpoint_is_judged_by_where_it_resolves_before_any_request(kube, local_cluster, operator,
                                                                               namespace):
    """The allow-list admits every *.svc.cluster.local name on the S3 port; what the name resolves to
    is judged before the operator sends it anything: a name leading to a cluster address is refused
    and the server behind it never hears from the operator; a name that does not resolve waits."""
    port = local_cluster.state.ports["s3"]
    with HostileS3(host=network.NODE_IP) as server:
        kube.apply(*bait_service(namespace, port, server), namespace=namespace)
        bait = ftj("bait", storage={"endpoint": f"http://bait.{namespace}.svc.cluster.local:{port}"})
        absent = ftj("absent", storage={"endpoint": f"http://absent.{namespace}.svc.cluster.local:{port}"})
        kube.apply(credentials(), bait, absent, namespace=namespace)
        cond = validated(kube, namespace, "bait")
        assert cond["status"] == "False" and cond["reason"] == "EndpointAddressBlocked", cond
        assert not re.search(r"\d+\.\d+\.\d+\.\d+", cond["message"]), cond  # no DNS oracle: no address named

        def waiting():
            conds = status_of(kube, namespace, "absent").get("conditions") or []
            return next((c for c in conds if c["type"] == "Validated" and c.get("reason") == "EndpointUnresolvable"),
                        None)
        cond = _wait_for(waiting, 90, "the unresolvable endpoint to be reported", interval=1)
        assert cond["status"] == "Unknown", cond
        time.sleep(5)  # a few more passes of both jobs
        assert server.requests == [], server.requests
        for name in ("bait", "absent"):
            assert owned_namespaces(kube, job_uid(kube, namespace, name)) == []


# ---- sandbox identity -----------------------------------------------------------------------------

def test_tenants_whose_names_join_alike_run_in_separate_sandboxes(kube, operator, cfg):
    suffix = uuid.uuid4().hex[:5]
    pairs = [(f"t-x{suffix}-b", "c"), (f"t-x{suffix}", "b-c")]  # both read "ftj-t-x...-b-c"
    try:
        for tenant, name in pairs:
            kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": tenant,
                                                                              "labels": {"finetune.dev/test": "true"}}})
            kube.apply(credentials(), ftj(name, runPolicy={"suspend": True}), namespace=tenant)
        sandboxes = []
        for tenant, name in pairs:
            status = wait_status(kube, tenant, name, lambda s: is_true(s, "SandboxReady"), "SandboxReady")
            sandboxes.append(status["sandboxNamespace"])
            assert status["sandboxNamespace"] == sandbox_of(kube, cfg, tenant, name)
        assert sandboxes[0] != sandboxes[1]
        for (tenant, name), sandbox in zip(pairs, sandboxes):
            labels = kube.get("namespace", sandbox)["metadata"]["labels"]
            assert labels[n.LABEL_TENANT] == tenant and labels[n.LABEL_JOB_UID] == job_uid(kube, tenant, name)
    finally:
        for tenant, _ in pairs:
            kube.run("delete", "namespace", tenant, "--wait=false", check=False)


def test_a_delete_whose_uid_names_another_object_removes_nothing(kube, local_cluster):
    """Deletes of sandboxes carry the namespace's uid: a namespace of the same name that is another
    object now (deleted and made again by someone else) is left alone."""
    from finetune_operator import k8s

    name = f"t-uid-{uuid.uuid4().hex[:8]}"
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"finetune.dev/test": "true"}}})
    uid = kube.get("namespace", name)["metadata"]["uid"]
    other = str(uuid.uuid4())
    assert kube_calls(local_cluster, lambda api: api.delete(k8s.Namespace, name, uid=other)) is False
    assert kube.get("namespace", name)["metadata"]["uid"] == uid and "deletionTimestamp" not in kube.get(
        "namespace", name)["metadata"]
    assert kube_calls(local_cluster, lambda api: api.delete(k8s.Namespace, name, uid=uid)) is True
    assert kube_calls(local_cluster, lambda api: api.delete(k8s.Namespace, f"{name}-absent", uid=uid)) is False


def test_the_operator_reads_the_api_servers_addresses(local_cluster):
    """What the operator excepts from every sandbox's S3 egress: the API server's own endpoint."""
    assert kube_calls(local_cluster, lambda api: api.api_server_endpoints()) == (network.NODE_IP,)


def test_the_operator_reads_what_the_cluster_reports_of_itself(local_cluster):
    """discoverClusterNetworks: the Service range (the ServiceCIDR the API server made of its flag) and the
    real node's pod range and address, as the operator's client reads them."""
    assert network.SERVICE_CIDR in kube_calls(local_cluster, lambda api: api.service_cidrs())
    assert {network.NODE_POD_CIDR, network.NODE_IP} <= set(kube_calls(local_cluster, lambda api: api.node_networks()))


def test_an_api_server_that_moved_is_excepted_on_the_next_read(local_cluster, cfg, monkeypatch):
    """A reconciler that knew other addresses (the API server moved since) picks up the real one from
    the real EndpointSlice, with the ranges the cluster reports, and reading again changes nothing."""
    from finetune_operator import cluster_networks
    from finetune_operator.metrics import Metrics
    from finetune_operator.reconcile import Reconciler

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    base = cfg.model_copy(update={"clusterNetworks": ["10.244.0.0/16"], "discoverClusterNetworks": True})

    async def follow(api):
        known = cluster_networks.ClusterNetworks(base, api_server=(ipaddress.ip_address("192.0.2.10"),))
        reconciler = Reconciler(api, known.excepting(), Metrics())
        return [await cluster_networks.refresh(reconciler, known) for _ in range(2)], reconciler.cfg.clusterNetworks

    answers, networks = kube_calls(local_cluster, follow)
    assert answers == [True, False]
    assert networks[:2] == ["10.244.0.0/16", f"{network.NODE_IP}/32"] and network.SERVICE_CIDR in networks
    assert "192.0.2.10/32" not in networks


def test_a_pass_delayed_between_observe_and_apply_never_takes_another_namespace(kube, local_cluster, operator, cfg,
                                                                                namespace, monkeypatch):
    """The operator's own reconcile (in this process, against the real API server), stopped right
    after it observed that the sandbox does not exist; meanwhile someone else creates a namespace of
    that name (a forced name collision). The pass must not adopt it, write into it or delete it; the
    operator then runs the job in a sandbox of the job's next name, beside the squatter."""
    from finetune_operator import reconcile
    from finetune_operator.metrics import Metrics

    operator.kill()  # this test's pass is the only one acting on the job
    running = False
    try:
        kube.apply(credentials(), ftj("raced", runPolicy={"suspend": True}), namespace=namespace)
        sandbox = sandbox_of(kube, cfg, namespace, "raced")
        squatter = {"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": sandbox, "labels": {"owner": "someone-else"}}}
        real_decide = reconcile.decide

        def decide_then_race(view, config):
            plan = real_decide(view, config)
            if view.namespace is None and plan.apply:
                kube.apply(squatter)
            return plan

        monkeypatch.setattr(reconcile, "decide", decide_then_race)

        body = kube.get("finetunejob", "raced", namespace)
        outcome = kube_calls(local_cluster, lambda api: reconcile.Reconciler(api, cfg, Metrics()).reconcile(body))
        assert not outcome.permanent and outcome.requeue_after
        ns = kube.get("namespace", sandbox)
        assert ns["metadata"]["labels"].get("owner") == "someone-else"
        assert n.LABEL_JOB_UID not in ns["metadata"]["labels"]
        assert kube.get("secrets", namespace=sandbox)["items"] == [] or all(
            s["metadata"]["name"] != n.CREDENTIALS_SECRET for s in kube.get("secrets", namespace=sandbox)["items"])
        status = status_of(kube, namespace, "raced")
        assert "someone-else" not in json.dumps(status)
        monkeypatch.undo()
        operator.up(log=lambda *_: None)
        running = True
        status = wait_status(kube, namespace, "raced", lambda s: is_true(s, "SandboxReady"), "SandboxReady")
        job = kube.get("finetunejob", "raced", namespace)
        assert status["sandboxNamespace"] == n.sandbox_candidates(cfg.sandboxPrefix, job["metadata"])[1]
        assert kube.get("namespace", status["sandboxNamespace"])["metadata"]["labels"][n.LABEL_JOB_UID] == \
            job["metadata"]["uid"]
        assert kube.get("namespace", sandbox)["metadata"]["labels"].get("owner") == "someone-else"  # left alone
        kube.run("delete", "finetunejob", "raced", "-n", namespace, "--wait=true", "--timeout=120s")
        assert kube.get("namespace", sandbox)["metadata"].get("deletionTimestamp") is None  # still left alone
    finally:
        if not running:
            monkeypatch.undo()
            operator.up(log=lambda *_: None)
        kube.run("delete", "namespace", sandbox, "--wait=false", check=False)


# ---- no orphans -----------------------------------------------------------------------------------

def test_a_stripped_finalizer_still_ends_with_the_sandbox_removed(kube, operator, cfg, namespace):
    kube.apply(credentials(), ftj("stripped", runPolicy={"suspend": True}), namespace=namespace)
    status = wait_status(kube, namespace, "stripped", lambda s: is_true(s, "SandboxReady"), "SandboxReady")
    sandbox = status["sandboxNamespace"]
    # No handler watches namespaces (kopf would put its finalizer on them): a sandbox never waits for the operator.
    assert not kube.get("namespace", sandbox)["metadata"].get("finalizers"), kube.get("namespace", sandbox)["metadata"]
    kube.run("patch", "finetunejob", "stripped", "-n", namespace, "--type=merge",
             "-p", '{"metadata": {"finalizers": null}}')
    kube.run("delete", "finetunejob", "stripped", "-n", namespace, "--wait=true", "--timeout=30s")
    assert get_or_none(kube, "finetunejob", "stripped", namespace) is None
    # The sweep passes every sweepIntervalSeconds; the namespace controller then empties the namespace.
    _wait_for(lambda: get_or_none(kube, "namespace", sandbox) is None, cfg.sweepIntervalSeconds + 90,
              "the orphaned sandbox to be swept", interval=2)


# ---- credentials ----------------------------------------------------------------------------------

@pytest.mark.parametrize("secret, reason", [
    (credentials(opted_in=False), "SecretNotOptedIn"),
    (credentials(AWS_SECRET_ACCESS_KEY="   "), "SecretValueEmpty"),
    (credentials(AWS_ACCESS_KEY_ID=""), "SecretValueEmpty"),
], ids=["not-opted-in", "whitespace-secret", "empty-key-id"])
def test_a_secret_is_used_only_when_opted_in_and_complete(kube, operator, namespace, secret, reason):
    kube.apply(secret, ftj("creds"), namespace=namespace)
    cond = validated(kube, namespace, "creds")
    assert cond["status"] == "False" and cond["reason"] == reason, cond
    assert owned_namespaces(kube, job_uid(kube, namespace, "creds")) == []


def test_the_copied_secret_follows_rotation_and_deletion(kube, operator, namespace):
    kube.apply(credentials(), ftj("rotating", runPolicy={"suspend": True}), namespace=namespace)
    sandbox = wait_status(kube, namespace, "rotating", lambda s: is_true(s, "SandboxReady"),
                          "SandboxReady")["sandboxNamespace"]

    def copy() -> dict | None:
        return get_or_none(kube, "secret", n.CREDENTIALS_SECRET, sandbox)

    rotated = credentials(AWS_SECRET_ACCESS_KEY="rotated-" + uuid.uuid4().hex)
    kube.apply(rotated, namespace=namespace)
    expected = kube.get("secret", "s3-credentials", namespace)["data"]["AWS_SECRET_ACCESS_KEY"]
    _wait_for(lambda: (c := copy()) and c["data"]["AWS_SECRET_ACCESS_KEY"] == expected, 60, "the rotated copy")
    kube.run("delete", "secret", "s3-credentials", "-n", namespace)
    _wait_for(lambda: copy() is None, 60, "the copy to go with the tenant's Secret")
    cond = validated(kube, namespace, "rotating")
    assert cond["reason"] == "SecretNotFound"


# ---- generated specs --------------------------------------------------------------------------------

FUZZ_COUNT = 1000
WEIRD_VALUES = [None, 0, -1, 1, 2**31, 2**63, -(2**63), 1e308, -1e-308, 0.5, True, False, "", " ", "0", "-1",
                "x" * 10_000, "ü\u202e\u0000", "s3://", "s3://b/" + "k" * 3000, "500m", "1e400", "Infinity",
                [], [1, 2], {}, {"nested": {"deeper": [None]}}, "../../etc", "<script>", "${HOME}", "${{ x }}"]
FIELDS = ["runId", "model.uri", "model.format", "datasets", "datasets.0.uri", "datasets.0.format", "datasets.0.weight",
          "method.type", "method.lora.rank", "method.lora.alpha", "method.virtualTokens", "objective",
          "hyperparameters.learningRate", "hyperparameters.batchSize", "hyperparameters.maxSteps",
          "hyperparameters.epochs", "resources.workers", "resources.gpusPerWorker", "resources.cpu",
          "resources.memory", "resources.sharedMemory", "resources.nodePool", "distributed.engine",
          "distributed.zeroStage", "checkpoint.everySteps", "output.uri", "evaluation.maxPerplexityRatio",
          "credentials.secretName", "storage.endpoint", "storage.region", "image", "runPolicy.backoffLimit",
          "runPolicy.priorityClassName", "runPolicy.activeDeadlineSeconds", "stages", "validation.splitRatio",
          "preprocessing.maxSeqLength", "unknownField"]


def _set(spec: dict, path: str, value) -> None:
    """spec[path] = value, for a dotted path (numbers index lists); missing objects on the way are made."""
    node = spec
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    for key in parents:
        present = isinstance(node, dict) and key in node or isinstance(node, list) and key < len(node)
        child = node[key] if present else None
        if not isinstance(child, (dict, list)):
            if not isinstance(node, dict):
                return
            child = node[key] = {}
        node = child
    if isinstance(node, dict):
        node[str(last)] = value
    elif last < len(node):
        node[last] = value


def fuzzed_specs(count: int, seed: int = 20261202) -> list[dict]:
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        spec = ftj(f"fuzz-{i}", runPolicy={"suspend": True})["spec"]
        for _ in range(rng.randint(1, 4)):
            value = rng.choice(WEIRD_VALUES + ["".join(rng.choices(string.printable, k=rng.randint(1, 40)))])
            _set(spec, rng.choice(FIELDS), value)
        specs.append(spec)
    return specs


def test_a_thousand_generated_specs_never_crash_the_operator(kube, local_cluster, operator, namespace):
    from lightkube import ApiError, Client, KubeConfig

    from finetune_operator import k8s

    restarts = operator_restarts(operator)
    errors_before = _reconcile_errors(operator)
    kube.apply(credentials(), namespace=namespace)
    client = Client(KubeConfig.from_file(str(local_cluster.kubeconfig)), field_manager="fuzz")
    rejected, accepted = 0, []
    try:
        for i, spec in enumerate(fuzzed_specs(FUZZ_COUNT)):
            body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                    "metadata": {"name": f"fuzz-{i}", "namespace": namespace}, "spec": spec}
            try:
                client.create(k8s.FineTuneJob.from_dict(body), namespace=namespace)
                accepted.append(f"fuzz-{i}")
            except ApiError as exc:
                assert exc.status.code in (400, 422), exc.status
                assert exc.status.message
                rejected += 1
            except (ValueError, TypeError):
                rejected += 1  # not even serialisable as a request
    finally:
        client.close()

    def without_verdict() -> list[str]:
        jobs = json.loads(kube.run("get", "finetunejobs", "-n", namespace, "-o", "json", timeout=120).stdout)["items"]
        return [j["metadata"]["name"] for j in jobs if not any(
            c.get("message") or c.get("status") == "True" for c in (j.get("status") or {}).get("conditions") or []
            if c["type"] == "Validated")]

    missing: list[str] = []

    def every_job_has_a_verdict() -> bool:
        missing[:] = without_verdict()
        return not missing

    try:
        _wait_for(every_job_has_a_verdict, 300, "a Validated condition on every accepted job", interval=5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {len(missing)} of {len(accepted)} without one, e.g. "
                             f"{[(m, status_of(kube, namespace, m)) for m in missing[:3]]}") from None
    print(f"generated {FUZZ_COUNT} specs: {rejected} rejected by the API server, {len(accepted)} accepted, "
          "each with a Validated condition")
    assert rejected + len(accepted) == FUZZ_COUNT and rejected > 0 and accepted
    assert operator_restarts(operator) == restarts
    assert _reconcile_errors(operator) == errors_before
    kube.run("delete", "finetunejobs", "--all", "-n", namespace, "--wait=false", timeout=300)


def _reconcile_errors(operator) -> float:
    text = operator.metrics_text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('finetune_reconcile_total{outcome="error"}'))


# ---- logs -------------------------------------------------------------------------------------------

def test_no_credential_reaches_the_operators_logs_at_its_most_verbose(kube, local_cluster, operator, namespace):
    """The session's operator runs with --verbose (the chart's extraArgs); a job with credentials of
    its own goes through validation, its S3 checks (refused: the local S3 does not know the key) and
    its deletion; then the whole log is searched for them."""
    assert "--verbose" in (operator.values().get("extraArgs") or [])
    key_id = "AKIA" + "".join(random.choices(string.ascii_uppercase + string.digits, k=16))
    secret = "".join(random.choices(string.ascii_letters + string.digits, k=40))
    kube.apply(credentials(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret), ftj("logged"),
               namespace=namespace)
    validated(kube, namespace, "logged")  # the S3 checks were made with these credentials
    kube.run("delete", "finetunejob", "logged", "-n", namespace, "--timeout=60s")
    logs = operator.logs()
    assert "DEBUG" in logs, "the operator does not log at debug level"
    assert key_id not in logs and secret not in logs
    assert local_s3.SECRET_KEY not in logs
