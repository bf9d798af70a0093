"""The API side of the cluster: sequencing in Redis, placement, dispatch by Celery.

Any API process may take any request of any model, so the per-model state that `tasks.Scheduler`
keeps in memory lives in Redis and changes only inside Lua scripts (atomic across processes),
which apply the rules of `sequencing` and answer its `Status`: a retried (model_id, seq_id)
returns the first request's id, a clash is refused, and each new request is recorded as in
flight at its worker in the same step. The request then goes by Celery
to the queue of the one worker that owns the model; the worker orders what arrives by seq_id.
The same step counts the request as pending for its tenant (a sorted set by submit time), and
settling it uncounts it, so every API process sees each key's queue.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import kombu.exceptions
import redis
from celery import Celery

from tinkerd import sequencing
from tinkerd.backends import registered_info
from tinkerd.cluster.celery_app import send
from tinkerd.cluster.keys import (
    LOST,
    PLACEMENT,
    STOPPED,
    WORKERS,
    inflight_key,
    next_key,
    pending_key,
    request_key,
    seen_key,
    unordered_seen_key,
)
from tinkerd.cluster.state import (
    REQUEST_TTL,
    RedisFutures,
    as_text,
    live_workers,
    next_seq_id,
)
from tinkerd.results import Result
from tinkerd.sequencing import LUA, MAX_SEQ_AHEAD, RETRY_WINDOW, TAKEN, Status
from tinkerd.tasks import Task
from tinkerd.types import (
    NotFound,
    Payload,
    Rejected,
    RemoveModel,
    Sample,
    SaveWeights,
    ServerError,
    Unavailable,
    error_body,
)

log = logging.getLogger(__name__)

# Counts a new request as pending for its tenant, and drops entries older than the horizon (a
# request whose settle never came: the count cannot leak). KEY: the tenant's pending set;
# ARGS: request id, now ('' for no tenant: nothing to count), horizon, ttl of the set.
COUNT_PENDING = """
local function count_pending(key, rid, now, horizon, ttl)
  if now == '' then return end
  redis.call('ZADD', key, now, rid)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
  redis.call('EXPIRE', key, ttl)
end
"""

# KEYS: seen hash, next key, request key, inflight set of the worker, workers set, pending set
# ARGV: seq_id, fingerprint, new request id, worker, retry window, max ahead, request ttl, now,
# pending horizon, future ttl
SUBMIT_ORDERED = (
    LUA
    + COUNT_PENDING
    + """
local seen = seen_answer(KEYS[1], ARGV[1], ARGV[2])
if seen then return seen end
local seq = tonumber(ARGV[1])
local nxt = tonumber(redis.call('GET', KEYS[2]) or '0')
local refused = order_answer(seq, nxt, tonumber(ARGV[6]))
if refused then return refused end
if ARGV[4] ~= '' and redis.call('SISMEMBER', KEYS[5], ARGV[4]) == 0 then return {LOST, ''} end
redis.call('HSET', KEYS[1], ARGV[1], record(ARGV[3], ARGV[2]))
if seq == nxt then advance(KEYS[1], KEYS[2], nxt, tonumber(ARGV[5])) end
redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[7])
if ARGV[4] ~= '' then
  redis.call('SADD', KEYS[4], ARGV[3])
  count_pending(KEYS[6], ARGV[3], ARGV[8], ARGV[9], ARGV[10])
end
return {NEW, ARGV[3]}
"""
)

# KEYS: seen hash of the sampler key, request key, inflight set of the worker, workers set,
# pending set; ARGV: seq_id, fingerprint, new request id, worker, retry window, request ttl, now,
# pending horizon, future ttl
SUBMIT_UNORDERED = (
    LUA
    + COUNT_PENDING
    + """
local seen = seen_answer(KEYS[1], ARGV[1], ARGV[2])
if seen then return seen end
if redis.call('SISMEMBER', KEYS[4], ARGV[4]) == 0 then return {LOST, ''} end
redis.call('HSET', KEYS[1], ARGV[1], record(ARGV[3], ARGV[2]))
redis.call('EXPIRE', KEYS[1], ARGV[6])
local window = tonumber(ARGV[5])
if redis.call('HLEN', KEYS[1]) > 2 * window then
  local horizon = tonumber(ARGV[1]) - window
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if tonumber(f) < horizon then redis.call('HDEL', KEYS[1], f) end
  end
