"""What the cluster keeps in Redis, and the objects that read and write it.

Keys (all under `tinkerd:`):
    workers                     set of registered worker names
    worker:<name>               a worker's registration (JSON), expiring unless renewed
    inflight:<name>             request ids queued on or running at that worker
    placement                   hash: model id (or snapshot sampler id) -> worker name
    lost                        hash: model id -> why it is gone
    stopped                     hash: model id -> a clean stop saved it; the next worker to
                                start restores it (`suspend`)
    seq:<model_id>, next:<id>   the model's seen seq_ids ("request_id|fingerprint") and the
                                lowest seq_id not yet submitted
    useen:<key>                 the same for unordered requests (sampling), by sampler key
    req:<request_id>            the worker a request went to (so a poll can tell "unknown")
    result:<request_id>         {body, type}: a settled future, expiring
    pending:<tenant>            sorted set: the tenant's unsettled request ids, by submit time
                                (Unix); an entry older than the future TTL no longer counts;
                                none for "" (no keys, no limits)
    records:<kind>              the registry: sessions, models, runs, samplers (JSON by id)
    channel `tinkerd:settled`   a notice per settled request id
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

import redis
from redis.exceptions import RedisError

from tinkerd.tasks import Result
from tinkerd.types import NotFound, TinkerdError

log = logging.getLogger(__name__)

PREFIX = "tinkerd:"
WORKERS = PREFIX + "workers"
PLACEMENT = PREFIX + "placement"
LOST = PREFIX + "lost"
# model id -> why it is not on any worker now: a clean stop saved it (`suspend`), and the next
# worker to start restores it
STOPPED = PREFIX + "stopped"
SETTLED = PREFIX + "settled"
PENDING = PREFIX + "pending:"
REAPER_LOCK = PREFIX + "reaper"
SWEEPER_LOCK = PREFIX + "sweeper"
# A request record outlives its result, so a late poll learns "expired", not "unknown".
REQUEST_TTL = 7 * 86400


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def inflight_key(name: str) -> str:
    return f"{PREFIX}inflight:{name}"


def request_key(request_id: str) -> str:
    return f"{PREFIX}req:{request_id}"


def result_key(request_id: str) -> str:
    return f"{PREFIX}result:{request_id}"


def pending_key(tenant: str) -> str:
    return PENDING + tenant


def forget_pending(client: redis.Redis, request_ids: list[str]) -> None:
    """Uncount `request_ids` from every tenant's pending set, for a settler that does not know
    their tenants (the reaper). Rare, so a scan of the few tenants' keys will do."""
    if not request_ids:
        return
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=PENDING + "*", count=1000):
        pipe.zrem(key, *request_ids)
    pipe.execute()


