"""The Flask app factory: JSON errors everywhere, and the API blueprints.

The app only validates and queues: it talks to workers through the scheduler in
`app.extensions["tinkerd"]` and never imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from tinkerd.config import Settings
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


def create_app(
    settings: Settings,
    scheduler: TaskQueue,
    registry: Registry | None = None,
    store: CheckpointStore | None = None,
) -> Flask:
    from tinkerd.api import openai, ops, runs, sampling, simple, tinker, weights

    store = store or CheckpointStore(settings.data_dir / "runs")
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["tinkerd"] = Service(settings, scheduler, registry or Registry(store), store)

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
    return app
