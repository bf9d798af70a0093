"""The worker: owns a backend (its base models, adapters and optimizers) and applies each model's
requests in order.

Each cycle takes from the scheduler one training step of each model whose turn it is (highest
priority first, see `tasks.Scheduler.take_ready`). The steps run together, in rounds: each round
hands the backend ONE batch, the forward/backward passes of every model, each model's up to its
next barrier (optim_step, load, save, create, remove), in turn order; then each model's barrier
runs, the optim_steps of consecutive models in one `optim_steps` call. A model's requests after
its barrier go in the next round, so each model's requests still apply in seq_id order.

Sampling runs beside the steps, in its own thread, when the backend samples continuously
(`SampleStream`: tinkerd's engine): each sample request joins the engine's batch at its next step,
so a sample never waits for a training step, of its own model or another's. A snapshot is still
taken in its model's order (a save is a barrier of the training thread). Without it, each cycle
samples everything waiting in one `sample` call after the steps.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, TypeVar, runtime_checkable

from tinkerd.audit import AuditLog, record
from tinkerd.metrics import LocalMonitor, MonitorStore, series
from tinkerd.results import Kind, Result
from tinkerd.tasks import Scheduler, Task, by_priority
from tinkerd.types import (
    Backend,
    CreateModel,
    ForwardBackward,
    ForwardBackwardResult,
    LoadWeights,
    OptimStep,
    Rejected,
    RemoveModel,
    Sample,
    SampleResult,
    SaveWeights,
    ServerError,
    TinkerdError,
)

log = logging.getLogger(__name__)
P = TypeVar("P")  # a payload type (types.Payload's members)


@runtime_checkable
class SampleStream(Protocol):
    """A backend that samples continuously: requests join a running batch at its next step."""

    def sample_start(
        self, request: Sample, done: Callable[[SampleResult | TinkerdError], None]
    ) -> None:
        """Queue `request`; `done` gets its result or error (from a later `sample_step`)."""

    def sample_step(self) -> bool:
        """One step of the batch; whether work is left."""


class Worker:
    """Runs the scheduler's work on a backend, one cycle at a time.

    Args:
        sample_gather_gap: the requests of one burst of sampling arrive a little apart; while
            more keep coming, each within this many seconds of the last, they join the batch
            (so they share one generation pass instead of two), up to `sample_gather_max`.
        monitor: where counters (steps, tokens, errors) and each run's events go, labelled with
            this worker's `name`.
        on_create_failed: told (model_id, error) when a model's creation fails, before its
            future settles: the registry forgets the model (`Registry.forget_failed`), so no
            run is left listed or advertised.
        audit: where each checkpoint saved goes in the audit log, as its key's (`tinkerd.audit`).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        backend: Backend,
        sample_gather_gap: float = 0.003,
        sample_gather_max: float = 0.025,
        monitor: MonitorStore | None = None,
        name: str = "local",
        on_create_failed: Callable[[str, TinkerdError], None] | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.backend = backend
        self.sample_gather_gap = sample_gather_gap
        self.sample_gather_max = sample_gather_max
        self.monitor: MonitorStore = monitor or LocalMonitor()
        self.name = name
        self.on_create_failed = on_create_failed
        self.audit = audit
        self.failed_models: dict[str, TinkerdError] = {}  # creation failed: later work fails fast
        self._steps: list[Task] = []  # taken from the scheduler this cycle (some settled)
        self.stream = backend if isinstance(backend, SampleStream) else None
        self._sampling: dict[str, Task] = {}  # samples in the engine, by request id
        self._finished: deque[tuple[Task, SampleResult | TinkerdError]] = deque()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampler: threading.Thread | None = None

    @property
    def running(self) -> list[Task]:
        """The tasks taken from the scheduler and not settled yet: this cycle's steps (some may
        be settled) and the samples in the engine."""
        return self._steps + list(self._sampling.values())

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="tinkerd-worker", daemon=True)
        self._thread.start()
        if self.stream is not None:
            self._sampler = threading.Thread(
                target=self.sample_forever, name="tinkerd-sampler", daemon=True
            )
            self._sampler.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in (self._thread, self._sampler):
            if thread is not None:
                thread.join(timeout)

    def run_forever(self) -> None:
        while not self._stop.is_set():
            ran = self.run_cycle(timeout=0.2 if self._draining.is_set() else 0.5)
            if self._draining.is_set() and not ran and not self.scheduler.has_ready():
                break  # drained: everything taken is settled and nothing runnable is left

    def drain(self, timeout: float) -> list[str]:
        """Stop after the running and queued work is done (the caller has closed the scheduler
        to new work), waiting up to `timeout` seconds; then settle what is left, work that did
        not get its turn in time or waits for a seq_id that never came, with a server error.
        Returns the request ids failed that way."""
        self._draining.set()
        deadline = time.monotonic() + timeout
        for thread in (self._thread, self._sampler):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        if any(t is not None and t.is_alive() for t in (self._thread, self._sampler)):
            log.warning("drain: still busy after %.0f s; stopping after this step", timeout)
            self._stop.set()
            for thread in (self._thread, self._sampler):
                if thread is not None:
                    thread.join()
        error = ServerError(
            "the server shut down before this request ran; nothing of it was applied"
        )
        for task in list(self._sampling.values()):  # cut short in the engine
            self._sampling.pop(task.request_id, None)
            self._settle(task, lambda: Result.failed(error))
        failed = self.scheduler.fail_pending(Result.failed(error))
        if failed:
            log.warning("drain: %d queued request(s) failed with a server error", len(failed))
        return failed

    def run_samples(self) -> int:
        """Run the waiting samples, and those the engine holds, to the end now, in the caller's
        thread (the loops have stopped); returns how many were taken."""
        tasks = self.scheduler.take_unordered(0)
        if self.stream is None:
            if tasks:
                self._sample(by_priority(tasks))
            return len(tasks)
        self._start_samples(tasks)
        while self._sampling and self.sample_cycle(0.0):
            pass
        return len(tasks)

    def run_cycle(self, timeout: float) -> int:
        """Run a step of each model whose turn it is, in turn, then (without a sampling thread)
        all waiting samples together; returns how many tasks ran."""
        batches = self.scheduler.take_ready(timeout, unordered=self.stream is None)
        self._steps = [t for tasks in batches for t in tasks]
        try:
            samples = [t for t in self._steps if isinstance(t.payload, Sample)]
            self._run_steps(
                [[t for t in tasks if not isinstance(t.payload, Sample)] for tasks in batches]
            )
            ran = len(self._steps)
            if samples:
                more = self._gather_samples()
                self._steps = self._steps + more
                self._sample(by_priority(samples + more))
                ran += len(more)
            return ran
        finally:
            self._steps = []

    # -- sampling beside the steps ---------------------------------------------------------------

    def sample_forever(self) -> None:
        busy = False
        while not self._stop.is_set():
            busy = self.sample_cycle(0.0 if busy else 0.5)
            if self._draining.is_set() and not busy and not self.scheduler.has_ready():
                break  # drained, as run_forever

    def sample_cycle(self, timeout: float) -> bool:
        """Hand the samples that arrived (waiting up to `timeout` for some when the engine is
        idle) to the engine, run one engine step, settle the requests that finished; returns
        whether the engine has work left."""
        assert self.stream is not None
        self._start_samples(self.scheduler.take_unordered(timeout))
        if not self._sampling:
            return False
        started = time.perf_counter()
        try:
            busy = self.stream.sample_step()
        except Exception as e:  # a bug in the engine: what it held fails, the thread goes on
            error = _as_error(e)
            busy = False
            for task in list(self._sampling.values()):
                self._finished.append((task, error))
        finished = []
        while self._finished:
            task, result = self._finished.popleft()
            if self._sampling.pop(task.request_id, None) is not None:
                finished.append((task, result))
        if not busy:  # the engine is idle: nothing it was given may stay unsettled
            lost = ServerError("the sampler lost this request")
            finished += [(task, lost) for task in self._sampling.values()]
            self._sampling.clear()
        self._count_samples([r for _, r in finished], time.perf_counter() - started)
        for task, result in finished:
            self._settle(task, partial(_done, Kind.SAMPLE, result))
        return busy

    def _start_samples(self, tasks: list[Task]) -> None:
        assert self.stream is not None
        for task in by_priority(tasks):
            self._sampling[task.request_id] = task
            self.stream.sample_start(_payload(task, Sample), partial(self._sample_done, task))

    def _sample_done(self, task: Task, result: SampleResult | TinkerdError) -> None:
        """The engine's answer for `task`, settled by the sampling thread's next round."""
        self._finished.append((task, result))

    def _gather_samples(self) -> list[Task]:
        more: list[Task] = []
        deadline = time.monotonic() + self.sample_gather_max
        while (left := deadline - time.monotonic()) > 0:
            arrived = self.scheduler.take_unordered(min(self.sample_gather_gap, left))
            if not arrived:
                break
            more += arrived
        return more

    def _run_steps(self, steps: list[list[Task]]) -> None:
        """Run the models' steps (each in seq order, the steps in turn order) in rounds: one
        batch of every model's passes up to its next barrier, then those barriers."""
        queues = [deque(tasks) for tasks in steps if tasks]
        while queues:
            passes: list[Task] = []
            barriers: list[Task] = []
            for queue in queues:
                while queue and isinstance(queue[0].payload, ForwardBackward):
                    passes.append(queue.popleft())
                if queue:
                    barriers.append(queue.popleft())
            if passes:
                self._forward_backward(passes)
            self._run_barriers(barriers)
            queues = [queue for queue in queues if queue]

    def _run_barriers(self, tasks: list[Task]) -> None:
        """Each model's barrier, in turn order; consecutive optim_steps in one backend call."""
        i = 0
        while i < len(tasks):
            j = i
            while j < len(tasks) and isinstance(tasks[j].payload, OptimStep):
                j += 1
            if j > i:
                self._optim_steps(tasks[i:j])
                i = j
            else:
                self._settle(tasks[i], partial(self._run_one, tasks[i]))
                i += 1

    def _run_one(self, task: Task) -> Result:
        payload = task.payload
        if isinstance(payload, Rejected):
            self._failed(task, payload.error.get("error", ""), payload.error.get("category", ""))
            return Result.failed(payload.error)
        if isinstance(payload, RemoveModel):  # also a model whose creation failed
            self.backend.remove_model(task.model_id)
            self.failed_models.pop(task.model_id, None)
            self._event(task, "removed")
            return Result.of(Kind.REMOVE_MODEL, {"model_id": task.model_id, "removed": True})
        self._check_alive(task.model_id)
        if isinstance(payload, CreateModel):
            try:
                created = self.backend.create_model(task.model_id, payload)
            except Exception as e:
                error = _as_error(e)
                self.failed_models[task.model_id] = error
                if not payload.with_gradients:  # a hand-over or restore re-creates a model that
                    self._creation_failed(task.model_id, error)  # exists: its run stays listed
                raise error from None
            self._event(
                task,
                "created",
                base_model=payload.base_model,
                lora_rank=payload.lora.rank,
                from_checkpoint=payload.from_checkpoint,
            )
            return Result.of(Kind.CREATE_MODEL, created)
        if isinstance(payload, SaveWeights):
            saved = self.backend.save_weights(task.model_id, payload)
            path = saved.get("path") if isinstance(saved, dict) else None
            where = {"snapshot_id": payload.snapshot_id} if payload.snapshot_id else {}
            self._event(task, "save_weights", kind=payload.kind, path=path, **where)
            if self.audit is not None and path and not payload.with_gradients:
                record(
                    self.audit,
                    task.tenant,
                    "checkpoint_save",
                    model_id=task.model_id,
                    tinker_path=path,
                    checkpoint_type=payload.kind,
                )
            return Result.of(Kind.SAVE_WEIGHTS, saved)
        if isinstance(payload, LoadWeights):
            loaded = self.backend.load_weights(task.model_id, payload)
            self._event(
                task, "load_weights", path=payload.path, with_optimizer=payload.with_optimizer
            )
            return Result.of(Kind.LOAD_WEIGHTS, loaded)
        raise ServerError(f"unknown task type {type(payload).__name__}")

    def _alive(self, tasks: list[Task]) -> tuple[list[Task], dict[int, TinkerdError]]:
        """The tasks whose model lives, and by index the errors of those whose creation failed."""
        live, dead = [], {}
        for i, task in enumerate(tasks):
            try:
                self._check_alive(task.model_id)
                live.append(task)
            except TinkerdError as e:
                dead[i] = e
        return live, dead

    def _batch(self, tasks: list[Task], call: Callable[[list[Task]], list[Any]]) -> list[Any]:
        """One backend call for `tasks` (those of live models): one result or error per task,
        in order. A call that raises fails each of its tasks with that error."""
        live, dead = self._alive(tasks)
        try:
            done = call(live) if live else []
            if len(done) != len(live):
                raise ServerError(f"the backend answered {len(done)} of {len(live)} requests")
        except Exception as e:  # the whole call failed before any result: each task gets the error
            done = [_as_error(e)] * len(live)
        answers = iter(done)
        return [dead[i] if i in dead else next(answers) for i in range(len(tasks))]

    def _optim_steps(self, tasks: list[Task]) -> None:
        """Several models' optimizer steps (one each), in one backend call."""
        results = self._batch(
            tasks,
            lambda live: self.backend.optim_steps(
                [(t.model_id, _payload(t, OptimStep)) for t in live]
            ),
        )
        for task, result in zip(tasks, results, strict=True):
            self._settle(task, partial(self._stepped, task, result))

    def _stepped(self, task: Task, result: dict[str, float] | TinkerdError) -> Result:
        if isinstance(result, TinkerdError):
            raise result
        self.monitor.add({series("tinkerd_optim_steps_total", worker=self.name): 1})
        self._event(
            task,
            "optim_step",
            learning_rate=_payload(task, OptimStep).adam.learning_rate,
            metrics=_floats(result),
        )
        return Result.of(Kind.OPTIM_STEP, result)

    def _forward_backward(self, tasks: list[Task]) -> None:
        started = time.perf_counter()
        results = self._batch(
            tasks,
            lambda live: self.backend.forward_backward(
                [(t.model_id, _payload(t, ForwardBackward)) for t in live]
            ),
        )
        try:
            self._count_forward_backward(tasks, results, time.perf_counter() - started)
        except Exception:  # noqa: BLE001 - monitoring must never fail a request
            log.exception("could not count a forward_backward")
        for task, result in zip(tasks, results, strict=True):
            self._settle(task, partial(_done, Kind.FORWARD_BACKWARD, result))

    def _sample(self, tasks: list[Task]) -> None:
        started = time.perf_counter()
        try:
            results = self.backend.sample([_payload(t, Sample) for t in tasks])
        except Exception as e:
            results = [_as_error(e)] * len(tasks)
        self._count_samples(results, time.perf_counter() - started)
        for task, result in zip(tasks, results, strict=True):
            self._settle(task, partial(_done, Kind.SAMPLE, result))

    def _creation_failed(self, model_id: str, error: TinkerdError) -> None:
        if self.on_create_failed is None:
            return
        try:
            self.on_create_failed(model_id, error)
        except Exception:  # noqa: BLE001 - the request still gets its error
            log.exception("could not forget %s after its creation failed", model_id)

    def _check_alive(self, model_id: str) -> None:
        error = self.failed_models.get(model_id)
        if error is not None:
            raise type(error)(f"model {model_id} could not be created: {error.message}")

    def _settle(self, task: Task, run: Callable[[], Result]) -> None:
        try:
            result = run()
        except Exception as e:
            error = _as_error(e)
            result = Result.failed(error)
            self._failed(task, error.message, error.category)
        self.scheduler.settle(task.request_id, result, task.tenant)
        self.monitor.add({series("tinkerd_tasks_total", worker=self.name, type=_kind(task)): 1})

    # -- monitoring: counters and the run's events, as results settle ---------------------------

    def _event(self, task: Task, event_type: str, **fields: Any) -> None:
        try:
            event = {"time": time.time(), "type": event_type, "seq_id": task.seq_id, **fields}
            self.monitor.add_event(task.model_id, event)
        except Exception:  # noqa: BLE001 - monitoring must never fail a request
            log.exception("could not record an event of %s", task.model_id)

    def _failed(self, task: Task, message: str, category: str) -> None:
        kind = _kind(task)
        labels = {"worker": self.name, "type": kind, "category": category}
        self.monitor.add({series("tinkerd_task_errors_total", **labels): 1})
        if not isinstance(task.payload, Sample):  # a sampler's key is not a training run
            self._event(task, "error", request=kind, error=message, category=category)

    def _count_samples(self, results: list[Any], seconds: float) -> None:
        try:
            done = [r for r in results if isinstance(r, SampleResult)]
            tokens = sum(int(s.tokens.size) for r in done for s in r.sequences)
            self.monitor.add(
                {
                    series("tinkerd_sampled_tokens_total", worker=self.name): tokens,
                    series("tinkerd_samples_total", worker=self.name): sum(
                        len(r.sequences) for r in done
                    ),
                    series("tinkerd_sample_seconds_total", worker=self.name): seconds,
                }
            )
        except Exception:  # noqa: BLE001 - monitoring must never fail a request
            log.exception("could not count samples")

    def _count_forward_backward(
        self, tasks: list[Task], results: list[Any], seconds: float
    ) -> None:
        total = 0
        for task, result in zip(tasks, results, strict=True):
            if not isinstance(result, ForwardBackwardResult):
                continue  # failed: counted and logged when it settles
            datums = _payload(task, ForwardBackward).datums
            tokens = sum(int(d.tokens.size) for d in datums)
            total += tokens
            metrics = _floats(result.metrics)
            self._event(
                task,
                _kind(task),
                loss=metrics.get("loss:sum"),
                tokens=tokens,
                datums=len(datums),
                metrics=metrics,
            )
        self.monitor.add(
            {
                series("tinkerd_forward_backward_tokens_total", worker=self.name): total,
                series("tinkerd_forward_backward_seconds_total", worker=self.name): seconds,
            }
        )