end
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[6])
redis.call('SADD', KEYS[3], ARGV[3])
count_pending(KEYS[5], ARGV[3], ARGV[7], ARGV[8], ARGV[9])
return {NEW, ARGV[3]}
"""
)


# What sending raises while Redis is unreachable (kombu wraps some of Redis's errors).
UNREACHABLE = (
    kombu.exceptions.OperationalError,
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)


class Outbox:
    """The requests this API process recorded in Redis but could not hand to Celery (Redis went
    away between the two steps), and the results it could not store: a thread sends them again
    every `interval` until Redis takes them. A request older than `max_age` is not sent but
    failed, with that reason: an ordered one as a rejected request in its model's order (its
    worker holds the model's later requests for it), a sample straight away."""

    def __init__(
        self, celery: Celery, futures: RedisFutures, max_age: float, interval: float = 0.5
    ) -> None:
        self.celery = celery
        self.futures = futures
        self.max_age = max_age
        self.interval = interval
        self._held: list[tuple[str, str, Task, float]] = []  # worker, kind, task, first failure
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def add(self, worker: str, kind: str, task: Task) -> None:
        with self._lock:
            self._held.append((worker, kind, task, time.monotonic()))
        self.start()

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def start(self) -> Outbox:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tinkerd-outbox", daemon=True
                )
                self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the thread must outlive any error
                log.exception("outbox round failed")

    def flush(self) -> int:
        """One round: send what is held, oldest first, until Redis refuses; returns how many
        are left."""
        self.futures.flush()
        while True:
            with self._lock:
                if not self._held:
                    return 0
                worker, kind, task, since = self._held[0]
            age = time.monotonic() - since
            if age > self.max_age and not isinstance(task.payload, Rejected):
                renewed = self._expired(worker, kind, task, age)
                if renewed is None:  # a sample: failed outright
                    self._pop()
                    continue
                task = renewed
                with self._lock:
                    self._held[0] = (worker, kind, task, since)
            try:
                send(self.celery, worker, kind, task)
            except UNREACHABLE as e:
                log.debug("outbox: Redis still refuses (%s); %d held", e, self.held())
                with self._lock:
                    return len(self._held)
            except Exception as e:  # the broker refused it: sending it again would not help
                error = ServerError(f"could not queue the request to {worker}: {e}")
                self.futures.settle_error(task.request_id, error, worker, tenant=task.tenant)
                self._pop()
                continue
            log.info("request %s sent to worker %s after %.1f s", task.request_id, worker, age)
            self._pop()

    def _pop(self) -> None:
        with self._lock:
            self._held.pop(0)

    def _expired(self, worker: str, kind: str, task: Task, age: float) -> Task | None:
        error = ServerError(
            f"request {task.request_id} could not be sent to worker {worker}: Redis was "
            f"unreachable for {age:.0f} s; nothing of it was applied, send it again"
        )
        log.error("%s", error.message)
        if kind == "ordered":
            rejected = Rejected(error_body(error))
            return Task(task.request_id, task.model_id, task.seq_id, rejected, task.tenant)
        self.futures.settle_error(task.request_id, error, worker, tenant=task.tenant)
        return None