def connect(url: str, max_connections: int = 64) -> redis.Redis:
    """A client for `url` with at most `max_connections` connections: a burst of requests
    (a thousand long-polls arriving at once) waits for a free one rather than failing. Short
    timeouts: while Redis is down the API answers 503 quickly instead of holding requests;
    redis-py reconnects on the next command once it is back."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        socket_connect_timeout=2,
        socket_timeout=10,
        health_check_interval=15,
    )
    return redis.Redis(connection_pool=pool)


def as_text(value: Any) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisFutures:
    """Futures in Redis: a worker settles them, any API process answers retrieve_future.

    One listener per API process follows the `settled` channel and wakes the local waiters of
    each settled id, so a waiting poll holds no Redis connection of its own. A worker whose
    settle fails (Redis restarting) keeps the result and sends it again on `flush`.
    """

    def __init__(self, client: redis.Redis, ttl_seconds: float, worker: str | None = None):
        self.redis = client
        self.ttl = int(max(ttl_seconds, 1))
        self.worker = worker
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._unsent: deque[tuple[str, Result, str | None, str]] = deque()
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()

    # -- settling (workers, and the reaper for a lost worker's requests) ------------------------

    def settle(
        self, request_id: str, result: Result, worker: str | None = None, *, tenant: str = ""
    ) -> None:
        """Store the result, take it off `worker`'s in-flight set and `tenant`'s pending count,
        and wake its waiters."""
        try:
            self._write(request_id, result, worker or self.worker, tenant)
        except RedisError as e:
            log.warning("cannot store the result of %s yet (%s); will retry", request_id, e)
            self._unsent.append((request_id, result, worker or self.worker, tenant))

    def settle_error(
        self, request_id: str, error: TinkerdError, worker: str | None, *, tenant: str = ""
    ) -> None:
        body = Result(json.dumps(error.to_json()).encode())
        self.settle(request_id, body, worker, tenant=tenant)

    def _write(self, request_id: str, result: Result, worker: str | None, tenant: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        key = result_key(request_id)
        pipe.hset(key, mapping={"body": result.body, "type": result.content_type})
        pipe.expire(key, self.ttl)
        if worker is not None:
            pipe.srem(inflight_key(worker), request_id)
        if tenant:
            pipe.zrem(pending_key(tenant), request_id)
        pipe.publish(SETTLED, request_id)
        pipe.execute()

    def _is_unsent(self, request_id: str) -> bool:
        return any(unsent[0] == request_id for unsent in list(self._unsent))

    def flush(self) -> int:
        """Send the results that could not be stored earlier; returns how many are left."""
        while self._unsent:
            request_id, result, worker, tenant = self._unsent[0]
            try:
                self._write(request_id, result, worker, tenant)
            except RedisError:
                break
            self._unsent.popleft()
        return len(self._unsent)

    # -- waiting (API processes) ----------------------------------------------------------------

    def get(self, request_id: str) -> Result | None:
        raw = self.redis.hgetall(result_key(request_id))
        if not raw:
            return None
        return Result(raw[b"body"], as_text(raw[b"type"]))

    def wait(self, request_id: str, timeout: float) -> Result | None:
        """The result, or None if it is still pending after `timeout` seconds."""
        result = self.get(request_id)
        if result is not None:
            return result
        worker = self.redis.get(request_key(request_id))
        if worker is None:
            raise NotFound(f"unknown request_id {request_id!r} (it may have expired)")
        # Settling stores the result and leaves the worker's in-flight set in one step, so a
        # request that is neither in flight nor settled had its result expire.
        if worker and not self.redis.sismember(inflight_key(as_text(worker)), request_id):
            if (result := self.get(request_id)) is not None:
                return result
            if not self._is_unsent(request_id):
                raise NotFound(f"the result of request {request_id!r} has expired")
        self._ensure_listener()
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(request_id, set()).add(event)
        try:
            deadline = time.monotonic() + timeout
            while (result := self.get(request_id)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or not event.wait(left):
                    return None
                event.clear()
            return result
        finally:
            with self._lock:
                waiting = self._waiters.get(request_id)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._waiters[request_id]

    def _ensure_listener(self) -> None:
        with self._lock:
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._listen, name="tinkerd-settled", daemon=True
                )
                self._listener.start()

    def _listen(self) -> None:
        while not self._closed.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(SETTLED)
                self._wake_all()  # a notice may have gone by while (re)connecting
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._wake(as_text(message["data"]))
            except Exception as e:  # noqa: BLE001 - the listener must outlive any error
                log.warning("lost the settled channel (%s); reconnecting", e)
                self._closed.wait(0.5)
            finally:
                try:
                    pubsub.close()
                except RedisError:
                    pass

    def _wake(self, request_id: str) -> None:
        with self._lock:
            events = list(self._waiters.get(request_id, ()))
        for event in events:
            event.set()

    def _wake_all(self) -> None:
        with self._lock:
            events = [e for waiting in self._waiters.values() for e in waiting]
        for event in events:
            event.set()

    def waiting(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._waiters.values())

    def close(self) -> None:
        self._closed.set()


class RedisRecords:
    """The registry's records (see `registry.RecordStore`) in Redis hashes, shared by every API
    process."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @staticmethod
    def _key(kind: str) -> str:
        return f"{PREFIX}records:{kind}"

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self._key(kind), key)
        return None if raw is None else json.loads(raw)

    def put(self, kind: str, key: str, value: dict[str, Any]) -> None:
        self.redis.hset(self._key(kind), key, json.dumps(value))

    def add(self, kind: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
        self.redis.hsetnx(self._key(kind), key, json.dumps(value))
        return self.get(kind, key) or value

    def values(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.hvals(self._key(kind))]

    def delete(self, kind: str, key: str) -> None:
        self.redis.hdel(self._key(kind), key)


def live_workers(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """name -> registration of every worker whose heartbeat is current."""
    names = sorted(as_text(n) for n in client.smembers(WORKERS))
    if not names:
        return {}
    found = client.mget([worker_key(n) for n in names])
    return {n: json.loads(raw) for n, raw in zip(names, found, strict=True) if raw is not None}
