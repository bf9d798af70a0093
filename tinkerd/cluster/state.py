"""What the cluster keeps in Redis, and the objects that read and write it.

The keys are named in `keys`.

Redis is rebuildable from the owners of the state: a worker that sees a new epoch writes back
the models it holds (records, placement, next seq_id) and the requests it holds; the registry
reads runs and checkpoints from the data directory and re-creates a session on first use.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any

import redis
from redis.exceptions import RedisError

from tinkerd.cluster.codec import dump_result, load_result
from tinkerd.cluster.keys import (
    EPOCH,
    LOST,
    PENDING,
    REQUEST,
    RESULT,
    SETTLED,
    WORKERS,
    inflight_key,
    next_key,
    pending_key,
    records_key,
    request_key,
    result_key,
    seen_key,
    worker_key,
)
from tinkerd.results import Result
from tinkerd.sequencing import LUA, RETRY_WINDOW, SKIPPED_FINGERPRINT, Status, parse_record, record
from tinkerd.types import NotFound, ServerError, TinkerdError

log = logging.getLogger(__name__)

# A request record outlives its result, so a late poll learns "expired", not "unknown".
REQUEST_TTL = 7 * 86400
# After Redis comes back empty, how long the workers may take to write back what they hold
# (their next heartbeat; a worker silent longer than its TTL is lost anyway): meanwhile a model
# or request that Redis does not know yet is answered "try again", not "unknown".
REBUILD_SECONDS = 15.0
# A worker keeps its results of this many seconds (at most RECENT_BYTES of them) to store them
# again in a Redis that came back empty before their clients fetched them (they fetch at once).
RECENT_SECONDS = 60.0
RECENT_BYTES = 32 << 20

# Writes back a model's sequence that Redis lost: the seq_ids its worker holds, and the model's
# next seq_id: the worker's next one, moved past those held (as a submit moves it).
# KEYS: seen hash, next key; ARGV: the worker's next seq_id, retry window, then (seq_id, record)
# pairs (`sequencing.record`)
RESTORE_SEQUENCE = (
    LUA
    + """
for i = 3, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
local nxt = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), tonumber(ARGV[1]))
return advance(KEYS[1], KEYS[2], nxt, tonumber(ARGV[2]))
"""
)

# Takes a model's seq_id that never came as skipped, unless it was recorded meanwhile (then its
# record is answered: the worker asks again later). The model's next seq_id moves on past it and
# the seq_ids recorded after it, as a submit's does.
# KEYS: seen hash, next key, request key, inflight set of the worker
# ARGV: seq_id, new request id, worker, retry window, request ttl
SKIP_SEQ = (
    LUA
    + """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then return {RECORDED, v} end
redis.call('HSET', KEYS[1], ARGV[1], record(ARGV[2], '@SKIPPED@'))
local nxt = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) == nxt then advance(KEYS[1], KEYS[2], nxt, tonumber(ARGV[4])) end
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[5])
redis.call('SADD', KEYS[4], ARGV[2])
return {SKIPPED, ARGV[2]}
""".replace("@SKIPPED@", SKIPPED_FINGERPRINT)
)

# Writes back the requests a worker holds (queued or running) that Redis lost, unless settled:
# their record (so a poll finds them), the worker's in-flight set, each tenant's pending count.
# KEYS: the worker's in-flight set; ARGV: worker, request ttl, now, pending ttl, then
# (request id, tenant) pairs
RESTORE_REQUESTS = (
    """
local n = 0
for i = 5, #ARGV, 2 do
  local rid, tenant = ARGV[i], ARGV[i + 1]
  if redis.call('EXISTS', '@RESULT@' .. rid) == 0 then
    redis.call('SET', '@REQUEST@' .. rid, ARGV[1], 'EX', ARGV[2], 'NX')
    redis.call('SADD', KEYS[1], rid)
    if tenant ~= '' then
      redis.call('ZADD', '@PENDING@' .. tenant, ARGV[3], rid)
      redis.call('EXPIRE', '@PENDING@' .. tenant, ARGV[4])
    end
    n = n + 1
  end