class RedisScheduler:
    """`tasks.TaskQueue` for API processes: the same contract as the in-process Scheduler."""

    def __init__(
        self,
        client: redis.Redis,
        celery: Celery,
        futures: RedisFutures,
        send_retry_seconds: float = 120.0,
    ) -> None:
        self.redis = client
        self.celery = celery
        self.futures = futures
        self.outbox = Outbox(celery, futures, send_retry_seconds)
        self._submit_ordered = client.register_script(SUBMIT_ORDERED)
        self._submit_unordered = client.register_script(SUBMIT_UNORDERED)

    # -- placement ------------------------------------------------------------------------------

    def open_model(self, model_id: str) -> None:
        """Place a new model on the live worker with the fewest models, then the most free
        memory (its backend's `BackendInfo`); a retried create keeps the first placement."""
        if self.redis.hexists(PLACEMENT, model_id):
            return
        workers = self._open_workers()
        placed: dict[str, int] = {}
        for held, owner in self.redis.hgetall(PLACEMENT).items():
            if b":sample:" not in held:  # a snapshot rides on its model's adapter
                placed[as_text(owner)] = placed.get(as_text(owner), 0) + 1
        free = {n: registered_info(w).memory_free for n, w in workers.items()}
        name = min(workers, key=lambda n: (placed.get(n, 0), -free[n], n))
        self.redis.hsetnx(PLACEMENT, model_id, name)

    def _open_workers(self) -> dict[str, dict[str, Any]]:
        """The live workers that take new work (not draining for a shutdown)."""
        workers = {n: w for n, w in live_workers(self.redis).items() if not w.get("draining")}
        if not workers:
            raise Unavailable(
                "no tinkerd worker is running: start one with `tinkerd worker --redis URL`"
            )
        return workers

    def has_model(self, model_id: str) -> bool:
        return any(self.redis.hexists(key, model_id) for key in (PLACEMENT, LOST, STOPPED))

    def model_status(self, model_id: str) -> dict[str, str]:
        worker = self.worker_of(model_id)
        if worker is not None:
            return {"status": "active", "worker": worker}
        lost = self.redis.hget(LOST, model_id)
        if lost is not None:
            return {"status": "lost", "lost_reason": as_text(lost)}
        stopped = self.redis.hget(STOPPED, model_id)
        if stopped is not None:  # saved by a clean stop: back when a worker starts
            return {"status": "stopped", "stopped_reason": as_text(stopped)}
        return {"status": "inactive"}

    def worker_of(self, model_id: str) -> str | None:
        owner = self.redis.hget(PLACEMENT, model_id)
        return as_text(owner) if owner is not None else None

    def _sampling_worker(self, sample: Sample) -> str:
        """A snapshot lives on its model's worker; anything else may run on any worker, best one
        that already holds the base model, then the least busy."""
        if sample.weights.snapshot_id is not None:
            owner = self.worker_of(sample.weights.snapshot_id)
            return owner or ""  # "" = lost: answered with the lost error below
        workers = self._open_workers()
        pipe = self.redis.pipeline(transaction=False)
        for name in workers:
            pipe.scard(inflight_key(name))
        busy = dict(zip(workers, pipe.execute(), strict=True))
        return min(
            workers,
            key=lambda n: (
                sample.weights.base_model not in registered_info(workers[n]).base_models,
                busy[n],
                n,
            ),
        )

    # -- submitting ------------------------------------------------------------------------------

    def submit(
        self,
        model_id: str,
        seq_id: int,
        payload: Payload,
        fingerprint: str,
        *,
        tenant: str = "",
        priority: int = 0,
    ) -> str:
        status, value = self._submit(model_id, seq_id, payload, fingerprint, tenant, priority)
        return sequencing.answer(status, value, model_id, seq_id)

    def _submit(
        self,
        model_id: str,
        seq_id: int,
        payload: Payload,
        fingerprint: str,
        tenant: str,
        priority: int,
    ) -> tuple[Status, str]:
        """Record (model_id, seq_id) in Redis and, if new, send it to the model's worker: the
        seq_id's answer, and the request id (or, refused, the model's next seq_id)."""
        worker = self.worker_of(model_id)
        lost = None
        if worker is None:
            lost = self.redis.hget(LOST, model_id)
            if lost is None and (stopped := self.redis.hget(STOPPED, model_id)) is not None:
                raise Unavailable(f"model {model_id}: {as_text(stopped)}; send it again then")
            if lost is None:
                raise NotFound(f"unknown model_id {model_id!r}")
        request_id = uuid.uuid4().hex
        keys = [
            seen_key(model_id),
            next_key(model_id),
            request_key(request_id),
            inflight_key(worker or ""),
            WORKERS,
            pending_key(tenant),
        ]
        args = [
            seq_id,
            fingerprint,
            request_id,
            worker or "",
            RETRY_WINDOW,
            MAX_SEQ_AHEAD,
            REQUEST_TTL,
            *self._pending_window(tenant),
        ]
        status, value = self._answer(self._submit_ordered(keys=keys, args=args))
        if status is Status.LOST:  # the worker was reaped after we read the placement
            lost = self.redis.hget(LOST, model_id) or b"its worker was lost"
            args = [*args[:3], "", *args[4:]]
            status, value = self._answer(self._submit_ordered(keys=keys, args=args))
        if status is not Status.NEW:
            return status, value
        if isinstance(payload, RemoveModel):
            self._forget(model_id)
        if lost is not None:
            error = ServerError(as_text(lost))
            self.futures.settle_error(request_id, error, None, tenant=tenant)
            return status, request_id
        assert worker is not None
        if isinstance(payload, SaveWeights) and payload.snapshot_id is not None:
            self.redis.hset(PLACEMENT, payload.snapshot_id, worker)
        task = Task(request_id, model_id, seq_id, payload, tenant, priority)
        self._send(worker, "ordered", task)
        return status, request_id

    @staticmethod
    def _answer(reply: list[Any]) -> tuple[Status, str]:
        """A submit script's reply: its `sequencing.Status` and value."""
        status, value = reply
        return Status(int(status)), as_text(value)

    def _forget(self, model_id: str) -> None:
        """A model being removed takes no more requests (they are answered 404) and no longer
        counts in placement; its worker still gets the RemoveModel, after its queued work."""
        snapshots = list(self.redis.hscan_iter(PLACEMENT, match=f"{model_id}:sample:*"))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(PLACEMENT, model_id, *(key for key, _ in snapshots))
        pipe.hdel(LOST, model_id)
        pipe.delete(seen_key(model_id), next_key(model_id))
        pipe.execute()

    def submit_next(
        self, model_id: str, payload: Payload, *, tenant: str = "", priority: int = 0
    ) -> str:
        """The lowest seq_id not yet taken; if another API process takes it first (a clash of
        fingerprints, each being new), the next one."""
        fingerprint = uuid.uuid4().hex
        while True:
            seq_id = next_seq_id(self.redis, model_id, 0)
            status, value = self._submit(model_id, seq_id, payload, fingerprint, tenant, priority)
            if status not in TAKEN:
                return sequencing.answer(status, value, model_id, seq_id)

    def submit_unordered(
        self,
        key: str,
        seq_id: int,
        payload: Payload,
        fingerprint: str,
        *,
        tenant: str = "",
        priority: int = 0,
    ) -> str:
        if not isinstance(payload, Sample):
            raise ServerError(f"unordered {type(payload).__name__} is not supported")
        worker = self._sampling_worker(payload)
        request_id = uuid.uuid4().hex
        keys = [
            unordered_seen_key(key),
            request_key(request_id),
            inflight_key(worker),
            WORKERS,
            pending_key(tenant),
        ]
        args = [
            seq_id,
            fingerprint,
            request_id,
            worker,
            RETRY_WINDOW,
            REQUEST_TTL,
            *self._pending_window(tenant),
        ]
        status, value = self._answer(self._submit_unordered(keys=keys, args=args))
        if status is Status.LOST:
            why = self.redis.hget(LOST, payload.weights.snapshot_id or "")
            raise ServerError(
                as_text(why) if why else f"the worker chosen for {key} is gone; try again"
            )
        if status is not Status.NEW:
            return sequencing.answer(status, value, key, seq_id)
        self._send(worker, "unordered", Task(request_id, key, seq_id, payload, tenant, priority))
        return request_id

    def _send(self, worker: str, kind: str, task: Task) -> None:
        """Hand a recorded request to its worker's queue; if Redis went away since it was
        recorded, the outbox sends it once Redis is back (the client polls meanwhile)."""
        try:
            send(self.celery, worker, kind, task)
        except UNREACHABLE as e:
            log.warning("request %s recorded but not yet sent (%s); retrying", task.request_id, e)
            self.outbox.add(worker, kind, task)
        except Exception as e:  # the broker refused it: sending it again would not help
            error = ServerError(f"could not queue the request to {worker}: {e}")
            self.futures.settle_error(task.request_id, error, worker, tenant=task.tenant)

    def _pending_window(self, tenant: str) -> tuple[float | str, float, int]:
        """The submit scripts' now, horizon and set ttl for counting pending requests: an entry
        outlives its future's TTL only if its settle never came (a crash), and is then dropped.
        Without a tenant (a server without keys: no limits) nothing is counted, saving the
        submit its share of Redis time."""
        now = time.time()
        return (now if tenant else ""), now - self.futures.ttl, self.futures.ttl

    def pending(self, tenant: str) -> int:
        """`tenant`'s requests submitted and not yet settled, across every API process (0 for
        "", which is not counted here)."""
        horizon = time.time() - self.futures.ttl
        return int(self.redis.zcount(pending_key(tenant), f"({horizon}", "+inf"))

    # -- futures ---------------------------------------------------------------------------------

    def wait(self, request_id: str, timeout: float) -> Result | None:
        return self.futures.wait(request_id, timeout)

    def queue_depth(self) -> int:
        names = [as_text(n) for n in self.redis.smembers(WORKERS)]
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.scard(inflight_key(name))
        return int(sum(pipe.execute())) if names else 0
