"""The worker: owns a backend (its base models, adapters and optimizers) and applies each model's
requests in order.

Each cycle takes the ready work of every model from the scheduler; within a model, consecutive
forward/backward requests go to the backend together (the chunks of one batch, or passes queued
ahead of an optim_step barrier), so a backend may fuse them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from tinkerd.tasks import Result, Scheduler, Task
from tinkerd.types import (
    Backend,
    CreateModel,
    ForwardBackward,
    LoadWeights,
    OptimStep,
    Rejected,
    RemoveModel,
    Sample,
    SaveWeights,
    ServerError,
    TinkerdError,
)
from tinkerd.wire import encode_forward_backward_output, encode_sample_response

log = logging.getLogger(__name__)


def json_result(body: dict[str, Any]) -> Result:
    return Result(json.dumps(body).encode())


def error_result(error: TinkerdError) -> Result:
    return json_result(error.to_json())


class Worker:
    """Runs the scheduler's work on a backend, one cycle at a time.

    Args:
        sample_gather_gap: the requests of one burst of sampling arrive a little apart; while
            more keep coming, each within this many seconds of the last, they join the batch
            (so they share one generation pass instead of two), up to `sample_gather_max`.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        backend: Backend,
        sample_gather_gap: float = 0.003,
        sample_gather_max: float = 0.025,
    ) -> None:
        self.scheduler = scheduler
        self.backend = backend
        self.sample_gather_gap = sample_gather_gap
        self.sample_gather_max = sample_gather_max
        self.failed_models: dict[str, TinkerdError] = {}  # creation failed: later work fails fast
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="tinkerd-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        while not self._stop.is_set():
            self.run_cycle(timeout=0.5)

    def run_cycle(self, timeout: float) -> int:
        """Run every model's ready work once, then all waiting samples together; returns how
        many tasks ran."""
        batches = self.scheduler.take_ready(timeout)
        samples = [t for tasks in batches for t in tasks if isinstance(t.payload, Sample)]
        for tasks in batches:
            self._run_model([t for t in tasks if not isinstance(t.payload, Sample)])
        ran = sum(len(tasks) for tasks in batches)
        if samples:
            more = self._gather_samples()
            self._sample(samples + more)
            ran += len(more)
        return ran

    def _gather_samples(self) -> list[Task]:
        more: list[Task] = []
        deadline = time.monotonic() + self.sample_gather_max
        while (left := deadline - time.monotonic()) > 0:
            arrived = self.scheduler.take_unordered(min(self.sample_gather_gap, left))
            if not arrived:
                break
            more += arrived
        return more

    def _run_model(self, tasks: list[Task]) -> None:
        i = 0
        while i < len(tasks):
            j = i
            while j < len(tasks) and isinstance(tasks[j].payload, ForwardBackward):
                j += 1
            if j > i:
                self._forward_backward(tasks[i:j])
                i = j
            else:
                self._settle(tasks[i], lambda t=tasks[i]: self._run_one(t))
                i += 1

    def _run_one(self, task: Task) -> Result:
        payload = task.payload
        if isinstance(payload, Rejected):
            return json_result(payload.error)
        if isinstance(payload, RemoveModel):  # also a model whose creation failed
            self.backend.remove_model(task.model_id)
            self.failed_models.pop(task.model_id, None)
            return json_result({"model_id": task.model_id, "removed": True})
        self._check_alive(task.model_id)
        if isinstance(payload, CreateModel):
            try:
                return json_result(self.backend.create_model(task.model_id, payload))
            except TinkerdError as e:
                self.failed_models[task.model_id] = e
                raise
        if isinstance(payload, OptimStep):
            return json_result({"metrics": self.backend.optim_step(task.model_id, payload)})
        if isinstance(payload, SaveWeights):
            return json_result(self.backend.save_weights(task.model_id, payload))
        if isinstance(payload, LoadWeights):
            return json_result(self.backend.load_weights(task.model_id, payload))
        raise ServerError(f"unknown task type {type(payload).__name__}")

    def _forward_backward(self, tasks: list[Task]) -> None:
        try:
            self._check_alive(tasks[0].model_id)
            results = self.backend.forward_backward([(t.model_id, t.payload) for t in tasks])
        except Exception as e:  # the whole group failed before any result: each task gets the error
            results = [_as_error(e)] * len(tasks)
        for task, result in zip(tasks, results, strict=True):
            self._settle(task, lambda r=result: _encoded(r, encode_forward_backward_output))

    def _sample(self, tasks: list[Task]) -> None:
        try:
            results = self.backend.sample([t.payload for t in tasks])
        except Exception as e:
            results = [_as_error(e)] * len(tasks)
        for task, result in zip(tasks, results, strict=True):
            self._settle(task, lambda r=result: _encoded(r, encode_sample_response))

    def _check_alive(self, model_id: str) -> None:
        error = self.failed_models.get(model_id)
        if error is not None:
            raise type(error)(f"model {model_id} could not be created: {error.message}")

    def _settle(self, task: Task, run: Callable[[], Result]) -> None:
        try:
            result = run()
        except Exception as e:
            result = error_result(_as_error(e))
        self.scheduler.settle(task.request_id, result)


def _encoded(result: Any, encode: Callable[[Any], bytes]) -> Result:
    """A protobuf result, or the error the backend returned in its place."""
    if isinstance(result, TinkerdError):
        raise result
    return Result(encode(result), "application/x-protobuf")


def _as_error(e: BaseException) -> TinkerdError:
    if isinstance(e, TinkerdError):
        return e
    log.error("task failed: %s", "".join(traceback.format_exception(e)))
    return ServerError(f"{type(e).__name__}: {e}")