end
return n
""".replace("@RESULT@", RESULT)
    .replace("@REQUEST@", REQUEST)
    .replace("@PENDING@", PENDING)
)


def forget_pending(client: redis.Redis, request_ids: list[str]) -> None:
    """Uncount `request_ids` from every tenant's pending set, for a settler that does not know
    their tenants (the reaper). Rare, so a scan of the few tenants' keys will do."""
    if not request_ids:
        return
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=PENDING + "*", count=1000):
        pipe.zrem(key, *request_ids)
    pipe.execute()


def epoch(client: redis.Redis) -> tuple[float, str]:
    """When this Redis's state began (Unix time) and its token, which changes whenever Redis
    comes back empty: the first process to find the key missing sets it."""
    pipe = client.pipeline(transaction=True)
    pipe.set(EPOCH, f"{time.time()} {uuid.uuid4().hex}", nx=True)
    pipe.get(EPOCH)
    began, _, token = as_text(pipe.execute()[1]).partition(" ")
    return float(began), token


class Rebuild:
    """Tells a process whether Redis came back empty moments ago: its epoch is not the one this
    process first saw, and began less than `window` seconds ago (the workers may still be
    writing back what they hold). A Redis that is new to this process is not rebuilding: there
    is nothing to write back."""

    def __init__(self, client: redis.Redis, window: float = REBUILD_SECONDS) -> None:
        self.redis = client
        self.window = window
        self._first: str | None = None
        try:
            self._first = epoch(client)[1]
        except RedisError:
            pass  # Redis is away: the first epoch this process sees counts

    def seconds_left(self) -> float:
        """Seconds left of the window (0 when it is over, or Redis did not come back empty)."""
        began, token = epoch(self.redis)
        if self._first is None:
            self._first = token
        if token == self._first:
            return 0.0
        return max(0.0, began + self.window - time.time())


def restore_sequence(
    client: redis.Redis, model_id: str, next_seq: int, held: dict[int, str]
) -> int:
    """Write back `model_id`'s sequence after Redis lost it: its worker's `next_seq` and the
    seq_ids it `held` (seq_id -> request id), so that later submits continue it. Their
    fingerprints were lost: a retry of a held request is answered its request id, as a skipped
    seq_id's is (`sequencing.SKIPPED_FINGERPRINT`), never run twice. Returns the model's next
    seq_id."""
    args: list[Any] = [next_seq, RETRY_WINDOW]
    for seq_id, request_id in sorted(held.items()):
        args += [seq_id, record(request_id, SKIPPED_FINGERPRINT)]
    keys = [seen_key(model_id), next_key(model_id)]
    return int(client.eval(RESTORE_SEQUENCE, len(keys), *keys, *args))


def skip_seq(client: redis.Redis, model_id: str, seq_id: int, worker: str) -> str | None:
    """Record `model_id`'s `seq_id`, which never came although later ones wait at `worker`, as
    skipped: a new request id that the worker settles with the skip's error, and that the
    request gets should it come after all. None if it was recorded meanwhile (on its way)."""
    request_id = uuid.uuid4().hex
    keys = [seen_key(model_id), next_key(model_id), request_key(request_id), inflight_key(worker)]
    args: list[str | int] = [seq_id, request_id, worker, RETRY_WINDOW, REQUEST_TTL]
    status, _ = client.eval(SKIP_SEQ, len(keys), *keys, *args)
    return request_id if Status(status) is Status.SKIPPED else None


def recorded_request(client: redis.Redis, model_id: str, seq_id: int) -> str | None:
    """The request id recorded for `model_id`'s `seq_id`, None if none is."""
    raw = client.hget(seen_key(model_id), str(seq_id))
    return None if raw is None else parse_record(as_text(raw))[0]


def next_seq_id(client: redis.Redis, model_id: str, default: int) -> int:
    """`model_id`'s lowest seq_id not yet submitted; `default` if Redis has none."""
    return int(client.get(next_key(model_id)) or default)