def _kind(task: Task) -> str:
    """A task's type for labels and events: forward_backward, forward, optim_step, ..."""
    payload = task.payload
    if isinstance(payload, ForwardBackward) and payload.forward_only:
        return "forward"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(payload).__name__).lower()


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in (metrics or {}).items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _payload(task: Task, kind: type[P]) -> P:
    """`task`'s payload as the `kind` the dispatch that sent it here checked: else a bug."""
    if not isinstance(task.payload, kind):
        raise ServerError(f"expected a {kind.__name__}, got a {type(task.payload).__name__}")
    return task.payload


def _done(kind: Kind, result: ForwardBackwardResult | SampleResult | TinkerdError) -> Result:
    """The result of a pass or a sample, or the error the backend returned in its place."""
    if isinstance(result, TinkerdError):
        raise result
    expected = ForwardBackwardResult if kind is Kind.FORWARD_BACKWARD else SampleResult
    if not isinstance(result, expected):
        raise ServerError(f"the backend answered a {type(result).__name__} to a {kind}")
    return Result(kind, result)


def _as_error(e: BaseException) -> TinkerdError:
    if isinstance(e, TinkerdError):
        return e
    log.error("task failed: %s", "".join(traceback.format_exception(e)))
    return ServerError(f"{type(e).__name__}: {e}")
