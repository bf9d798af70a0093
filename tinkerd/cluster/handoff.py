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
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace

import redis
from celery import Celery

from tinkerd.cluster.celery_app import send, take_undelivered, task_from_args
from tinkerd.cluster.state import PLACEMENT, as_text, inflight_key, live_workers
from tinkerd.storage import CheckpointPath
from tinkerd.tasks import Scheduler, Task
from tinkerd.types import Backend, SaveWeights

log = logging.getLogger(__name__)

# The state checkpoint of a hand-off is swept after this (the new worker reads it at once).
HANDOFF_TTL_SECONDS = 3600.0
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
    return min(
        others,
        key=lambda n: (len(others[n].get("models", ())), -int(others[n].get("memory_free", 0)), n),
    )


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
                next_seq = int(self.redis.get(f"tinkerd:next:{model_id}") or 1)
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
                ttl_seconds=HANDOFF_TTL_SECONDS,
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
            pipe.execute()
        send(self.celery, self.target, kind, task)