def restore_requests(
    client: redis.Redis, worker: str, requests: list[tuple[str, str]], pending_ttl: float
) -> int:
    """Write back the (request id, tenant) pairs that `worker` holds, queued or running, after
    Redis lost them, so their clients' polls wait for them; those already settled are left.
    Returns how many were written."""
    if not requests:
        return 0
    args: list[Any] = [worker, REQUEST_TTL, time.time(), int(max(pending_ttl, 1))]
    for request_id, tenant in requests:
        args += [request_id, tenant]
    return int(client.eval(RESTORE_REQUESTS, 1, inflight_key(worker), *args))


def connect(url: str, max_connections: int = 64) -> redis.Redis:
    """A client for `url` with at most `max_connections` connections: a burst of requests
    (10,000 long-polls arriving at once) waits for a free one rather than failing. Getting
    through such a burst takes an API process tens of seconds of CPU, while each poll needs a
    connection a few times, so the wait for a free one is long (60 s), and a healthy Redis is
    never reported unreachable because the pool was busy (with 10 s, up to 5% of 10,000 polls
    got a 503). Short socket timeouts: while Redis is down a connection fails within seconds and
    frees its place, so the API answers 503 quickly instead of holding requests; redis-py
    reconnects on the next command once it is back."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=60,
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
    settle fails (Redis restarting) keeps the result and sends it again on `flush`. A result is
    stored as `codec.dump_result`'s JSON, and read back only into the types it lists.
    """

    def __init__(
        self,
        client: redis.Redis,
        ttl_seconds: float,
        worker: str | None = None,
        rebuild_seconds: float = REBUILD_SECONDS,
    ):
        self.redis = client
        self.ttl = int(max(ttl_seconds, 1))
        self.worker = worker
        self.rebuild = Rebuild(client, rebuild_seconds)
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._unsent: deque[tuple[str, bytes, str | None, str]] = deque()
        # a worker's results of the last RECENT_SECONDS: written again if Redis comes back empty
        # before their clients fetched them
        self._recent: deque[tuple[float, str, bytes]] = deque()
        self._recent_bytes = 0
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()

    # -- settling (workers, and the reaper for a lost worker's requests) ------------------------

    def settle(
        self, request_id: str, result: Result, worker: str | None = None, *, tenant: str = ""
    ) -> None:
        """Store the result, take it off `worker`'s in-flight set and `tenant`'s pending count,
        and wake its waiters."""
        try:
            data = dump_result(result)
        except (TypeError, ValueError) as e:  # a value the codec cannot hold: a backend's bug
            log.error("cannot store the result of %s: %s", request_id, e)
            data = dump_result(Result.failed(ServerError(f"the result cannot be stored: {e}")))
        try:
            self._write(request_id, data, worker or self.worker, tenant)
        except RedisError as e:
            log.warning("cannot store the result of %s yet (%s); will retry", request_id, e)
            self._unsent.append((request_id, data, worker or self.worker, tenant))

    def settle_error(
        self, request_id: str, error: TinkerdError, worker: str | None, *, tenant: str = ""
    ) -> None:
        self.settle(request_id, Result.failed(error), worker, tenant=tenant)

    def _write(self, request_id: str, data: bytes, worker: str | None, tenant: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        key = result_key(request_id)
        pipe.hset(key, "result", data)
        pipe.expire(key, self.ttl)
        if worker is not None:
            pipe.srem(inflight_key(worker), request_id)
        if tenant:
            pipe.zrem(pending_key(tenant), request_id)
        pipe.publish(SETTLED, request_id)
        pipe.execute()
        if self.worker is not None:
            self._keep_recent(request_id, data)

    def _keep_recent(self, request_id: str, data: bytes) -> None:
        with self._lock:
            self._recent.append((time.monotonic(), request_id, data))
            self._recent_bytes += len(data)
            horizon = time.monotonic() - RECENT_SECONDS
            while self._recent and (
                self._recent_bytes > RECENT_BYTES or self._recent[0][0] < horizon
            ):
                self._recent_bytes -= len(self._recent.popleft()[2])

    def rewrite_recent(self) -> int:
        """Store again the results settled here in the last RECENT_SECONDS that Redis lost (it
        came back empty): a client that had not fetched one yet still gets it. Returns how
        many were written."""
        horizon = time.monotonic() - RECENT_SECONDS
        with self._lock:
            recent = [(rid, data) for t, rid, data in self._recent if t >= horizon]
        pipe = self.redis.pipeline(transaction=False)
        for request_id, data in recent:
            key = result_key(request_id)
            pipe.hsetnx(key, "result", data)
            pipe.expire(key, self.ttl)
        written = pipe.execute()[::2] if recent else []
        for request_id, _ in recent:
            self.redis.publish(SETTLED, request_id)
        return sum(bool(w) for w in written)

    def _is_unsent(self, request_id: str) -> bool:
        return any(unsent[0] == request_id for unsent in list(self._unsent))

    def flush(self) -> int:
        """Send the results that could not be stored earlier; returns how many are left."""
        while self._unsent:
            request_id, data, worker, tenant = self._unsent[0]
            try:
                self._write(request_id, data, worker, tenant)
            except RedisError:
                break
            self._unsent.popleft()
        return len(self._unsent)

    # -- waiting (API processes) ----------------------------------------------------------------

    def get(self, request_id: str) -> Result | None:
        data = self.redis.hget(result_key(request_id), "result")
        return None if data is None else load_result(data)

    def wait(self, request_id: str, timeout: float) -> Result | None:
        """The result, or None if it is still pending after `timeout` seconds."""
        result = self.get(request_id)
        if result is not None:
            return result
        worker = self.redis.get(request_key(request_id))
        if worker is None:
            # Redis came back empty moments ago: the worker holding the request may not have
            # written it back yet, so it is pending until then (its result may also come first)
            left = self.rebuild.seconds_left()
            if not left:
                raise NotFound(self._unknown(request_id))
            worker, timeout = b"", min(timeout, left)
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

    def _unknown(self, request_id: str) -> str:
        """Why `request_id` is not known: expired, or lost with Redis's state when Redis came
        back empty after it was sent."""
        began = epoch(self.redis)[0]
        message = f"unknown request_id {request_id!r} (it may have expired)"
        if time.time() - began < REQUEST_TTL:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(began))
            message += (
                f"; if it was sent before {when}, when this Redis's state began (Redis came "
                "back empty: restarted without persistence, or flushed), it was lost with it "
                "before it reached a worker: nothing of it ran, send it again"
            )
        return message

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
    process. Redis may come back empty (`forgets`): the registry then rebuilds what it can."""

    forgets = True

    def __init__(self, client: redis.Redis, rebuild_seconds: float = REBUILD_SECONDS) -> None:
        self.redis = client
        self.rebuild = Rebuild(client, rebuild_seconds)

    def rebuilding(self) -> bool:
        """Whether Redis came back empty so recently that the workers may still be writing
        back the models they hold."""
        return self.rebuild.seconds_left() > 0

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        raw = self.redis.hget(records_key(kind), key)
        return None if raw is None else json.loads(raw)

    def put(self, kind: str, key: str, value: dict[str, Any]) -> None:
        self.redis.hset(records_key(kind), key, json.dumps(value))

    def add(self, kind: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
        self.redis.hsetnx(records_key(kind), key, json.dumps(value))
        return self.get(kind, key) or value

    def values(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.hvals(records_key(kind))]

    def delete(self, kind: str, key: str) -> None:
        self.redis.hdel(records_key(kind), key)


def live_workers(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """name -> registration of every worker whose heartbeat is current."""
    names = sorted(as_text(n) for n in client.smembers(WORKERS))
    if not names:
        return {}
    found = client.mget([worker_key(n) for n in names])
    return {n: json.loads(raw) for n, raw in zip(names, found, strict=True) if raw is not None}


def lost_models(client: redis.Redis) -> dict[str, str]:
    """model id -> why it is gone, of every model lost with its worker."""
    return {as_text(k): as_text(v) for k, v in client.hgetall(LOST).items()}
