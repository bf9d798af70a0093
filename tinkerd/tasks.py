"""The queue between the API and the workers: ordered, de-duplicated tasks and their futures.

The API submits plain data keyed by (model_id, seq_id) and gets a request id at once. Each model's
tasks are released to its worker strictly in seq_id order, however they arrive (the SDK sends chunk
1 of a large batch last), and a retried (model_id, seq_id) returns the first request's id instead of
running twice. Workers settle futures (`futures.FutureStore`) with typed results (`results.Result`);
the API long-polls them and encodes each for its client.

`Scheduler` holds this state in process. Alone on one box (`tinkerd serve`) it is the whole queue;
scaled out, the API's `cluster.RedisScheduler` does the sequencing and de-duplication in Redis and
each worker process keeps a `Scheduler` that only orders what Celery delivers to it (`enqueue`),
so the worker's loop is the same in both modes.

Each request carries its API key's name (`tenant`, "" on a server without keys) and priority.
`take_ready` hands out one training step per cycle, of the models with the highest effective
priority (see `effective_priority`), and `pending(tenant)` counts a key's unsettled requests.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from math import floor
from typing import Protocol

from tinkerd import sequencing
from tinkerd.futures import Futures, FutureStore
from tinkerd.results import Result
from tinkerd.sequencing import RETRY_WINDOW, SKIPPED_FINGERPRINT, Gap, Status, skipped_message
from tinkerd.types import (
    CreateModel,
    NotFound,
    OptimStep,
    Payload,
    Rejected,
    RemoveModel,
    ServerError,
    TinkerdError,
    UserError,
    error_body,
)

log = logging.getLogger(__name__)

AGING_SECONDS = 2.0
"""Waiting this long raises a request's priority by one. A key's priority (0-10) decides who runs
first while the worker is contended; aging keeps a low key from starving behind a busy high one:
a ready request climbs one level per AGING_SECONDS, so it waits at most about 20 s behind a
saturating priority-10 key. That is long against a training step (well under a second here), so
priority still decides under ordinary contention, and short against a client's patience."""


@dataclass
class Task:
    request_id: str
    model_id: str
    seq_id: int
    payload: Payload
    tenant: str = ""  # the API key's name ("" without keys)
    priority: int = 0  # the key's priority: higher runs first
    queued_at: float = field(default_factory=time.monotonic)


def effective_priority(task: Task, now: float, waiting_since: float | None = None) -> float:
    """The task's priority plus one per AGING_SECONDS it has waited (since `waiting_since`, if
    later than its arrival)."""
    since = task.queued_at if waiting_since is None else max(task.queued_at, waiting_since)
    return task.priority + max(now - since, 0.0) / AGING_SECONDS


def by_priority(tasks: list[Task]) -> list[Task]:
    """`tasks` by effective priority, highest first; equals keep their order."""
    now = time.monotonic()
    return sorted(tasks, key=lambda t: -effective_priority(t, now))


class TaskQueue(Protocol):
    """What the API needs from the queue to the workers: in-process `Scheduler`, or
    `cluster.RedisScheduler` in front of Celery workers."""

    def open_model(self, model_id: str) -> None: ...

    def submit(
        self,
        model_id: str,
        seq_id: int,
        payload: Payload,
        fingerprint: str,
        *,
        tenant: str = "",
        priority: int = 0,
    ) -> str: ...

    def submit_next(
        self, model_id: str, payload: Payload, *, tenant: str = "", priority: int = 0
    ) -> str:
        """Queue `payload` as the model's next request, the server choosing its seq_id (for
        clients that send no seq_ids: the simple JSON API, the CLI)."""
        ...

    def submit_unordered(
        self,
        key: str,
        seq_id: int,
        payload: Payload,
        fingerprint: str,
        *,
        tenant: str = "",
        priority: int = 0,
    ) -> str: ...

    def pending(self, tenant: str) -> int:
        """How many of `tenant`'s requests are submitted and not yet settled (queued or
        running). "" (a server without keys) is counted in process only."""
        ...

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
    served_at: float = 0.0  # when a step of it was last taken: its wait for a turn starts anew


