"""A worker that is stopped (SIGTERM) hands its models over to another live worker instead of
ending them: once the step it is running is done, each model's exact state (adapter weights,
AdamW state, and the gradients accumulated since its last optim_step) goes to the shared store,
the other worker re-creates the model from it, and the requests that were queued for it follow,
in their order. For the client it is a pause: no request fails, no step is lost or repeated.

Ordering across the move: the re-creation is sent as the model's request at the seq_id of the
last one that ran here, so the new worker's queue for it starts there (`tasks.Scheduler.enqueue`)
and the queued requests, and any later ones, run after it whatever order they arrive in. The
placement changes only after everything is sent; a request an API process sent here meanwhile is
taken off this worker's queue and sent on.

Never to a worker that is stopping too (`leave`): under one cluster-wide lock a worker marks
itself stopping and then picks its target among the others that are not, and reserves it; a
worker that is the target of a hand-over in progress waits for it to arrive before it marks
itself stopping, and takes those models with its own. So when workers stop at once (the whole
cluster), the models gather on the last one, which keeps them for the next start (`suspend`).
The hand-over's checkpoint has no TTL: the target consumes it when it loads it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import redis
from celery import Celery

from tinkerd import suspend
from tinkerd.backends import registered_info
from tinkerd.cluster.celery_app import send, take_undelivered, task_from_args
from tinkerd.cluster.keys import (
    LOST,
    PLACEMENT,
    STOP_LOCK,
    STOPPED,
    incoming_key,
    inflight_key,
    next_key,
    request_key,
)
from tinkerd.cluster.state import as_text, live_workers, next_seq_id
from tinkerd.registry import Registry
from tinkerd.storage import CheckpointPath
from tinkerd.tasks import Scheduler, Task
from tinkerd.types import Backend, SaveWeights

log = logging.getLogger(__name__)

# How long an API process may take between reading a model's placement and sending it a request.
STRAGGLER_SECONDS = 1.0


def pick_target(client: redis.Redis, me: str) -> str | None:
    """The live worker, other than `me` and not itself stopping, with the fewest models, then
    the most free memory; None when there is none."""
    others = {
        name: info
        for name, info in live_workers(client).items()
        if name != me and not info.get("draining")
    }
    if not others:
        return None
    free = {n: registered_info(info).memory_free for n, info in others.items()}
    return min(others, key=lambda n: (len(others[n].get("models", ())), -free[n], n))


def leave(
    client: redis.Redis, me: str, mark_stopping: Callable[[], None], wait: float
) -> str | None:
    """Mark this worker stopping (`mark_stopping`: its registration says so) and pick the
    target of its hand-over, reserved until `arrived`; None if every other worker is stopping
    or gone. While hand-overs to this worker are in progress it waits for them, up to `wait`
    seconds: they are models it must take along."""
    deadline = time.monotonic() + wait
    while True:
        with client.lock(STOP_LOCK, timeout=60, blocking_timeout=max(wait, 1)):
            incoming = int(client.get(incoming_key(me)) or 0)
            if incoming <= 0 or time.monotonic() > deadline:
                mark_stopping()
                target = pick_target(client, me)
                if target is not None:
                    pipe = client.pipeline(transaction=True)
                    pipe.incr(incoming_key(target))
                    pipe.expire(incoming_key(target), int(wait) + 60)  # a stopper that died
                    pipe.execute()
                return target
        time.sleep(0.1)


def arrived(client: redis.Redis, target: str) -> None:
    """The hand-over to `target` is sent: it may stop now."""
    client.decr(incoming_key(target))


class HandOff:
    """Moves one stopping worker's models, and the requests queued for them, to `target`."""

    def __init__(
        self,
        client: redis.Redis,
        celery: Celery,
        backend: Backend,
        scheduler: Scheduler,
        name: str,
        target: str,
    ) -> None:
        self.redis = client
        self.celery = celery
        self.backend = backend
        self.scheduler = scheduler
        self.name = name
        self.target = target
        self.moved: set[str] = set()

    def run(self) -> int:
        """Hand over every model held or queued here; then the requests that arrive late.
        Returns how many requests went over."""
        held = set(self.backend.held()["models"])
        count = 0
        for model_id in sorted(held | set(self.scheduler.models())):
            if ":sample:" not in model_id:
                count += self.model(model_id, model_id in held)
        time.sleep(STRAGGLER_SECONDS)
        return count + self.stragglers()

    def model(self, model_id: str, held: bool) -> int:
        next_seq, tasks = self.scheduler.take_model(model_id)
        if held:
            if not next_seq:  # nothing queued here since a restart: the API's count says
                next_seq = next_seq_id(self.redis, model_id, 1)
            tasks = [self._recreation(model_id, next_seq - 1, tasks), *tasks]
        for task in tasks:
            self._send("ordered", task)
        if as_text(self.redis.hget(PLACEMENT, model_id) or b"") == self.name:
            self.redis.hset(PLACEMENT, model_id, self.target)  # not if it was removed meanwhile
        self.backend.remove_model(model_id)
        self.moved.add(model_id)
        log.info(
            "handed %s over to worker %s with %d queued request(s)",
            model_id,
            self.target,
            len(tasks) - held,
        )
        return len(tasks) - held

    def _recreation(self, model_id: str, seq_id: int, queued: list[Task]) -> Task:
        """Save the model as it is now; the task that re-creates it from that on the target."""
        path = CheckpointPath(model_id, "weights", f"handoff-{uuid.uuid4().hex[:12]}")
        self.backend.save_weights(
            model_id,
            SaveWeights(
                str(path),
                "weights",
                ttl_seconds=None,  # the target removes it once loaded
                user_metadata={"handoff": f"worker {self.name} to worker {self.target}"},
                with_gradients=True,
            ),
        )
        create = replace(
            self.backend.creation(model_id),
            from_checkpoint=str(path),
            with_optimizer=True,
            with_gradients=True,
        )
        tenant, priority = (queued[0].tenant, queued[0].priority) if queued else ("", 0)
        return Task(f"handoff-{uuid.uuid4().hex}", model_id, seq_id, create, tenant, priority)

    def stragglers(self) -> int:
        """Requests sent here after the hand-over began: on to the target (a sample anywhere;
        a model's request if its model went there)."""
        count = 0
        for args in take_undelivered(self.redis, self.name):
            kind, task = task_from_args(*args)
            if kind == "ordered" and task.model_id not in self.moved:
                self.scheduler.enqueue(task)  # a model unknown here: the drain settles it
                continue
            self._send(kind, task)
            count += 1
        return count

    def _send(self, kind: str, task: Task) -> None:
        """Queue `task` at the target and move its in-flight record there, so that the reaper
        of this worker does not fail it."""
        if not task.request_id.startswith("handoff-"):  # the re-creation was never in flight
            pipe = self.redis.pipeline(transaction=True)
            pipe.srem(inflight_key(self.name), task.request_id)
            pipe.sadd(inflight_key(self.target), task.request_id)
            pipe.set(request_key(task.request_id), self.target, keepttl=True)  # a poll asks it
            pipe.execute()
        send(self.celery, self.target, kind, task)


