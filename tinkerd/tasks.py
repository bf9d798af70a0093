"""The queue between the API and the workers: ordered, de-duplicated tasks and their futures.

The API submits plain data keyed by (model_id, seq_id) and gets a request id at once. Each model's
tasks are released to its worker strictly in seq_id order, however they arrive (the SDK sends chunk
1 of a large batch last), and a retried (model_id, seq_id) returns the first request's id instead of
running twice. Workers settle futures with encoded bodies; the API long-polls them.

`Scheduler` holds this state in process. Alone on one box (`tinkerd serve`) it is the whole queue;
scaled out, the API's `cluster.RedisScheduler` does the sequencing and de-duplication in Redis and
each worker process keeps a `Scheduler` that only orders what Celery delivers to it (`enqueue`),
so the worker's loop is the same in both modes.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from tinkerd.types import NotFound, Payload, RemoveModel, ServerError, UserError

# How far ahead of a model's next seq_id a request may arrive (buffered until its turn).
MAX_SEQ_AHEAD = 100_000
# How many past seq_ids per model (and unordered requests) are remembered to de-duplicate retries.
RETRY_WINDOW = 10_000


@dataclass(frozen=True)
class Result:
    """A settled future, already encoded for the wire."""

    body: bytes
    content_type: str = "application/json"


@dataclass
class Task:
    request_id: str
    model_id: str
    seq_id: int
    payload: Payload
    queued_at: float = field(default_factory=time.monotonic)


class TaskQueue(Protocol):
    """What the API needs from the queue to the workers: in-process `Scheduler`, or
    `cluster.RedisScheduler` in front of Celery workers."""

    def open_model(self, model_id: str) -> None: ...

    def submit(self, model_id: str, seq_id: int, payload: Payload, fingerprint: str) -> str: ...

    def submit_next(self, model_id: str, payload: Payload) -> str:
        """Queue `payload` as the model's next request, the server choosing its seq_id (for
        clients that send no seq_ids: the simple JSON API, the CLI)."""
        ...

    def submit_unordered(
        self, key: str, seq_id: int, payload: Payload, fingerprint: str
    ) -> str: ...

    def wait(self, request_id: str, timeout: float) -> Result | None: ...

    def queue_depth(self) -> int: ...

    def model_status(self, model_id: str) -> dict[str, str]:
        """{"status": "active"|"inactive"|"lost", and "worker" or "lost_reason"}."""
        ...


@dataclass
class _ModelQueue:
    next_seq: int
    pending: dict[int, Task] = field(default_factory=dict)
    seen: dict[int, tuple[str, str]] = field(
        default_factory=dict
    )  # seq_id -> (request_id, fingerprint)
    removed: bool = False  # a RemoveModel is queued: the model takes no more requests


class FutureStore:
    """request_id -> Result, with a blocking wait per future and expiry of settled results."""

    def __init__(self, ttl_seconds: float = 3600.0) -> None:
        self._ttl = ttl_seconds
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._results: dict[str, tuple[Result, float]] = {}

    def create(self) -> str:
        request_id = uuid.uuid4().hex
        with self._lock:
            self._events[request_id] = threading.Event()
        return request_id

    def settle(self, request_id: str, result: Result) -> None:
        with self._lock:
            event = self._events.pop(request_id, None)
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

    def pending(self) -> int:
        with self._lock:
            return len(self._events)

    def _expire(self) -> None:
        now = time.monotonic()
        if len(self._results) % 256 == 0:
            for key in [k for k, (_, deadline) in self._results.items() if deadline < now]:
                del self._results[key]


class Scheduler:
    """Per-model ordering and de-duplication, and the hand-off of ready work to the worker."""

    def __init__(self, futures: FutureStore | None = None) -> None:
        self.futures = futures or FutureStore()
        self._cond = threading.Condition()
        self._queues: dict[str, _ModelQueue] = {}
        self._ready: set[str] = set()
        self._unordered: list[Task] = []
        self._unordered_seen: OrderedDict[tuple[str, int], tuple[str, str]] = OrderedDict()
        self._closed: str | None = None

    def close(self, reason: str) -> None:
        """Refuse new work from now on (503 with `reason`): the server is draining."""
        with self._cond:
            self._closed = reason

    def _check_open(self) -> None:
        if self._closed is not None:
            raise ServerError(self._closed, 503)

    def has_ready(self) -> bool:
        """Whether some queued work can run now (not counting work waiting for a seq_id)."""
        with self._cond:
            return bool(self._ready or self._unordered)

    def fail_pending(self, result: Result) -> list[str]:
        """Settle every queued task with `result` and forget them; their request ids."""
        with self._cond:
            tasks = [t for q in self._queues.values() for t in q.pending.values()]
            tasks += self._unordered
            for queue in self._queues.values():
                queue.pending.clear()
            self._unordered = []
            self._ready.clear()
        for task in tasks:
            self.futures.settle(task.request_id, result)
        return [t.request_id for t in tasks]

    def open_model(self, model_id: str) -> None:
        """Start a model's sequence: its creation is seq 0, the client's requests follow from 1."""
        with self._cond:
            self._check_open()
            self._queues.setdefault(model_id, _ModelQueue(next_seq=0))

    def has_model(self, model_id: str) -> bool:
        with self._cond:
            return model_id in self._queues

    def model_status(self, model_id: str) -> dict[str, str]:
        if self.has_model(model_id):
            return {"status": "active", "worker": "local"}
        return {"status": "inactive"}  # a run from before this server started

    def submit(self, model_id: str, seq_id: int, payload: Payload, fingerprint: str) -> str:
        """Queue `payload` as (model_id, seq_id); returns its request id (the first one's for a
        retry)."""
        with self._cond:
            self._check_open()
            queue = self._queues.get(model_id)
            if queue is None or queue.removed:
                raise NotFound(f"unknown model_id {model_id!r}")
            if seq_id in queue.seen:
                request_id, first_fingerprint = queue.seen[seq_id]
                if first_fingerprint != fingerprint:
                    raise UserError(
                        f"seq_id {seq_id} of {model_id} was already used by a different request"
                    )
                return request_id
            if seq_id < queue.next_seq:
                raise UserError(
                    f"seq_id {seq_id} is in the past: {model_id} is already at "
                    f"seq_id {queue.next_seq}"
                )
            if seq_id > queue.next_seq + MAX_SEQ_AHEAD:
                raise UserError(f"seq_id {seq_id} is too far ahead of {queue.next_seq}")
            request_id = self.futures.create()
            queue.seen[seq_id] = (request_id, fingerprint)
            if isinstance(payload, RemoveModel):
                queue.removed = True
            self._enqueue_locked(queue, Task(request_id, model_id, seq_id, payload))
            return request_id

    def submit_next(self, model_id: str, payload: Payload) -> str:
        with self._cond:
            queue = self._queues.get(model_id)
            if queue is None or queue.removed:
                raise NotFound(f"unknown model_id {model_id!r}")
            seq_id = max(queue.next_seq, max(queue.seen, default=-1) + 1)
            return self.submit(model_id, seq_id, payload, uuid.uuid4().hex)

    def enqueue(self, task: Task) -> None:
        """Queue a task that was already sequenced and de-duplicated upstream (a worker process
        fed by Celery): it runs in its model's seq_id order; a redelivered one is dropped."""
        with self._cond:
            queue = self._queues.setdefault(task.model_id, _ModelQueue(next_seq=0))
            if task.seq_id < queue.next_seq or task.seq_id in queue.pending:
                return
            self._enqueue_locked(queue, task)

    def gaps(self, min_age: float) -> list[tuple[str, int]]:
        """(model_id, seq_id) of each model whose next request has not arrived although a later
        one has been waiting for `min_age` seconds. A worker process asks Redis about these: an
        API process may have died between recording a request and sending it."""
        now = time.monotonic()
        with self._cond:
            return [
                (model_id, queue.next_seq)
                for model_id, queue in self._queues.items()
                if queue.pending
                and queue.next_seq not in queue.pending
                and now - min(t.queued_at for t in queue.pending.values()) >= min_age
            ]

    def _enqueue_locked(self, queue: _ModelQueue, task: Task) -> None:
        queue.pending[task.seq_id] = task
        if task.seq_id == queue.next_seq:
            self._ready.add(task.model_id)
            self._cond.notify_all()

    def submit_unordered(self, key: str, seq_id: int, payload: Payload, fingerprint: str) -> str:
        """Queue work that needs no order (sampling), runnable at once; a retried (key, seq_id)
        returns the first request's id."""
        with self._cond:
            self._check_open()
            seen = self._unordered_seen.get((key, seq_id))
            if seen is not None:
                if seen[1] != fingerprint:
                    raise UserError(
                        f"seq_id {seq_id} of {key} was already used by a different request"
                    )
                return seen[0]
            request_id = self.futures.create()
            self._unordered_seen[(key, seq_id)] = (request_id, fingerprint)
            while len(self._unordered_seen) > RETRY_WINDOW:
                self._unordered_seen.popitem(last=False)
            self._unordered.append(Task(request_id, key, seq_id, payload))
            self._cond.notify_all()
            return request_id

    def enqueue_unordered(self, task: Task) -> None:
        """Queue an unordered task that was de-duplicated upstream."""
        with self._cond:
            self._unordered.append(task)
            self._cond.notify_all()

    def take_ready(self, timeout: float) -> list[list[Task]]:
        """Every model's runnable tasks, each list in seq order, then the unordered tasks as one
        list; waits up to `timeout` for some."""
        with self._cond:
            if not self._ready and not self._unordered:
                self._cond.wait(timeout)
            batches = []
            for model_id in sorted(self._ready):
                queue = self._queues[model_id]
                tasks: list[Task] = []
                while queue.next_seq in queue.pending:
                    tasks.append(queue.pending.pop(queue.next_seq))
                    queue.next_seq += 1
                    if isinstance(tasks[-1].payload, RemoveModel):
                        break
                batches.append(tasks)
                if tasks and isinstance(tasks[-1].payload, RemoveModel):  # its last: forget it
                    del self._queues[model_id]
                elif len(queue.seen) > 2 * RETRY_WINDOW:
                    horizon = queue.next_seq - RETRY_WINDOW
                    queue.seen = {k: v for k, v in queue.seen.items() if k >= horizon}
            self._ready.clear()
            if self._unordered:
                batches.append(self._unordered)
                self._unordered = []
            return batches

    def take_unordered(self, timeout: float) -> list[Task]:
        """The waiting unordered tasks; waits up to `timeout` for some."""
        with self._cond:
            if not self._unordered:
                self._cond.wait(timeout)
            tasks, self._unordered = self._unordered, []
            return tasks

    def settle(self, request_id: str, result: Result) -> None:
        self.futures.settle(request_id, result)

    def wait(self, request_id: str, timeout: float) -> Result | None:
        return self.futures.wait(request_id, timeout)

    def queue_depth(self) -> int:
        with self._cond:
            return sum(len(q.pending) for q in self._queues.values()) + len(self._unordered)
