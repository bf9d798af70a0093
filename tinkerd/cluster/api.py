"""`tinkerd serve --redis`: the API alone, in gunicorn processes that share one Redis.

Each process builds the same Flask app as `tinkerd serve`, over `RedisScheduler` and the
registry's records in Redis, so any process answers any request. gunicorn's gevent workers hold
a waiting `retrieve_future` as a greenlet, not a thread: a thousand long-polls cost little.
While Redis is unreachable every route answers 503 with a clear message, and the process
recovers by itself when Redis is back: a request it had recorded but could not yet hand to its
worker is sent then (`scheduler.Outbox`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from tinkerd.config import Settings

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)


def create_cluster_app(settings: Settings) -> Flask:
    # Imported here: the gunicorn master must not load redis or celery before its gevent
    # workers patch the standard library.
    import kombu.exceptions
    import redis.exceptions
    from flask import request

    from tinkerd.app import create_app, error_response
    from tinkerd.audit import RedisAudit
    from tinkerd.cluster.celery_app import make_celery
    from tinkerd.cluster.keys import SWEEPER_LOCK
    from tinkerd.cluster.reaper import Reaper
    from tinkerd.cluster.scheduler import RedisScheduler
    from tinkerd.cluster.state import RedisFutures, RedisRecords, connect
    from tinkerd.metrics import RedisMonitor
    from tinkerd.registry import Registry
    from tinkerd.serve import sweep_checkpoints
    from tinkerd.storage import CheckpointStore
    from tinkerd.types import Unavailable

    redis_url = settings.redis_url
    if not redis_url:
        raise ValueError("the cluster API needs a redis_url")
    client = connect(redis_url)
    # after Redis comes back empty, the workers write back what they hold within a heartbeat
    rebuild = settings.worker_ttl_seconds
    futures = RedisFutures(client, settings.future_ttl_seconds, rebuild_seconds=rebuild)
    celery = make_celery(redis_url)
    scheduler = RedisScheduler(client, celery, futures, settings.send_retry_seconds)
    scheduler.outbox.start()  # also stores the results this process could not store
    store = CheckpointStore(
        settings.data_dir / "runs", shared=True, stale_seconds=settings.temp_stale_seconds
    )
    registry = Registry(store, RedisRecords(client, rebuild))
    monitor = RedisMonitor(client)
    app = create_app(settings, scheduler, registry, store, monitor, audit=RedisAudit(client))
    reaper = Reaper(client, futures, settings.heartbeat_seconds, monitor)
    app.extensions["tinkerd_reaper"] = reaper.start()
    interval = settings.checkpoint_sweep_seconds

    def my_turn_to_sweep() -> bool:  # one API process per round
        return bool(client.set(SWEEPER_LOCK, 1, nx=True, px=int(interval * 900)))

    threading.Thread(
        target=sweep_checkpoints,
        args=(store, interval, threading.Event(), my_turn_to_sweep),
        name="tinkerd-ttl",
        daemon=True,
    ).start()

    def redis_down(e: Exception) -> Any:
        log.warning("Redis unreachable: %s", e)
        if request.path.endswith("/retrieve_future"):
            time.sleep(1.0)  # the SDK re-polls a 5xx at once: keep that loop slow
        response = error_response(
            Unavailable(
                f"tinkerd's Redis at {_safe(redis_url)} is unreachable ({e}); "
                "the request was not taken, try again shortly"
            )
        )
        response.headers["Retry-After"] = "1"
        return response

    app.register_error_handler(redis.exceptions.ConnectionError, redis_down)
    app.register_error_handler(redis.exceptions.TimeoutError, redis_down)
    app.register_error_handler(kombu.exceptions.OperationalError, redis_down)
    return app


def _safe(url: str) -> str:
    """The Redis URL without its password."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def serve(settings: Settings) -> None:
    """Run the cluster API under gunicorn with gevent workers."""
    from gunicorn.app.base import BaseApplication

    class API(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", settings.api_workers)
            self.cfg.set("worker_class", "tinkerd.cluster.http_worker.JsonErrorWorker")
            # Each API process alone can hold every waiting client (10,000 by default): the
            # processes share one listening socket and need not split the clients evenly.
            self.cfg.set("worker_connections", settings.connection_limit)
            self.cfg.set("backlog", settings.connection_limit)  # capped at net.core.somaxconn
            self.cfg.set("timeout", 120)  # a worker silent this long is restarted
            self.cfg.set("graceful_timeout", 30)
            self.cfg.set("keepalive", 75)
            self.cfg.set("control_socket_disable", True)  # several APIs may share a host

        def load(self) -> Flask:  # in each worker, after gevent has patched the process
            return create_cluster_app(settings)

    log.info(
        "tinkerd API on %s:%s (%d processes), Redis %s, data in %s",
        settings.host,
        settings.port,
        settings.api_workers,
        _safe(settings.redis_url or ""),
        settings.data_dir,
    )
    API().run()
