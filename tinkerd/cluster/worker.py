"""`tinkerd worker`: a Celery worker process that owns one device's models.

It is `tinkerd serve`'s worker loop (`worker.Worker` over a local `tasks.Scheduler`) with Celery
in front and Redis behind: Celery delivers each request to this worker's own queue, the local
scheduler orders it among its model's requests, and results go to Redis for any API process to
answer. A heartbeat thread renews the registration (host, device, memory, models held, queue) and
resends results that could not be stored while Redis was away.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from redis.exceptions import RedisError

from tinkerd.audit import RedisAudit
from tinkerd.cluster.celery_app import bind_scheduler, make_celery, queue_task, take_undelivered
from tinkerd.cluster.handoff import HandOff, arrived, keep, leave, restore_kept
from tinkerd.cluster.keys import PLACEMENT, WORKERS, worker_key, worker_queue
from tinkerd.cluster.reaper import Reaper
from tinkerd.cluster.state import (
    RedisFutures,
    RedisRecords,
    connect,
    epoch,
    recorded_request,
    restore_requests,
    restore_sequence,
    skip_seq,
)
from tinkerd.config import Settings
from tinkerd.metrics import RedisMonitor
from tinkerd.registry import Registry
from tinkerd.sequencing import Gap, skipped_message
from tinkerd.storage import CheckpointStore
from tinkerd.tasks import Scheduler, Task
from tinkerd.types import (
    NotFound,
    Rejected,
    RemoveModel,
    Sample,
    ServerError,
    UserError,
    error_body,
)

log = logging.getLogger(__name__)

# A model's next request recorded in Redis but missing here this long (seen so while Redis was
# reachable, so an API process's outbox had time to send it): the API process that took it died.
GAP_SECONDS = 20.0


class WorkerProcess:
    def __init__(self, settings: Settings) -> None:
        from tinkerd.backends import BackendOptions, make_backend
        from tinkerd.worker import Worker

        if not settings.redis_url:
            raise ValueError("tinkerd worker needs --redis")
        self.settings = settings
        self.redis = connect(settings.redis_url)
        store = CheckpointStore(
            settings.data_dir / "runs", shared=True, stale_seconds=settings.temp_stale_seconds
        )
        self.backend = make_backend(
            settings.backend,
            BackendOptions(
                settings.data_dir,
                settings.device,
                store,
                activation_checkpointing=settings.activation_checkpointing,
                sampler=settings.sampler,
                vllm_engine_args=settings.vllm_engine_args,
                tp=settings.tp,
                pp=settings.pp,
            ),
        )
        device = self.backend.info().device
        self.name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}-{device}"
        self.futures = RedisFutures(self.redis, settings.future_ttl_seconds, worker=self.name)
        self.scheduler = Scheduler(self.futures)
        self.monitor = RedisMonitor(self.redis)  # steps, tokens, run events: cluster-wide
        self.registry = Registry(store, RedisRecords(self.redis))  # the API processes' records
        self.worker = Worker(
            self.scheduler,
            self.backend,
            monitor=self.monitor,
            name=self.name,
            on_create_failed=lambda model_id, e: self.registry.forget_failed(
                model_id, error_body(e)
            ),
            audit=RedisAudit(self.redis),  # checkpoint saves, as the API processes read them
        )
        self.celery = make_celery(settings.redis_url)
        bind_scheduler(self.celery, self.scheduler)
        self.started_at = time.time()
        self._held: dict[str, Any] = {}
        self._info: dict[str, Any] = {}
        self._registered = False
        self._epoch: str | None = None  # Redis's epoch at the last heartbeat (`state.epoch`)
        self._draining = False
        self._stop = threading.Event()
        self._gaps_seen: dict[tuple[str, int], float] = {}  # gap -> first seen, Redis reachable

    def registration(self) -> dict[str, Any]:
        try:
            self._held = self.backend.held()
            self._info = self.backend.info().to_json()
        except RuntimeError:  # the worker thread changed what it holds mid-read: use the last
            pass
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queue": worker_queue(self.name),
            "started_at": self.started_at,
            "heartbeat_at": time.time(),
            "queue_depth": self.scheduler.queue_depth(),
            "draining": self._draining,  # no new models or samples are placed on it
            **self._held,
            "backend": self._info,  # `backends.BackendInfo`: what placement reads
        }

    def heartbeat(self) -> None:
        """Renew the registration and send any results Redis missed; if Redis came back empty
        since the last one (a new epoch), write back what this worker holds (`announce`)."""
        ttl_ms = int(self.settings.worker_ttl_seconds * 1000)
        token = epoch(self.redis)[1]
        emptied = self._epoch is not None and token != self._epoch
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(worker_key(self.name), json.dumps(self.registration()), px=ttl_ms)
        pipe.sadd(WORKERS, self.name)
        added = pipe.execute()[1]
        if added and self._registered and not emptied:
            log.error("worker %s had been declared lost; its earlier models are gone", self.name)
        self._registered = True
        self.futures.flush()
        if emptied:
            self.announce()
        self._epoch = token  # only once announced: a failed announce is tried again

    def announce(self) -> None:
        """Redis came back empty (restarted without persistence, or flushed) while this worker
        holds models and requests: write them back, so that their clients go on. The requests
        it holds, queued or running, get their records back (their polls wait for them); each
        model its sequence (the next seq_id, past the requests queued here), its placement
        here, then its records (from its run.json: base model, LoRA config, owner, session),
        last, so that the API takes its requests only once all of it is back. A stopping
        worker writes back only its requests: its models are being handed over."""
        nexts, queued = self.scheduler.waiting()
        tasks = queued + list(self.worker.running)
        requests = [
            (t.request_id, t.tenant) for t in tasks if not t.request_id.startswith("handoff-")
        ]
        restore_requests(self.redis, self.name, requests, self.futures.ttl)
        results = self.futures.rewrite_recent()
        removing = {t.model_id for t in queued if isinstance(t.payload, RemoveModel)}
        held = set(self._held.get("models", ())) | set(nexts)
        models = [] if self._draining else sorted(held - removing - set(self.worker.failed_models))
        for model_id in models:
            try:
                record = self.registry.run(model_id)  # from run.json when Redis lost it
            except NotFound:
                log.error(
                    "model %s has no run record in the data directory: not announced", model_id
                )
                continue
            if model_id in nexts:
                waiting = {
                    t.seq_id: t.request_id
                    for t in queued
                    if t.model_id == model_id and not isinstance(t.payload, Sample)
                }
                restore_sequence(self.redis, model_id, nexts[model_id], waiting)
            self.redis.hsetnx(PLACEMENT, model_id, self.name)
            self.registry.restore(record)
        log.warning(
            "Redis came back empty: worker %s wrote back %d model(s), %d request(s) and %d "
            "result(s)",
            self.name,
            len(models),
            len(requests),
            results,
        )

    def fill_gaps(self) -> list[str]:
        """Fail the requests that were recorded in Redis but never reached this worker (their
        API process died between the two steps), so the model's later requests can run. A gap
        that Redis does not know is a request the client has not sent yet, or one refused
        before it was recorded: after `seq_gap_seconds` it is skipped (`skip_seq`). Each wait
        counts from when this worker first saw the gap with Redis reachable."""
        filled, now, seen_before = [], time.monotonic(), self._gaps_seen
        self._gaps_seen = {}  # kept only for the gaps still open, and only if Redis answers
        for gap in self.scheduler.gaps(0.0):
            request_id = recorded_request(self.redis, gap.model_id, gap.seq_id)
            key = (gap.model_id, gap.seq_id)
            since = self._gaps_seen[key] = seen_before.get(key, now)
            if request_id is None:
                if now - since >= self.settings.seq_gap_seconds:
                    filled += self._skip(gap, now - since)
                continue
            if now - since < GAP_SECONDS:
                continue
            error = ServerError(
                f"request {request_id} (seq_id {gap.seq_id}) never reached worker {self.name}: "
                "the API process that took it stopped first; send it again"
            )
            log.error("%s", error.message)
            rejected = Rejected(error_body(error))
            self.scheduler.enqueue(
                Task(request_id, gap.model_id, gap.seq_id, rejected, gap.tenant, gap.priority)
            )
            filled.append(request_id)
        return filled

    def _skip(self, gap: Gap, waited: float) -> list[str]:
        log.warning(
            "model %s: seq_id %d never arrived although later requests waited %.0f s for it; "
            "skipping it so they run",
            gap.model_id,
            gap.seq_id,
            waited,
        )
        request_id = skip_seq(self.redis, gap.model_id, gap.seq_id, self.name)
        if request_id is None:  # recorded just now: on its way
            return []
        self.scheduler.fill_gap(gap, UserError(skipped_message(gap, waited)), request_id)
        return [request_id]

    def _heartbeat_forever(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self.heartbeat()
                self.fill_gaps()
            except RedisError as e:
                log.warning("heartbeat failed (%s); retrying", e)
                self._gaps_seen = {}  # their waits count again once Redis is back

    def _mark_stopping(self) -> None:
        """Registered as draining: no new model, sample or hand-over is sent here."""
        self._draining = True
        self.heartbeat()

    def _records(self) -> Registry:
        """The API processes' registry records, in Redis."""
        return Registry(None, RedisRecords(self.redis))

    def take_over_name(self) -> None:
        """A worker of this name registered before is an earlier process, now gone with its
        models: settle its requests and report its models lost now, as the reaper would, and
        drop what its queue still holds, before this process takes the name."""
        if self.redis.sismember(WORKERS, self.name):
            log.warning("worker %s restarted: its earlier models are lost", self.name)
            reaper = Reaper(self.redis, self.futures, self.settings.heartbeat_seconds, self.monitor)
            reaper.reap(self.name)
            self.redis.delete(worker_queue(self.name))

    def run(self) -> None:
        """Register, then serve until SIGTERM/SIGINT (Celery's warm shutdown)."""
        for chatty in ("celery.worker.strategy", "celery.app.trace"):  # a line per request
            logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
        self.take_over_name()
        self.heartbeat()
        restored = restore_kept(
            self.redis, self.scheduler, self._records(), self.settings.data_dir, self.name
        )
        if restored:
            log.warning("restoring %d model(s) a clean stop saved", len(restored))
        self.worker.start()
        threading.Thread(
            target=self._heartbeat_forever, name="tinkerd-heartbeat", daemon=True
        ).start()
        log.info(
            "worker %s: backend %s on %s, queue %s",
            self.name,
            self.settings.backend,
            self._info.get("device"),
            worker_queue(self.name),
        )
        try:
            self.celery.Worker(
                hostname=f"{self.name}@{socket.gethostname()}",
                queues=[worker_queue(self.name)],
                pool_cls="solo",
                concurrency=1,
                without_heartbeat=True,
                without_mingle=True,
                without_gossip=True,
                loglevel=logging.getLevelName(logging.getLogger().level),
                quiet=True,
            ).start()
        finally:
            self.drain()

    def drain(self) -> None:
        """After Celery's warm shutdown (SIGTERM), still heartbeating (as draining: nothing new
        is placed here): the step running now finishes, and the models, with the requests
        queued for them, are handed over to another live worker that is not stopping too
        (`handoff.leave`). With no such worker, the queued work runs here, within
        `drain_seconds`, what is left fails with a server error, and each model is saved for
        the next start (`handoff.keep`). Then the registration goes, and the reaper reports
        what was left here (in-memory sampler snapshots) lost."""
        try:
            target = leave(self.redis, self.name, self._mark_stopping, self.settings.drain_seconds)
            undelivered = take_undelivered(self.redis, self.name)
        except RedisError as e:
            log.warning("drain: Redis is unreachable (%s); keeping the models here", e)
            self._draining, target, undelivered = True, None, []
        for args in undelivered:
            queue_task(self.scheduler, *args)
        if undelivered:
            log.info(
                "drain: %d request(s) taken from the queue after Celery stopped", len(undelivered)
            )
        if target is not None:
            self.worker.stop(self.settings.drain_seconds)  # after the step that is running
            self.worker.run_samples()  # a sample may need a snapshot that lives only here
            handoff = HandOff(
                self.redis, self.celery, self.backend, self.scheduler, self.name, target
            )
            try:
                moved = handoff.run()
            finally:
                arrived(self.redis, target)
            log.info(
                "drain: %d model(s) and %d queued request(s) handed over to worker %s",
                len(handoff.moved),
                moved,
                target,
            )
        self.worker.drain(self.settings.drain_seconds)
        keep(
            self.redis,
            self.backend,
            self.scheduler,
            self._records(),
            self.settings.data_dir,
            self.name,
        )
        self._stop.set()
        try:
            self.futures.flush()
            self.monitor.close()
            self.redis.delete(worker_key(self.name))  # the reaper takes it from here
        except RedisError:
            pass
