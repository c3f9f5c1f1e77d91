"""Blocking I/O against what tenants name (their S3 endpoints, DNS names), bounded and fair.

`workers` threads serve every tenant; a tenant (the namespaces one TenantPolicy governs, or a
namespace no policy governs) holds at most `per_tenant` of them at
a time, and a call keeps its tenant's slot until its thread is really done (a call the caller
stopped waiting for still occupies it). Free threads go to the waiting tenants in turn (round
robin), not to whoever queued first, and a tenant that holds none comes before one that holds some;
the threads tenants hold beyond their first are together at most a quarter of the pool. So hostile
tenants fill the pool only when there are three quarters as many of them as threads; until then
another tenant's call starts at once. Every call is awaited at most `timeout` seconds, the wait for a
thread included; the calls themselves are bounded too (s3.BoundedHTTP), so a thread comes back within
its deadline.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class TenantIOTimeout(TimeoutError):
    pass


class TenantIO:
    def __init__(self, workers: int = 32, per_tenant: int = 2) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tenant-io")
        self.free = workers
        self.per_tenant = per_tenant
        self.extra_cap = workers // 4
        self.in_flight: dict[str, int] = {}
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()  # tenants in turn order

    def _dispatch(self) -> None:
        """Grant free threads to waiting tenants in turn; a served tenant goes to the back of the line."""
        while self.free > 0:
            tenant = self._next_tenant()
            if tenant is None:
                return
            self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1
            self.free -= 1
            self._waiting[tenant].popleft().set_result(None)
            self._waiting.move_to_end(tenant)

    def _next_tenant(self) -> str | None:
        """The first waiting tenant in turn that holds no thread; else, while the threads held beyond
        tenants' first stay under their cap, the first that holds fewer than its share."""
        below_share = None
        for tenant in list(self._waiting):
            queue = self._waiting[tenant]
            while queue and queue[0].done():  # callers that gave up waiting
                queue.popleft()
            if not queue:
                del self._waiting[tenant]
                continue
            held = self.in_flight.get(tenant, 0)
            if held == 0:
                return tenant
            if below_share is None and held < self.per_tenant:
                below_share = tenant
        if below_share is None:
            return None
        extra = sum(held - 1 for held in self.in_flight.values() if held > 1)
        return below_share if extra < self.extra_cap else None

    def _release(self, tenant: str) -> None:
        self.in_flight[tenant] -= 1
        self.free += 1
        self._dispatch()

    async def _acquire(self, tenant: str, timeout: float) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, deque()).append(turn)
        self._dispatch()
        try:
            await asyncio.wait_for(asyncio.shield(turn), timeout)
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._release(tenant)  # granted just as the wait ended: give the thread back
            else:
                turn.cancel()
            raise

    async def run(self, tenant: str, timeout: float, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the pool, as one of `tenant`'s calls; TenantIOTimeout after `timeout`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            await self._acquire(tenant, timeout)
        except TimeoutError:
            raise TenantIOTimeout(f"no I/O slot for tenant {tenant} within {timeout:.0f}s") from None
        try:
            future = loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))
        except BaseException:
            self._release(tenant)
            raise
        future.add_done_callback(lambda _: self._release(tenant))
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, end - loop.time()))
        except TimeoutError:
            raise TenantIOTimeout(f"the storage of namespace {tenant} did not answer within {timeout:.0f}s") from None

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
