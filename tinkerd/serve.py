"""`tinkerd serve` on one box: the API and a worker in one process, with no external service.

The worker runs in a thread beside the HTTP server and meets the API only through the scheduler,
exactly as a remote worker would. A sweeper thread removes checkpoints past their TTL.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import ErrorTask

from tinkerd import suspend
from tinkerd.app import create_app
from tinkerd.audit import FileAudit
from tinkerd.config import Settings
from tinkerd.metrics import LocalMonitor
from tinkerd.registry import Registry
from tinkerd.storage import CheckpointStore
from tinkerd.tasks import FutureStore, Scheduler
from tinkerd.types import error_body, status_error

log = logging.getLogger(__name__)

# After a drain, how long the finished requests' results stay retrievable before the server
# closes: a client's long-poll is answered the moment its request settles, the SDK re-polls at
# once.
DRAIN_GRACE_SECONDS = 2.0


def sweep_checkpoints(
    store: CheckpointStore,
    interval: float,
    stop: threading.Event,
    may_sweep: Callable[[], bool] = lambda: True,
) -> None:
    """Remove checkpoints past their TTL, and killed saves' temporary directories, every
    `interval` seconds until `stop` (in a cluster, `may_sweep` lets one API process per round
    do it)."""
    while not stop.wait(interval):
        try:
            if may_sweep():
                for path in store.expire():
                    log.info("checkpoint %s expired and was removed", path)
                store.sweep_temporary()
        except Exception:  # noqa: BLE001 - a failed round must not end the sweeping
            log.exception("checkpoint sweep failed")


class JsonErrorTask(ErrorTask):
    """waitress's own refusals (a body over max_request_body_size, a malformed request line,
    headers too large, bad chunked encoding) in tinkerd's JSON error shape, not plain text."""

    def execute(self) -> None:
        e = self.request.error
        body = json.dumps(error_body(status_error(f"{e.reason}: {e.body}", e.code))).encode()
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


class EmbeddedServer:
    """API + worker in this process. `port=0` in settings picks a free port."""

    def __init__(self, settings: Settings) -> None:
        from tinkerd.backends import BackendOptions, make_backend
        from tinkerd.worker import Worker

        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = CheckpointStore(
            settings.data_dir / "runs", stale_seconds=settings.temp_stale_seconds
        )
        futures = FutureStore(settings.future_ttl_seconds)
        self.scheduler = Scheduler(futures, gap_seconds=settings.seq_gap_seconds)
        self.backend = make_backend(
            settings.backend,
            BackendOptions(
                settings.data_dir,
                settings.device,
                self.store,
                activation_checkpointing=settings.activation_checkpointing,
                sampler=settings.sampler,
                vllm_engine_args=settings.vllm_engine_args,
                tp=settings.tp,
                pp=settings.pp,
            ),
        )
        self.monitor = LocalMonitor(
            worker=lambda: {**self.backend.held(), "queue_depth": self.scheduler.queue_depth()}
        )
        self.registry = registry = Registry(self.store)
        self.audit = FileAudit(settings.data_dir)
        self.worker = Worker(
            self.scheduler,
            self.backend,
            monitor=self.monitor,
            on_create_failed=lambda model_id, e: registry.forget_failed(model_id, error_body(e)),
            audit=self.audit,
        )
        self.app = create_app(
            settings, self.scheduler, registry, self.store, self.monitor, audit=self.audit
        )
        self._http = create_server(
            self.app,
            host=settings.host,
            port=settings.port,
            threads=settings.threads,
            connection_limit=settings.connection_limit,
            backlog=settings.connection_limit,  # the kernel caps it at net.core.somaxconn
            # poll(), not select(): select() fails on a descriptor past 1023, i.e. once about a
            # thousand connections are open, and that would end the HTTP loop.
            asyncore_use_poll=True,
            channel_timeout=120,
            ident="tinkerd",
            # waitress refuses a body of this size or more itself: one byte over Flask's limit,
            # so both draw the line at max_request_bytes.
            max_request_body_size=settings.max_request_bytes + 1,
        )
        self._http.channel_class = JsonErrorChannel
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._drain_lock = threading.Lock()
        self._drainer: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._http.effective_port)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def _start_background(self) -> None:
        self.restore_stopped()
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
            "tinkerd on %s, backend %s on %s, data in %s",
            self.url,
            self.settings.backend,
            self.backend.info().device,
            self.settings.data_dir,
        )
        signal.signal(signal.SIGTERM, lambda *_: self.begin_drain())
        signal.signal(signal.SIGINT, self._interrupted)
        try:
            self._http.run()
        finally:
            self._stop.set()
            self.worker.stop()
        log.info("tinkerd stopped")

    def _interrupted(self, *_: object) -> None:
        """Ctrl-C stops as SIGTERM does (models kept for the next start); a second one at
        once, without waiting for the drain."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("interrupted: draining (Ctrl-C again to stop at once, keeping nothing)")
        self.begin_drain()

    def begin_drain(self) -> None:
        """Drain in the background (the HTTP loop keeps answering meanwhile); once only."""
        with self._drain_lock:
            if self._drainer is None:
                self._drainer = threading.Thread(target=self.drain, name="tinkerd-drain")
                self._drainer.start()

    def drain(self) -> None:
        """SIGTERM: take no new work (503), finish what is running and queued (checkpoints
        included) within `drain_seconds`, fail what is left with a server error, keep every
        model for the next start (`save_models`), give clients waiting on futures a moment to
        collect their results, then stop."""
        queued = self.scheduler.queue_depth()
        log.log(
            logging.WARNING if queued else logging.INFO,
            "draining: no new work; finishing %d queued request(s) (at most %.0f s)",
            queued,
            self.settings.drain_seconds,
        )
        self.scheduler.close(
            "tinkerd is shutting down and takes no new work; send it again once it is back"
        )
        self.worker.drain(self.settings.drain_seconds)
        self.save_models()
        time.sleep(DRAIN_GRACE_SECONDS)
        self.stop()

    def save_models(self) -> list[str]:
        """Once drained: save each model exactly as it is, for the next start on this data
        directory to restore (`suspend`). Returns their ids."""
        saved = []
        for model_id in self.backend.held()["models"]:
            next_seq, _ = self.scheduler.take_model(model_id)
            try:
                suspend.save(
                    self.backend,
                    self.settings.data_dir,
                    model_id,
                    max(next_seq - 1, 0),
                    "tinkerd serve",
                    self.registry.records_of(model_id),
                )
            except Exception:  # noqa: BLE001 - the others are still saved
                log.exception("could not save model %s: it is lost with this process", model_id)
                continue
            saved.append(model_id)
        if saved:
            log.warning(
                "saved %d model(s) in %s; the next start on it restores them",
                len(saved),
                suspend.stopped_dir(self.settings.data_dir),
            )
        return saved

    def restore_stopped(self) -> list[str]:
        """Before the worker starts: re-create each model that the last clean stop saved, in
        this thread, so that it answers its next seq_id from the first request. Returns their
        ids."""
        restored = []
        for model in suspend.claim(self.settings.data_dir):
            suspend.restore(model, self.scheduler, self.registry)
            restored.append(model.model_id)
        while self.scheduler.has_ready():
            self.worker.run_cycle(0)
        return restored

    def stop(self) -> None:
        """Close the listener and every open connection, then stop the worker and sweeper."""
        self._stop.set()
        wasyncore.close_all(self._http._map)  # the HTTP loop ends once its map is empty
        self._http.task_dispatcher.shutdown()
        self.worker.stop()
        for thread in self._threads:
            thread.join(5)
