"""`tinkerd serve` on one box: the API and a worker in one process, with no external service.

The worker runs in a thread beside the HTTP server and meets the API only through the scheduler,
exactly as a remote worker would.
"""

from __future__ import annotations

import logging
import threading

import waitress
from waitress.server import create_server

from tinkerd.app import create_app
from tinkerd.config import Settings
from tinkerd.registry import Registry
from tinkerd.tasks import FutureStore, Scheduler

log = logging.getLogger(__name__)


class EmbeddedServer:
    """API + worker in this process. `port=0` in settings picks a free port."""

    def __init__(self, settings: Settings) -> None:
        from tinkerd.hf_backend import HFBackend
        from tinkerd.worker import Worker

        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.scheduler = Scheduler(FutureStore(settings.future_ttl_seconds))
        self.backend = HFBackend(settings.data_dir, settings.device)
        self.worker = Worker(self.scheduler, self.backend)
        self.app = create_app(settings, self.scheduler, Registry())
        self._http = create_server(
            self.app, host=settings.host, port=settings.port, threads=settings.threads,
            channel_timeout=120, ident="tinkerd",
        )
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._http.effective_port)  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def start(self) -> EmbeddedServer:
        self.worker.start()
        self._thread = threading.Thread(target=self._http.run, name="tinkerd-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.worker.start()
        log.info("tinkerd on %s, device %s, data in %s", self.url, self.backend.device,
                 self.settings.data_dir)
        try:
            self._http.run()
        finally:
            self.worker.stop()

    def stop(self) -> None:
        self._http.close()
        self.worker.stop()
        if self._thread is not None:
            self._thread.join(5)


__all__ = ["EmbeddedServer", "waitress"]