class Scheduler:
    """Per-model ordering and de-duplication, and the hand-off of ready work to the worker.

    With `gap_seconds` (the whole queue, `tinkerd serve`), a model's missing next request is
    skipped once a later one has waited that long for it (`skip_gaps`): a request the server
    refused before recording it, or a client that died mid-send, must not stall the model for
    good. A worker process fed by Celery leaves it None: Redis decides its gaps (`fill_gaps`)."""

    def __init__(self, futures: Futures | None = None, gap_seconds: float | None = None) -> None:
        self.futures: Futures = futures or FutureStore()
        self.gap_seconds = gap_seconds
        self._next_gap_check = 0.0
        self._cond = threading.Condition()
        self._queues: dict[str, _ModelQueue] = {}
        self._ready: set[str] = set()
        self._unordered: list[Task] = []
        self._unordered_seen: OrderedDict[tuple[str, int], tuple[str, str]] = OrderedDict()
        self._closed: str | None = None

    def _store(self) -> FutureStore:
        """The store submissions create futures in and count them by: only a whole queue's
        (a cluster worker's Scheduler orders tasks that Redis took, and never submits)."""
        if not isinstance(self.futures, FutureStore):
            raise ServerError("this scheduler only orders tasks submitted through Redis")
        return self.futures

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
            self.futures.settle(task.request_id, result, tenant=task.tenant)
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
        """Queue `payload` as (model_id, seq_id) for `tenant`; returns its request id (the first
        one's for a retry)."""
        with self._cond:
            self._check_open()
            queue = self._queues.get(model_id)
            if queue is None or queue.removed:
                raise NotFound(f"unknown model_id {model_id!r}")
            seen = queue.seen.get(seq_id)
            status, value = sequencing.ordered(seen, fingerprint, seq_id, queue.next_seq)
            if status is not Status.NEW:
                return sequencing.answer(status, value, model_id, seq_id)
            request_id = self._store().create(tenant)
            queue.seen[seq_id] = (request_id, fingerprint)
            if isinstance(payload, RemoveModel):
                queue.removed = True
            task = Task(request_id, model_id, seq_id, payload, tenant, priority)
            self._enqueue_locked(queue, task)
            return request_id

    def submit_next(
        self, model_id: str, payload: Payload, *, tenant: str = "", priority: int = 0
    ) -> str:
        with self._cond:
            queue = self._queues.get(model_id)
            if queue is None or queue.removed:
                raise NotFound(f"unknown model_id {model_id!r}")
            seq_id = max(queue.next_seq, max(queue.seen, default=-1) + 1)
            return self.submit(
                model_id, seq_id, payload, uuid.uuid4().hex, tenant=tenant, priority=priority
            )

    def enqueue(self, task: Task) -> None:
        """Queue a task that was already sequenced and de-duplicated upstream (a worker process
        fed by Celery): it runs in its model's seq_id order; a redelivered one is dropped. A
        model's sequence here starts at its CreateModel: seq 0 for a new model, later for one
        handed over by a worker that shut down (re-created from its state, then its queue)."""
        with self._cond:
            queue = self._queues.get(task.model_id)
            creation = isinstance(task.payload, CreateModel)
            if queue is None:
                queue = self._queues[task.model_id] = _ModelQueue(task.seq_id if creation else 0)
            elif creation and queue.next_seq == 0 and 0 not in queue.pending:
                queue.next_seq = task.seq_id  # a hand-over's later requests arrived first
            if task.seq_id < queue.next_seq or task.seq_id in queue.pending:
                return
            self._enqueue_locked(queue, task)

    def take_model(self, model_id: str) -> tuple[int, list[Task]]:
        """Forget a model here, handing back its next seq_id and its queued tasks in order (a
        worker shutting down passes them on with the model's state)."""
        with self._cond:
            queue = self._queues.pop(model_id, None)
            self._ready.discard(model_id)
        if queue is None:
            return 0, []
        return queue.next_seq, [queue.pending[s] for s in sorted(queue.pending)]

    def models(self) -> list[str]:
        with self._cond:
            return list(self._queues)

    def waiting(self) -> tuple[dict[str, int], list[Task]]:
        """Each model's next seq_id here, and every task queued (ordered or not): what a worker
        process writes back to a Redis that came back empty."""
        with self._cond:
            nexts = {model_id: queue.next_seq for model_id, queue in self._queues.items()}
            tasks = [t for queue in self._queues.values() for t in queue.pending.values()]
            return nexts, tasks + self._unordered

    def gaps(self, min_age: float) -> list[Gap]:
        """Each model whose next request has not arrived although a later one has been waiting
        for `min_age` seconds. Alone, the scheduler skips these (`skip_gaps`); a worker process
        asks Redis about them (an API process may have died between recording a request and
        sending it, or the client never sent it)."""
        now = time.monotonic()
        found = []
        with self._cond:
            for model_id, queue in self._queues.items():
                if not queue.pending or queue.next_seq in queue.pending:
                    continue
                oldest = min(queue.pending.values(), key=lambda t: t.queued_at)
                if now - oldest.queued_at >= min_age:
                    found.append(Gap(model_id, queue.next_seq, oldest.tenant, oldest.priority))
        return found

    def skip_gaps(self, min_age: float) -> list[Gap]:
        """Skip each model's missing next request that later ones have waited `min_age`
        seconds for (see `gaps`), logging each: it takes the seq_id as a rejected request, so
        the later ones run, and the request itself, if it comes after all, gets that error."""
        skipped = self.gaps(min_age)
        for gap in skipped:
            log.warning(
                "model %s: seq_id %d never arrived although later requests waited %.0f s for "
                "it; skipping it so they run",
                gap.model_id,
                gap.seq_id,
                min_age,
            )
            self.fill_gap(gap, UserError(skipped_message(gap, min_age)))
        return skipped

    def fill_gap(self, gap: Gap, error: TinkerdError, request_id: str | None = None) -> str:
        """Take `gap`'s seq_id as a rejected request that settles to `error` in its turn (as
        `request_id`, made here when None), remembered as skipped; returns the request id. A
        seq_id that arrived meanwhile is left alone (its own request id is returned)."""
        with self._cond:
            queue = self._queues.get(gap.model_id)
            if queue is None or gap.seq_id < queue.next_seq or gap.seq_id in queue.pending:
                return request_id or ""
            request_id = request_id or self._store().create(gap.tenant)
            queue.seen.setdefault(gap.seq_id, (request_id, SKIPPED_FINGERPRINT))
            rejected = Rejected(error_body(error))
            task = Task(request_id, gap.model_id, gap.seq_id, rejected, gap.tenant, gap.priority)
            self._enqueue_locked(queue, task)
            return request_id

    def _enqueue_locked(self, queue: _ModelQueue, task: Task) -> None:
        queue.pending[task.seq_id] = task
        if task.seq_id == queue.next_seq:
            self._ready.add(task.model_id)
            self._cond.notify_all()

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
        """Queue work that needs no order (sampling), runnable at once; a retried (key, seq_id)
        returns the first request's id."""
        with self._cond:
            self._check_open()
            seen = self._unordered_seen.get((key, seq_id))
            status, value = sequencing.unordered(seen, fingerprint)
            if status is not Status.NEW:
                return sequencing.answer(status, value, key, seq_id)
            request_id = self._store().create(tenant)
            self._unordered_seen[(key, seq_id)] = (request_id, fingerprint)
            while len(self._unordered_seen) > RETRY_WINDOW:
                self._unordered_seen.popitem(last=False)
            self._unordered.append(Task(request_id, key, seq_id, payload, tenant, priority))
            self._cond.notify_all()
            return request_id

    def enqueue_unordered(self, task: Task) -> None:
        """Queue an unordered task that was de-duplicated upstream."""
        with self._cond:
            self._unordered.append(task)
            self._cond.notify_all()

    def take_ready(self, timeout: float, unordered: bool = True) -> list[list[Task]]:
        """The next step of each model whose turn it is, highest effective priority first, each
        list in seq order, then (unless `unordered` is False: a sampling thread takes them) the
        unordered tasks as one list; waits up to `timeout` for some.

        A step is a model's runnable tasks up to and including its next optim_step (all of
        them if none is queued). It is the turn of the models at the highest priority level
        (`effective_priority`, rounded down) among those with a step ready: the others wait
        for a cycle in which nothing above them is ready, climbing a level per AGING_SECONDS
        meanwhile. A model's wait starts when its next request arrives or its last step was
        taken, whichever is later, so a long backlog gains no seniority over a newcomer."""
        with self._cond:
            self._skip_old_gaps()
            if not self._ready and not (unordered and self._unordered):
                self._cond.wait(timeout)
                self._skip_old_gaps()
            batches = [self._take_step(model_id) for model_id in self._turn()]
            if unordered and self._unordered:
                batches.append(self._unordered)
                self._unordered = []
            return batches

    def _skip_old_gaps(self) -> None:
        """`skip_gaps(gap_seconds)`, at most about once a second (each cycle of the worker)."""
        now = time.monotonic()
        if self.gap_seconds is None or now < self._next_gap_check:
            return
        self._next_gap_check = now + min(1.0, self.gap_seconds / 2)
        self.skip_gaps(self.gap_seconds)

    def _turn(self) -> list[str]:
        """The ready models whose turn it is, in the order they run."""
        if len(self._ready) <= 1:  # the common case: no contention, nothing to compare
            return list(self._ready)
        now = time.monotonic()
        ranked = []
        for model_id in self._ready:
            queue = self._queues[model_id]
            head = queue.pending[queue.next_seq]
            ranked.append((effective_priority(head, now, queue.served_at), model_id))
        top = floor(max(rank for rank, _ in ranked))
        return [model_id for rank, model_id in sorted(ranked, reverse=True) if rank >= top]

    def _take_step(self, model_id: str) -> list[Task]:
        queue = self._queues[model_id]
        tasks: list[Task] = []
        while queue.next_seq in queue.pending:
            tasks.append(queue.pending.pop(queue.next_seq))
            queue.next_seq += 1
            if isinstance(tasks[-1].payload, OptimStep | RemoveModel):
                break
        queue.served_at = time.monotonic()
        if queue.next_seq not in queue.pending:
            self._ready.discard(model_id)
        if tasks and isinstance(tasks[-1].payload, RemoveModel):  # its last: forget it
            del self._queues[model_id]
            self._ready.discard(model_id)
        elif len(queue.seen) > 2 * RETRY_WINDOW:
            horizon = queue.next_seq - RETRY_WINDOW
            queue.seen = {k: v for k, v in queue.seen.items() if k >= horizon}
        return tasks

    def take_unordered(self, timeout: float) -> list[Task]:
        """The waiting unordered tasks; waits up to `timeout` for some."""
        with self._cond:
            if not self._unordered:
                self._cond.wait(timeout)
            tasks, self._unordered = self._unordered, []
            return tasks

    def settle(self, request_id: str, result: Result, tenant: str = "") -> None:
        self.futures.settle(request_id, result, tenant=tenant)

    def pending(self, tenant: str) -> int:
        return self._store().pending(tenant)

    def wait(self, request_id: str, timeout: float) -> Result | None:
        return self.futures.wait(request_id, timeout)

    def queue_depth(self) -> int:
        with self._cond:
            return sum(len(q.pending) for q in self._queues.values()) + len(self._unordered)
