"""Whole passes of `Reconciler.reconcile` against a hostile tenant, over an in-memory API: its Secret
is used for nothing (no signed request, no copy, no redaction entry) until it passed every check; the
copy in the sandbox follows it whatever else is wrong with the job; a wildcard endpoint is reached
only at the addresses judged in the same pass, and no pass without them reaches it at all; nothing
an endpoint said outlives a pass. No S3: the storage functions are recorded, and every socket the
operator opens is refused (and recorded)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import time
from typing import Any, Callable

import pytest

from finetune_operator import endpoints, k8s, reconcile, redact, s3
from finetune_operator.builders import names
from finetune_operator.config import OperatorConfig
from finetune_operator.metrics import Metrics
from finetune_operator.reconcile import Reconciler
from finetune_operator.validation import S3Check
from op_testdata import ROOT, job, minimal_spec
from test_op_tenancy_reconcile import NOW, FakeKube

CFG = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml")
WILDCARD = CFG.model_copy(update={"allowedS3Endpoints": ["http://*.objects.example.com:9000"]})
ENDPOINT = "http://team-a.objects.example.com:9000"
PUBLIC = ipaddress.ip_address("203.0.113.10")
CPU = {"gpusPerWorker": 0, "nodePool": "cpu"}
KEY_ID, SECRET_KEY, TOKEN = "AKIA-TEAM-A-FIRST", "secret-of-team-a-first", "token-of-team-a-first"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


FIRST = {"AWS_ACCESS_KEY_ID": b64(KEY_ID), "AWS_SECRET_ACCESS_KEY": b64(SECRET_KEY), "AWS_SESSION_TOKEN": b64(TOKEN)}


def tenant_secret(name: str = "s3-credentials", key_id: str = KEY_ID, secret_key: str = SECRET_KEY) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "team-a", "labels": {names.CREDENTIALS_OPT_IN_LABEL: "true"}},
            "data": {"AWS_ACCESS_KEY_ID": b64(key_id), "AWS_SECRET_ACCESS_KEY": b64(secret_key),
                     "AWS_SESSION_TOKEN": b64(TOKEN)}}


class Tenant:
    """The tenant's side: its objects in the API, what its storage and its DNS were asked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, endpoint: str = "", dns: list[Any] | None = None) -> None:
        spec = minimal_spec(resources=CPU, storage={"endpoint": endpoint, "region": "us-east-1"})
        self.kube = FakeKube(job(spec), tenant_secret())
        self.calls: list[tuple[str, str, Any]] = []  # (storage function, access key id it signs with, its dial)
        self.sockets: list[tuple[str, int]] = []
        self.dns = list(dns or [])  # one answer per lookup: addresses, or "slow" (none in time)
        real_read = s3.read_documents

        def check_inputs(endpoint, region, creds, uris, **kw):
            self.calls.append(("check_inputs", creds.access_key, kw.get("dial")))
            return {path: S3Check(True) for path in uris}

        def read_documents(endpoint, region, creds, output_uri, run_id, **kw):
            self.calls.append(("read_documents", creds.access_key, kw.get("dial")))
            return real_read(endpoint, region, creds, output_uri, run_id, **kw)  # down to the socket

        def connect(address, *_, **__):
            self.sockets.append(tuple(address))
            raise OSError("refused by the test")

        def resolve(host):
            answer = self.dns.pop(0)
            if answer == "slow":
                time.sleep(0.5)
                return ()
            return answer

        monkeypatch.setattr(s3, "check_inputs", check_inputs)
        monkeypatch.setattr(s3, "read_documents", read_documents)
        monkeypatch.setattr(socket, "create_connection", connect)
        monkeypatch.setattr(endpoints, "resolve", resolve)
        monkeypatch.setattr(reconcile, "RESOLVE_TIMEOUT", 0.2)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    @property
    def sandbox(self) -> str:
        [ns] = self.kube.objects("Namespace")
        return ns["metadata"]["name"]

    def copy(self) -> dict[str, str] | None:
        found = self.kube.store.get((k8s.Secret, self.sandbox, names.CREDENTIALS_SECRET))
        return None if found is None else found["data"]

    def secret(self, name: str = "s3-credentials") -> dict[str, Any]:
        return self.kube.store[(k8s.Secret, "team-a", name)]

    def passes(self, cfg: OperatorConfig, *edits: Callable[["Tenant"], None]) -> tuple[list[Any], Reconciler]:
        """A pass; then, for each edit, the edit and another pass. The statuses, and the reconciler."""

        async def run() -> tuple[list[Any], Reconciler]:
            reconciler = Reconciler(self.kube, cfg, Metrics(), clock=lambda: NOW)  # type: ignore[arg-type]
            try:
                statuses = []
                for edit in (None, *edits):
                    if edit is not None:
                        edit(self)
                    stored = await self.kube.get(k8s.FineTuneJob, "support-bot", "team-a")
                    statuses.append((await reconciler.reconcile(stored)).status)
                return statuses, reconciler
            finally:
                reconciler.io.shutdown()

        return asyncio.run(run())


