"""The Flask app factory: JSON errors everywhere, and the API blueprints.

The app only validates and queues: it talks to workers through the scheduler in
`app.extensions["tinkerd"]` and never imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from tinkerd.config import Settings
from tinkerd.metrics import LocalMonitor, MonitorStore
from tinkerd.registry import Registry
from tinkerd.storage import CheckpointStore
from tinkerd.tasks import TaskQueue
from tinkerd.types import TinkerdError

log = logging.getLogger(__name__)


@dataclass
class Service:
    """What the views share: settings, the queue to the workers, and session/model metadata."""

    settings: Settings
    scheduler: TaskQueue
    registry: Registry
    store: CheckpointStore
    monitor: MonitorStore = field(default_factory=LocalMonitor)


def create_app(
    settings: Settings,
    scheduler: TaskQueue,
    registry: Registry | None = None,
    store: CheckpointStore | None = None,
    monitor: MonitorStore | None = None,
) -> Flask:
    from tinkerd.api import monitor as monitoring
    from tinkerd.api import openai, ops, runs, sampling, simple, tinker, weights

    store = store or CheckpointStore(settings.data_dir / "runs")
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # No redirects (with an HTML body) for '//' or a missing trailing slash: such paths 404 (JSON).
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    # Larger bodies answer 413 (JSON, by http_error) before they are read.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["tinkerd"] = Service(
        settings, scheduler, registry or Registry(store), store, monitor or LocalMonitor()
    )

    @app.before_request
    def refuse_large_bodies() -> None:
        # Also on routes that never read their body; a chunked body is cut where it passes
        # the limit as it is read.
        if (request.content_length or 0) > settings.max_request_bytes:
            raise RequestEntityTooLarge(
                f"the request body is {request.content_length} bytes; "
                f"the server takes at most {settings.max_request_bytes}"
            )

    @app.errorhandler(TinkerdError)
    def tinkerd_error(e: TinkerdError):
        return jsonify(e.to_json()), e.status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        category = "user" if (e.code or 500) < 500 else "server"
        return jsonify({"error": f"{e.name}: {e.description}", "category": category}), e.code

    @app.errorhandler(Exception)
    def unexpected_error(e: Exception):
        log.exception("unhandled error")
        return jsonify(
            {"error": f"internal error: {type(e).__name__}: {e}", "category": "server"}
        ), 500

    for blueprint in (tinker.bp, weights.bp, sampling.bp, runs.bp, ops.bp, openai.bp, simple.bp):
        app.register_blueprint(blueprint)
    app.register_blueprint(monitoring.bp)  # /metrics, system status, run events; times requests
    return app
