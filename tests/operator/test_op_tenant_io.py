"""The tenant I/O executor: bounded, fair across tenants, every wait with a deadline."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from finetune_operator.tenant_io import TenantIO, TenantIOTimeout


def test_a_tenant_with_slow_storage_does_not_delay_another():
    async def scenario():
        io = TenantIO(workers=4, per_tenant=2)
        release = threading.Event()
        slow = [asyncio.create_task(io.run("hostile", 0.2, release.wait, 5)) for _ in range(20)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        answer = await io.run("ordinary", 1.0, lambda: "ok")
        elapsed = time.monotonic() - t0
        results = await asyncio.gather(*slow, return_exceptions=True)
        in_flight = io.in_flight["hostile"]
        release.set()
        io.shutdown()
        return answer, elapsed, results, in_flight

    answer, elapsed, results, in_flight = asyncio.run(scenario())
    assert answer == "ok" and elapsed < 0.2
    assert all(isinstance(r, TenantIOTimeout) for r in results)
    # The hostile tenant never held more than its two threads, even after its callers gave up.
    assert in_flight == 2


def test_a_slot_stays_taken_until_the_thread_is_done():
    async def scenario():
        io = TenantIO(workers=4, per_tenant=1)
        gate = threading.Event()
        with pytest.raises(TenantIOTimeout):
            await io.run("t", 0.05, gate.wait, 5)
        with pytest.raises(TenantIOTimeout, match="no I/O slot"):
            await io.run("t", 0.05, lambda: None)   # the first call's thread still runs
        gate.set()
        await asyncio.sleep(0.05)
        value = await io.run("t", 1.0, lambda: 42)  # and now its slot is free
        io.shutdown()
        return value

    assert asyncio.run(scenario()) == 42


def test_exceptions_of_the_call_reach_the_caller():
    async def scenario():
        io = TenantIO()
        try:
            await io.run("t", 1.0, int, "not a number")
        finally:
            io.shutdown()

    with pytest.raises(ValueError):
        asyncio.run(scenario())


def test_threads_go_to_tenants_in_turn_not_to_whoever_queued_first():
    """Three tenants queue 5 calls each on one thread before an ordinary tenant asks: first come
    first served would start it 16th; in turn, it starts once each tenant ahead of it had one."""
    async def scenario():
        io = TenantIO(workers=1, per_tenant=2)
        started: list[str] = []
        calls = [asyncio.create_task(io.run(tenant, 30, started.append, tenant))
                 for tenant in ("hostile-a", "hostile-b", "hostile-c") for _ in range(5)]
        calls.append(asyncio.create_task(io.run("ordinary", 30, started.append, "ordinary")))
        await asyncio.gather(*calls)
        free, in_flight = io.free, dict(io.in_flight)
        io.shutdown()
        return started, free, in_flight

    started, free, in_flight = asyncio.run(scenario())
    assert started.index("ordinary") <= 4, started
    assert len(started) == 16 and free == 1 and set(in_flight.values()) == {0}  # every thread and slot came back


@pytest.mark.parametrize("hostile_tenants, ordinary_waits", [
    (3, False),   # 3 first threads + 2 second ones (a quarter of 8): 5 busy
    (4, False),   # 2N = 8 would fill the pool; 4 + 2 leave 2 free, the ordinary tenant starts at once
    (5, False),
    (6, True),    # three quarters as many hostile tenants as threads fill it (the documented limit)
])
def test_a_tenant_holding_no_thread_comes_before_second_threads_of_others(hostile_tenants, ordinary_waits):
    """Hostile tenants queue 10 never-ending calls each on 8 threads, 2 allowed per tenant."""
    async def scenario():
        io = TenantIO(workers=8, per_tenant=2)
        release = threading.Event()
        hostile = [asyncio.create_task(io.run(f"hostile-{t}", 5, release.wait, 5))
                   for t in range(hostile_tenants) for _ in range(10)]
        await asyncio.sleep(0.05)
        held = dict(io.in_flight)
        try:
            await io.run("ordinary", 0.3, lambda: None)
            waited = False
        except TenantIOTimeout:
            waited = True
        release.set()
        await asyncio.gather(*hostile)
        free = io.free
        io.shutdown()
        return held, waited, free

    held, waited, free = asyncio.run(scenario())
    assert waited is ordinary_waits, held
    assert all(1 <= n <= 2 for n in held.values()) and len(held) == hostile_tenants
    assert sum(held.values()) == min(8, hostile_tenants + 2), held
    assert free == 8


def test_callers_that_give_up_waiting_leave_no_slot_taken():
    async def scenario():
        io = TenantIO(workers=1, per_tenant=1)
        gate = threading.Event()
        first = asyncio.create_task(io.run("a", 5, gate.wait, 5))
        await asyncio.sleep(0.02)
        gave_up = [asyncio.create_task(io.run(f"t{i}", 0.05, lambda: None)) for i in range(5)]
        results = await asyncio.gather(*gave_up, return_exceptions=True)
        gate.set()
        await first
        value = await io.run("late", 1.0, lambda: "served")
        free = io.free
        io.shutdown()
        return results, value, free

    results, value, free = asyncio.run(scenario())
    assert all(isinstance(r, TenantIOTimeout) and "no I/O slot" in str(r) for r in results)
    assert value == "served" and free == 1


def test_the_pool_is_sized_by_the_operator_configuration():
    from finetune_operator.config import OperatorConfig
    from finetune_operator.metrics import Metrics
    from finetune_operator.reconcile import Reconciler
    from op_testdata import ROOT

    cfg = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml").model_copy(
        update={"tenantIOThreads": 40, "tenantIOThreadsPerNamespace": 3})
    reconciler = Reconciler(None, cfg, Metrics())  # type: ignore[arg-type]  (no call reaches the API)
    try:
        assert (reconciler.io.free, reconciler.io.per_tenant, reconciler.io.pool._max_workers) == (40, 3, 40)
    finally:
        reconciler.io.shutdown()


class _SecretsOnly:
    """The API as the first pass of a new job sees it: its tenant's credentials, no sandbox yet."""

    async def get(self, kind, name, namespace=None):
        from finetune_operator import k8s
        from finetune_operator.builders import names

        if kind is not k8s.Secret:
            return None
        return {"metadata": {"name": name, "namespace": namespace, "labels": {names.CREDENTIALS_OPT_IN_LABEL: "true"}},
                "data": {"AWS_ACCESS_KEY_ID": "eA==", "AWS_SECRET_ACCESS_KEY": "eQ=="}}

    async def list(self, kind, namespace=None, labels=None, fields=None):
        return []