def validated(status: dict[str, Any]) -> tuple[str, str]:
    cond = next(c for c in status["conditions"] if c["type"] == "Validated")
    return cond["status"], cond["reason"]


# ---- edits between passes -------------------------------------------------------------------------


def running(t: Tenant) -> None:
    """The run's PyTorchJob is running: its documents are read on the next pass."""
    [ptj] = t.kube.objects("PyTorchJob")
    ptj["status"] = {"conditions": [{"type": "Running", "status": "True"}]}


def unlabelled(t: Tenant) -> None:
    t.secret()["metadata"]["labels"].clear()


def opted_out(t: Tenant) -> None:
    t.secret()["metadata"]["labels"][names.CREDENTIALS_OPT_IN_LABEL] = "false"


def blank_secret_key(t: Tenant) -> None:
    t.secret()["data"]["AWS_SECRET_ACCESS_KEY"] = b64(" \n\t")


def blank_key_id(t: Tenant) -> None:
    t.secret()["data"]["AWS_ACCESS_KEY_ID"] = b64("   ")


def secret_key_missing(t: Tenant) -> None:
    del t.secret()["data"]["AWS_SECRET_ACCESS_KEY"]


def secret_deleted(t: Tenant) -> None:
    del t.kube.store[(k8s.Secret, "team-a", "s3-credentials")]


def secret_in_another_namespace(t: Tenant) -> None:
    moved = t.kube.store.pop((k8s.Secret, "team-a", "s3-credentials"))
    moved["metadata"]["namespace"] = "team-b"
    t.kube.store[(k8s.Secret, "team-b", "s3-credentials")] = moved


def rotated(t: Tenant) -> None:
    t.kube.store[(k8s.Secret, "team-a", "s3-credentials")] = tenant_secret(key_id="AKIA-TEAM-A-ROTATED",
                                                                           secret_key="secret-of-team-a-rotated")


def spec_change(**changes: Any) -> Callable[[Tenant], None]:
    def edit(t: Tenant) -> None:
        t.kube.store[(k8s.FineTuneJob, "team-a", "support-bot")]["spec"].update(changes)
    return edit


def names_another_secret(t: Tenant) -> None:
    t.kube._put(tenant_secret("other-credentials", key_id="AKIA-TEAM-A-OTHER", secret_key="secret-of-team-a-other"))
    spec_change(credentials={"secretName": "other-credentials"})(t)


def both(*edits: Callable[[Tenant], None]) -> Callable[[Tenant], None]:
    def edit(t: Tenant) -> None:
        for e in edits:
            e(t)
    return edit


def redacted(value: str) -> bool:
    return redact.REDACTOR.redact(value) == redact.MASK


# ---- a wildcard endpoint is reached only at the addresses judged in the same pass -------------------

REBINDING = [
    # what the second pass finds, its DNS answer, Validated's reason, the sockets it opened
    ("the same public address: documents read there, by address", running, [(PUBLIC,)], "Valid",
     [(str(PUBLIC), 9000)] * 3),
    ("rebound to the metadata address", running, [(ipaddress.ip_address("169.254.169.254"),)],
     "EndpointAddressBlocked", []),
    ("rebound into the cluster's ranges", running, [(ipaddress.ip_address("10.96.0.1"),)],
     "EndpointAddressBlocked", []),
    ("no longer resolves", running, [()], "EndpointUnresolvable", []),
    ("no answer in time", running, ["slow"], "EndpointUnresolvable", []),
    ("the same address, but the Secret lost its opt-in", both(running, unlabelled), [(PUBLIC,)],
     "SecretNotOptedIn", []),
]


