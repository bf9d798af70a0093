"""The Flask app factory: JSON errors everywhere, and the API blueprints.

The app only validates and queues: it talks to workers through the scheduler in
`app.extensions["tinkerd"]` and never imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from tinkerd.audit import AuditLog, audit_store
from tinkerd.config import Settings
from tinkerd.downloads import PREFIX as DOWNLOADS
from tinkerd.keys import KeyRing, key_store
from tinkerd.metrics import LocalMonitor, MonitorStore
from tinkerd.registry import Registry
from tinkerd.storage import CheckpointStore
from tinkerd.tasks import TaskQueue
from tinkerd.types import (
    ServerError,
    TinkerdError,
    TooManyRequests,
    Unauthorized,
    error_body,
    status_error,
)

log = logging.getLogger(__name__)

# Served to anyone: liveness for load balancers, the console page and the API's OpenAPI
# description (they hold no data; the console's comes from the key-checked JSON routes), and
# signed download URLs (their signature is their grant: `tinkerd.downloads`).
PUBLIC_PATHS = ("/healthz", "/api/v1/healthz", "/console", "/openapi.json", DOWNLOADS)


def error_response(error: TinkerdError) -> Response:
    """The JSON answer to an error (`error_body`) with its status, and the Retry-After a
    `TooManyRequests` asks for."""
    response = jsonify(error_body(error))
    response.status_code = error.status
    if isinstance(error, TooManyRequests):
        response.headers["Retry-After"] = f"{error.retry_after:g}"
    return response


@dataclass
class Service:
    """What the views share: settings, the queue to the workers, and session/model metadata."""

    settings: Settings
    scheduler: TaskQueue
    registry: Registry
    store: CheckpointStore
    monitor: MonitorStore = field(default_factory=LocalMonitor)
    keys: KeyRing | None = None
    audit: AuditLog | None = None  # what each key did (`tinkerd.audit`)


def create_app(
    settings: Settings,
    scheduler: TaskQueue,
    registry: Registry | None = None,
    store: CheckpointStore | None = None,
    monitor: MonitorStore | None = None,
    keys: KeyRing | None = None,
    audit: AuditLog | None = None,
) -> Flask:
    from tinkerd.api import (
        checkpoints,
        console,
        openai,
        openapi,
        ops,
        runs,
        sampling,
        sessions,
        simple,
        tinker,
        weights,
    )
    from tinkerd.api import monitor as monitoring

    store = store or CheckpointStore(settings.data_dir / "runs")
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # No redirects (with an HTML body) for '//' or a missing trailing slash: such paths 404 (JSON).
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    # Larger bodies answer 413 (JSON, by http_error) before they are read.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    keys = keys or KeyRing(key_store(settings.data_dir, settings.redis_url))
    audit = audit or audit_store(settings.data_dir, settings.redis_url)
    app.extensions["tinkerd"] = Service(
        settings,
        scheduler,
        registry or Registry(store),
        store,
        monitor or LocalMonitor(),
        keys,
        audit,
    )
    if keys.open:
        log.warning(
            "no API keys required: this server is OPEN to anyone who can reach it; "
            "`tinkerd keys create NAME` makes one, and from then on every request needs one"
        )
    elif not keys.active:
        log.warning(
            "this server is keyed but holds no active key: it refuses every request (401); "
            "`tinkerd keys create NAME` makes one, `tinkerd keys open` runs it open"
        )

    @app.before_request
    def authenticate() -> None:
        """Every request but the public ones names its key in X-API-Key (as the SDK sends it)
        or `Authorization: Bearer` (as Prometheus and curl users may)."""
        presented = request.headers.get("X-API-Key")
        bearer = request.headers.get("Authorization", "")
        if not presented and bearer.lower().startswith("bearer "):
            presented = bearer[7:].strip()
        g.api_key = keys.find(presented)
        public = request.path.startswith(PUBLIC_PATHS)
        if g.api_key is None and not public:
            raise Unauthorized(
                "a valid API key is required: send it in the X-API-Key header"
                if presented
                else "this server needs an API key: send it in the X-API-Key header"
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

    app.register_error_handler(TinkerdError, error_response)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        error = status_error(f"{e.name}: {e.description}", e.code or 500)
        return jsonify(error_body(error)), e.code

    @app.errorhandler(Exception)
    def unexpected_error(e: Exception):
        log.exception("unhandled error")
        return error_response(ServerError(f"internal error: {type(e).__name__}: {e}"))

    blueprints = (tinker.bp, weights.bp, sampling.bp, runs.bp, checkpoints.bp, sessions.bp)
    for blueprint in (*blueprints, ops.bp, openai.bp, simple.bp):
        app.register_blueprint(blueprint)
    app.register_blueprint(monitoring.bp)  # /metrics, system status, run events; times requests
    app.register_blueprint(console.bp)  # /console: the web console page (data via the API)
    app.register_blueprint(openapi.bp)  # /openapi.json: the API's description
    return app
