"""Futures in process: request_id -> Result, a blocking wait per future, expiry of settled
results, and a count of each tenant's unsettled ones (what `max_queued` limits).

The embedded `tasks.Scheduler` settles and waits on these; scaled out, `cluster.state`'s
RedisFutures does the same in Redis.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Protocol

from tinkerd.results import Result
from tinkerd.types import NotFound


class Futures(Protocol):
    """What a `tasks.Scheduler` settles into and waits on: a `FutureStore`, or in a cluster
    worker `cluster.state.RedisFutures` (whose futures the API processes create and count)."""

    def settle(self, request_id: str, result: Result, *, tenant: str = "") -> None: ...

    def wait(self, request_id: str, timeout: float) -> Result | None: ...


class FutureStore:
    """request_id -> Result, with a blocking wait per future and expiry of settled results."""

    def __init__(self, ttl_seconds: float = 3600.0) -> None:
        self._ttl = ttl_seconds
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._results: dict[str, tuple[Result, float]] = {}
        self._tenant_of: dict[str, str] = {}  # pending request id -> its tenant
        self._per_tenant: dict[str, int] = {}

    def create(self, tenant: str = "") -> str:
        request_id = uuid.uuid4().hex
        with self._lock:
            self._events[request_id] = threading.Event()
            self._tenant_of[request_id] = tenant
            self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        return request_id

    def settle(self, request_id: str, result: Result, *, tenant: str = "") -> None:
        """Store the result and wake its waiters. `tenant` is for `state.RedisFutures`'
        count; this store knows each future's tenant from `create`."""
        with self._lock:
            event = self._events.pop(request_id, None)
            owner = self._tenant_of.pop(request_id, None)
            if owner is not None:
                left = self._per_tenant[owner] - 1
                if left:
                    self._per_tenant[owner] = left
                else:
                    del self._per_tenant[owner]
            self._results[request_id] = (result, time.monotonic() + self._ttl)
            self._expire()
        if event is not None:
            event.set()

    def wait(self, request_id: str, timeout: float) -> Result | None:
        """The result, or None if it is still pending after `timeout` seconds."""
        with self._lock:
            event = self._events.get(request_id)
            settled = self._results.get(request_id)
        if settled is None and event is None:
            raise NotFound(f"unknown request_id {request_id!r} (it may have expired)")
        if event is not None and event.wait(timeout):
            with self._lock:
                settled = self._results.get(request_id)
        return settled[0] if settled else None

    def pending(self, tenant: str | None = None) -> int:
        """Futures not yet settled: all of them, or `tenant`'s."""
        with self._lock:
            return len(self._events) if tenant is None else self._per_tenant.get(tenant, 0)

    def _expire(self) -> None:
        now = time.monotonic()
        if len(self._results) % 256 == 0:
            for key in [k for k, (_, deadline) in self._results.items() if deadline < now]:
                del self._results[key]