@pytest.mark.parametrize("what, edit, answer, reason, dialled", REBINDING, ids=[c[0] for c in REBINDING])
def test_a_wildcard_endpoint_is_reached_only_at_the_addresses_judged_in_the_same_pass(
        what, edit, answer, reason, dialled, monkeypatch):
    """Pass 1 resolves the name to a public address (Valid) and checks the inputs there; pass 2 gets
    another answer while the run is running. Found on the real code: a refused answer ended the
    observation before the pass's addresses were set, and the documents were then read by name, so
    the new answer (the metadata address) was dialled."""
    t = Tenant(monkeypatch, ENDPOINT, dns=[(PUBLIC,), *answer])
    statuses, _ = t.passes(WILDCARD, edit)
    assert validated(statuses[0]) == ("True", "Valid") and validated(statuses[1])[1] == reason
    assert t.sockets == dialled
    assert all(ipaddress.ip_address(host) == PUBLIC for host, _ in t.sockets), "a socket by name, or elsewhere"
    assert t.calls[0] == ("check_inputs", KEY_ID, s3.Dial(addresses=(PUBLIC,)))
    assert [c[2] for c in t.calls[1:]] == [s3.Dial(addresses=(PUBLIC,))] * (1 if dialled else 0)


# ---- a Secret's values are used only once it passed every check ---------------------------------

SECRET_PROBLEMS = [
    ("no opt-in label", unlabelled, "SecretNotOptedIn"),
    ("opted out", opted_out, "SecretNotOptedIn"),
    ("a whitespace secret key", blank_secret_key, "SecretValueEmpty"),
    ("a blank key id", blank_key_id, "SecretValueEmpty"),
    ("a key missing", secret_key_missing, "SecretKeysMissing"),
    ("only in another namespace", secret_in_another_namespace, "SecretNotFound"),
    ("deleted", secret_deleted, "SecretNotFound"),
]


@pytest.mark.parametrize("what, problem, reason", SECRET_PROBLEMS, ids=[c[0] for c in SECRET_PROBLEMS])
def test_a_secret_with_a_problem_signs_nothing_and_is_copied_nowhere(what, problem, reason, monkeypatch):
    """A new job: its inputs are not checked with the Secret (found on the real code: they were, and the
    status said SecretNotOptedIn), nothing is created, none of its values is registered."""
    t = Tenant(monkeypatch)
    problem(t)
    [status], _ = t.passes(CFG)
    assert validated(status) == ("False", reason)
    assert t.calls == [] and t.sockets == []
    assert t.kube.objects("Namespace") == [] and t.kube.objects("PyTorchJob") == []
    assert not redacted(SECRET_KEY) and not redacted(KEY_ID)


@pytest.mark.parametrize("what, problem, reason", SECRET_PROBLEMS, ids=[c[0] for c in SECRET_PROBLEMS])
def test_a_running_jobs_secret_with_a_problem_signs_nothing_and_its_copy_goes(what, problem, reason, monkeypatch):
    """A running job: its documents are not read with the Secret (found on the real code: they were),
    its copy is deleted, not refreshed, and its values leave the redactor."""
    t = Tenant(monkeypatch)
    before: list[Any] = []
    statuses, _ = t.passes(CFG, both(lambda t: before.append((t.copy(), redacted(SECRET_KEY))), running, problem))
    assert validated(statuses[0]) == ("True", "Valid") and before == [(FIRST, True)]
    assert validated(statuses[1]) == ("False", reason) and not redacted(SECRET_KEY) and not redacted(KEY_ID)
    assert [c[0] for c in t.calls] == ["check_inputs"]  # the first pass's, nothing after
    assert t.sockets == [] and t.copy() is None
    assert len(t.kube.objects("PyTorchJob")) == 1  # the run itself is left alone


# ---- the copy follows the tenant's Secret, whatever else is wrong --------------------------------