def keep(
    client: redis.Redis,
    backend: Backend,
    scheduler: Scheduler,
    registry: Registry,
    data_dir: Path,
    name: str,
) -> list[suspend.StoppedModel]:
    """The last worker stopping (no other to take its models), once drained: save each model
    it holds for the next start (`suspend`), and mark it stopped in Redis, not placed here, so
    that the reaper does not report it lost and requests for it are answered "try again". The
    requests that still reach this worker's queue go with their model's state."""
    kept: dict[str, suspend.StoppedModel] = {}
    for model_id in backend.held()["models"]:
        next_seq, _ = scheduler.take_model(model_id)
        try:
            if not next_seq:  # nothing queued here since a restart: the API's count says
                next_seq = next_seq_id(client, model_id, 1)
            records = registry.records_of(model_id)
        except redis.RedisError:
            next_seq, records = next_seq or 1, []  # Redis, if it comes back, has them
        try:
            model = suspend.save(backend, data_dir, model_id, next_seq - 1, name, records)
        except Exception:  # noqa: BLE001 - the others are still saved
            log.exception("could not save model %s: it is lost with this worker", model_id)
            continue
        kept[model_id] = model
        try:
            reason = f"worker {name} stopped and saved it; it is restored when a worker starts"
            pipe = client.pipeline(transaction=True)
            pipe.hset(STOPPED, model_id, reason)
            pipe.hdel(PLACEMENT, model_id)
            pipe.execute()
        except redis.RedisError:
            log.warning("could not mark %s stopped in Redis; it is restored all the same", model_id)
    if kept:
        try:
            time.sleep(STRAGGLER_SECONDS)
            late = _late_requests(client, name, kept, data_dir)
        except redis.RedisError:
            late = 0
        log.warning(
            "no other worker to take them: %d model(s) saved in %s (with %d late request(s)); "
            "the next worker to start restores them",
            len(kept),
            suspend.stopped_dir(data_dir),
            late,
        )
    return list(kept.values())


def _late_requests(
    client: redis.Redis, name: str, kept: dict[str, suspend.StoppedModel], data_dir: Path
) -> int:
    """Requests sent here for a kept model after it was saved: saved with it, no longer in
    flight here (the reaper would fail them) nor at any worker until it is restored."""
    count = 0
    for args in take_undelivered(client, name):
        kind, task = task_from_args(*args)
        model = kept.get(task.model_id) if kind == "ordered" else None
        if model is None:
            continue  # a sample, or a model not held here: the reaper fails it
        model.queued.append(args)
        pipe = client.pipeline(transaction=True)
        pipe.srem(inflight_key(name), task.request_id)
        pipe.set(request_key(task.request_id), "", keepttl=True)  # pending, at no worker
        pipe.execute()
        count += 1
    for model in kept.values():
        if model.queued:
            suspend.write(data_dir, model)
    return count


def restore_kept(
    client: redis.Redis, scheduler: Scheduler, registry: Registry, data_dir: Path, name: str
) -> list[str]:
    """At start: take every model a clean stop saved (`suspend.claim`; another worker starting
    meanwhile takes the rest) and queue its re-creation here, placed here in Redis."""
    restored = []
    for model in suspend.claim(data_dir):
        try:
            pipe = client.pipeline(transaction=True)
            pipe.hset(PLACEMENT, model.model_id, name)
            pipe.hdel(STOPPED, model.model_id)
            pipe.hdel(LOST, model.model_id)  # a stop that could not tell Redis
            pipe.set(next_key(model.model_id), model.seq_id + 1, nx=True)
            for args in model.queued:
                pipe.sadd(inflight_key(name), args[1])
                pipe.set(request_key(args[1]), name, keepttl=True)
            pipe.execute()
        except redis.RedisError:
            suspend.write(data_dir, model)  # back for the next start
            raise
        suspend.restore(model, scheduler, registry)
        restored.append(model.model_id)
    return restored
