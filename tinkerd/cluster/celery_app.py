"""The Celery app: Redis as broker, one queue per worker, one task that hands work to the worker.

The task is plain data: the request's kind, id, key and seq_id, its payload dataclass as JSON
(`codec`), and its tenant and priority (absent from messages of an older API: "" and 0).
Its handler only queues the work on the worker's local `tasks.Scheduler`, which orders each
model's requests by seq_id whatever order Celery delivers them in; results do not go through
Celery but straight to Redis (`state.RedisFutures`), where any API process finds them.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import redis
from celery import Celery

from tinkerd.cluster import codec
from tinkerd.cluster.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, worker_queue
from tinkerd.tasks import Scheduler, Task

RUN_TASK = "tinkerd.run"


def make_celery(redis_url: str) -> Celery:
    app = Celery("tinkerd", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=False,  # a lost worker's requests are failed by the reaper, not re-run
        worker_prefetch_multiplier=256,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker outlives a Redis restart
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
    )
    return app


def task_args(kind: str, task: Task) -> list[Any]:
    """The Celery task's arguments for `task` ("ordered" or "unordered")."""
    payload = codec.encode(task.payload)
    return [kind, task.request_id, task.model_id, task.seq_id, payload, task.tenant, task.priority]


def task_from_args(
    kind: str,
    request_id: str,
    key: str,
    seq_id: int,
    payload: dict,
    tenant: str = "",
    priority: int = 0,
) -> tuple[str, Task]:
    """`task_args`' inverse; a message of an older API (five arguments) has no tenant."""
    return kind, Task(request_id, key, seq_id, codec.decode(payload), tenant, int(priority))


def send(celery: Celery, worker: str, kind: str, task: Task) -> None:
    """Queue `task` for `worker`'s Celery consumer."""
    celery.send_task(RUN_TASK, args=task_args(kind, task), queue=worker_queue(worker))


def bind_scheduler(app: Celery, scheduler: Scheduler) -> None:
    """Register the task on a worker: each delivery is queued on `scheduler`."""

    @app.task(name=RUN_TASK)
    def run(*args: Any) -> None:
        queue_task(scheduler, *args)


def queue_task(scheduler: Scheduler, *args: Any) -> None:
    """Queue one message's task (its `task_args`) on `scheduler`."""
    kind, task = task_from_args(*args)
    if kind == "ordered":
        scheduler.enqueue(task)
    else:
        scheduler.enqueue_unordered(task)


def _task_args(message: dict[str, Any]) -> list[Any]:
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, _kwargs, _embed = json.loads(body)
    return args


def take_undelivered(client: redis.Redis, worker: str) -> list[list[Any]]:
    """The task arguments of the messages for a worker that Celery has not run, once it
    stopped consuming (a warm shutdown): those still in its queue, and those it had taken ahead
    (kombu's unacked hash) but not run. They are removed from Redis: a draining worker runs them
    or hands them over, since its models exist nowhere else."""
    queue, found = worker_queue(worker), []
    for tag, raw in client.hscan_iter(KOMBU_UNACKED):
        try:
            message, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        if queue not in (routing_key, exchange):
            continue
        if client.hdel(KOMBU_UNACKED, tag):  # ours, unless kombu pushed it back meanwhile
            client.zrem(KOMBU_UNACKED_INDEX, tag)
            found.append(_task_args(message))
    while (raw := client.rpop(queue)) is not None:  # kombu pushes left, pops right
        # rpop without a count returns one item; redis's stub types it with the list a count gets
        found.append(_task_args(json.loads(raw)))  # type: ignore[arg-type]
    return found