FOLLOW = [
    # what happens to the Secret while the spec has a problem of its own, the copy's data after the pass
    ("nothing", lambda t: None, FIRST),
    ("rotated", rotated, {**FIRST, "AWS_ACCESS_KEY_ID": b64("AKIA-TEAM-A-ROTATED"),
                          "AWS_SECRET_ACCESS_KEY": b64("secret-of-team-a-rotated")}),
    ("deleted", secret_deleted, None),
    ("opt-in label removed", unlabelled, None),
    ("a whitespace value", blank_secret_key, None),
    ("the job names another usable Secret", names_another_secret,
     {**FIRST, "AWS_ACCESS_KEY_ID": b64("AKIA-TEAM-A-OTHER"), "AWS_SECRET_ACCESS_KEY": b64("secret-of-team-a-other")}),
    ("the job names a Secret that does not exist", spec_change(credentials={"secretName": "missing"}), None),
]


@pytest.mark.parametrize("what, change, copied", FOLLOW, ids=[c[0] for c in FOLLOW])
def test_the_copy_follows_the_tenants_secret_whatever_else_is_wrong(what, change, copied, monkeypatch):
    """Found on the real code: with any spec problem the Secret was not even read, and its copy stayed."""
    t = Tenant(monkeypatch)
    # An endpoint outside the allow-list: a node pool would not do, a started run keeps the one it was made with.
    elsewhere = spec_change(storage={"endpoint": "http://s3.elsewhere.example:9000", "region": "us-east-1"})
    statuses, _ = t.passes(CFG, both(running, elsewhere, change))
    assert validated(statuses[1])[:2] == ("False", "EndpointNotAllowed")
    assert t.copy() == copied
    in_use = {base64.b64decode(v).decode() for v in (copied or {}).values()}
    for value in {KEY_ID, SECRET_KEY, TOKEN, "AKIA-TEAM-A-ROTATED", "AKIA-TEAM-A-OTHER"}:
        assert redacted(value) is (value in in_use), value
    assert len(t.kube.objects("PyTorchJob")) == 1 and t.calls[1:] == []  # no storage call with a problem


def finalized(t: Tenant, reconciler: Reconciler) -> None:
    reconciler.forget(t.kube.store[(k8s.FineTuneJob, "team-a", "support-bot")])


def swept(t: Tenant, reconciler: Reconciler) -> None:
    """Deleted with its finalizer stripped: only the sweep of its sandbox learns that it went."""
    del t.kube.store[(k8s.FineTuneJob, "team-a", "support-bot")]
    [sandbox] = t.kube.objects("Namespace")
    assert asyncio.run(reconciler.sweep(sandbox)) == "orphaned"


@pytest.mark.parametrize("gone", [finalized, swept])
def test_a_deleted_jobs_values_leave_the_redactor(gone, monkeypatch):
    t = Tenant(monkeypatch)
    _, reconciler = t.passes(CFG)
    assert redacted(KEY_ID) and redacted(SECRET_KEY) and redacted(TOKEN)
    gone(t, reconciler)
    assert not redacted(KEY_ID) and not redacted(SECRET_KEY) and not redacted(TOKEN)
    assert job()["metadata"]["uid"] not in reconciler._inputs_found


# ---- nothing an endpoint said outlives a pass -----------------------------------------------------


@pytest.mark.parametrize("check, cached", [
    (S3Check(True), True),
    (S3Check(None, "E" * 100_000), False),
    (S3Check(False, "AccessDenied"), False),
])
def test_only_inputs_all_found_are_remembered(check, cached, monkeypatch):
    """The per-job memory of input checks is the (generation, spec hash) whose inputs were all found,
    never what an endpoint answered (it once kept every answer of every job)."""
    t = Tenant(monkeypatch)
    monkeypatch.setattr(s3, "check_inputs", lambda endpoint, region, creds, uris, **_: {path: check for path in uris})
    _, reconciler = t.passes(CFG)
    remembered = reconciler._inputs_found.get(job()["metadata"]["uid"])
    assert remembered == ((1, names.spec_hash(t.kube.store[(k8s.FineTuneJob, "team-a", "support-bot")]["spec"]))
                          if cached else None)