def test_the_namespaces_of_one_tenant_policy_share_one_tenants_io_slots(monkeypatch):
    """A tenant spread over two namespaces that its TenantPolicy governs holds one tenant's slots: its
    second namespace waits behind its first, while a namespace no policy governs is served at once."""
    from datetime import datetime, timezone

    from finetune_operator import reconcile, s3, tenancy
    from finetune_operator.config import OperatorConfig
    from finetune_operator.metrics import Metrics
    from op_testdata import ROOT, job, minimal_spec

    cfg = OperatorConfig.load(ROOT / "operator" / "config" / "dev.yaml")
    tarpit = threading.Event()

    def check_inputs(endpoint, region, creds, uris, dial):
        if any(uri.startswith("s3://tarpit/") for uri in uris.values()):
            tarpit.wait(5)  # a bucket that answers slowly
        return {}

    monkeypatch.setattr(s3, "check_inputs", check_inputs)
    monkeypatch.setattr(reconcile, "INPUT_CHECK_TIMEOUT", 1.0)
    selector = {"matchLabels": {"finetune.dev/tenant": "team-a"}}
    tenants = tenancy.Tenancy(
        policies=[tenancy.Policy.from_body({"metadata": {"name": "team-a", "generation": 1},
                                            "spec": {"namespaceSelector": selector}})],
        namespace_labels={"team-a": {"finetune.dev/tenant": "team-a"}, "team-a-dev": {"finetune.dev/tenant": "team-a"},
                          "team-b": {}})

    def new_job(namespace, uid, bucket="team-a"):
        spec = minimal_spec(resources={"gpusPerWorker": 0, "nodePool": "cpu"},
                            datasets=[{"uri": f"s3://{bucket}/data/support.jsonl", "format": "chat"}])
        return job(spec, namespace=namespace, uid=uid)

    async def scenario():
        io = TenantIO(workers=4, per_tenant=1)
        reconciler = reconcile.Reconciler(_SecretsOnly(), cfg, Metrics(), io=io)  # type: ignore[arg-type]
        now = datetime(2026, 1, 1, tzinfo=timezone.utc)
        stalling = asyncio.create_task(reconciler._observe(new_job("team-a", "uid-1", "tarpit"),
                                                           now, tenants))
        await asyncio.sleep(0.05)
        views = await asyncio.gather(reconciler._observe(new_job("team-a-dev", "uid-2"), now, tenants),
                                     reconciler._observe(new_job("team-b", "uid-3"), now, tenants))
        tarpit.set()
        await stalling
        io.shutdown()
        return [{p.message.rsplit(": ", 1)[-1] for p in v.problems} for v in views]

    second_namespace, other_tenant = asyncio.run(scenario())
    assert second_namespace == {"no I/O slot for tenant policy/team-a within 1s"}, second_namespace
    assert other_tenant == set(), other_tenant
