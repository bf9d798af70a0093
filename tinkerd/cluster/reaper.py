"""The reaper: an API process's thread that fails what a lost worker held.

A worker whose heartbeat stopped (its process or host died) can settle nothing, so without the
reaper its queued and running requests would stay pending for good and its models would look
placed. Every API process runs one (`cluster.api`); a worker taking over the name of an earlier
process of its own reaps that one first (`cluster.worker`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis

from tinkerd.cluster.keys import LOST, PLACEMENT, REAPER_LOCK, WORKERS, inflight_key
from tinkerd.cluster.state import RedisFutures, as_text, forget_pending, live_workers
from tinkerd.metrics import MonitorStore
from tinkerd.types import ServerError

log = logging.getLogger(__name__)


class Reaper:
    """Finds workers whose heartbeat stopped and fails what they held, so no future stays
    pending: their queued and running requests settle to a server error naming the worker, and
    their models (and snapshots) are reported lost. Every API process runs one; a short Redis
    lock lets one of them act per round. A worker counts as lost only when its registration
    has been missing in two rounds a heartbeat apart (a Redis restart is not a lost worker)."""

    def __init__(
        self,
        client: redis.Redis,
        futures: RedisFutures,
        interval: float,
        monitor: MonitorStore | None = None,
    ) -> None:
        self.redis = client
        self.futures = futures
        self.interval = interval
        self.monitor = monitor  # where each lost model's run gets its "lost" event
        self._suspects: dict[str, float] = {}
        self._stop = threading.Event()
        self._me = f"{socket.gethostname()}-{os.getpid()}"

    def start(self) -> Reaper:
        threading.Thread(target=self._run, name="tinkerd-reaper", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.reap_once()
            except redis.RedisError as e:
                log.debug("reaper skipped a round: %s", e)

    def reap_once(self) -> list[str]:
        """One round: returns the workers it declared lost."""
        if not self.redis.set(REAPER_LOCK, self._me, nx=True, px=int(self.interval * 900)):
            return []
        names = {as_text(n) for n in self.redis.smembers(WORKERS)}
        alive = live_workers(self.redis)
        now = time.monotonic()
        lost = []
        for name in sorted(names - set(alive)):
            first_missed = self._suspects.setdefault(name, now)
            if now - first_missed >= self.interval:
                self.reap(name)
                lost.append(name)
        self._suspects = {n: t for n, t in self._suspects.items() if n in names - set(alive)}
        return lost

    def reap(self, name: str) -> None:
        if not self.redis.srem(WORKERS, name):
            return  # another API process got it
        log.error("worker %s was lost: failing its requests and marking its models lost", name)
        owned = [
            as_text(model)
            for model, owner in self.redis.hgetall(PLACEMENT).items()
            if as_text(owner) == name
        ]
        error = ServerError(f"worker {name} was lost before this request finished")
        held = [as_text(r) for r in self.redis.smembers(inflight_key(name))]
        for model_id in owned:
            reason = (
                f"model {model_id} was lost with worker {name}; restore it from its last "
                "checkpoint (create_training_client_from_state)"
            )
            self.redis.hset(LOST, model_id, reason)
            self.redis.hdel(PLACEMENT, model_id)
            if self.monitor is not None:
                event = {"time": time.time(), "type": "lost", "worker": name, "error": reason}
                self.monitor.add_event(model_id, event)
        for request_id in held:
            self.futures.settle_error(request_id, error, name)
        forget_pending(self.redis, held)
        self.redis.delete(inflight_key(name))
        if self.monitor is not None:
            self.monitor.flush()
