"""`tinkerd serve` on one box: the API and a worker in one process, with no external service.

The worker runs in a thread beside the HTTP server and meets the API only through the scheduler,
exactly as a remote worker would. A sweeper thread removes checkpoints past their TTL.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from waitress import wasyncore
from waitress.server import create_server

from tinkerd.app import create_app
from tinkerd.config import Settings
from tinkerd.registry import Registry
from tinkerd.storage import CheckpointStore
from tinkerd.tasks import FutureStore, Scheduler

log = logging.getLogger(__name__)


def sweep_checkpoints(
    store: CheckpointStore,
    interval: float,
    stop: threading.Event,
    may_sweep: Callable[[], bool] = lambda: True,
) -> None:
    """Remove checkpoints past their TTL every `interval` seconds until `stop` (in a cluster,
    `may_sweep` lets one API process per round do it)."""
    while not stop.wait(interval):
        try:
            if may_sweep():
                for path in store.expire():
                    log.info("checkpoint %s expired and was removed", path)
        except Exception:  # noqa: BLE001 - a failed round must not end the sweeping
            log.exception("checkpoint sweep failed")


class EmbeddedServer:
    """API + worker in this process. `port=0` in settings picks a free port."""

    def __init__(self, settings: Settings) -> None:
        from tinkerd.hf_backend import HFBackend
        from tinkerd.worker import Worker

        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = CheckpointStore(settings.data_dir / "runs")
        self.scheduler = Scheduler(FutureStore(settings.future_ttl_seconds))
        self.backend = HFBackend(settings.data_dir, settings.device, store=self.store)
        self.worker = Worker(self.scheduler, self.backend)
        self.app = create_app(settings, self.scheduler, Registry(self.store), self.store)
        self._http = create_server(
            self.app,
            host=settings.host,
            port=settings.port,
            threads=settings.threads,
            connection_limit=settings.connection_limit,
            channel_timeout=120,
            ident="tinkerd",
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._http.effective_port)  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def _start_background(self) -> None:
        self.worker.start()
        sweeper = threading.Thread(
            target=sweep_checkpoints,
            args=(self.store, self.settings.checkpoint_sweep_seconds, self._stop),
            name="tinkerd-ttl",
            daemon=True,
        )
        sweeper.start()
        self._threads.append(sweeper)

    def start(self) -> EmbeddedServer:
        self._start_background()
        http = threading.Thread(target=self._http.run, name="tinkerd-http", daemon=True)
        http.start()
        self._threads.append(http)
        return self

    def serve_forever(self) -> None:
        self._start_background()
        log.info(
            "tinkerd on %s, device %s, data in %s",
            self.url,
            self.backend.device,
            self.settings.data_dir,
        )
        try:
            self._http.run()
        finally:
            self._stop.set()
            self.worker.stop()

    def stop(self) -> None:
        """Close the listener and every open connection, then stop the worker and sweeper."""
        self._stop.set()
        wasyncore.close_all(self._http._map)  # the HTTP loop ends once its map is empty
        self._http.task_dispatcher.shutdown()
        self.worker.stop()
        for thread in self._threads:
            thread.join(5)
