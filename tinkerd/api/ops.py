"""Operational routes outside the SDK protocol: health and the loss registry."""

from __future__ import annotations

from flask import Blueprint, jsonify

from tinkerd.api import service
from tinkerd.loss_functions import LOSSES

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
@bp.get("/api/v1/healthz")
def healthz():
    """Ok when the queue to the workers answers (503 while a cluster's Redis is down)."""
    svc = service()
    return jsonify({"status": "ok", "queue_depth": svc.scheduler.queue_depth()})


@bp.get("/loss_functions")
@bp.get("/api/v1/loss_functions")
def loss_functions():
    """Each loss with its inputs, config and formula; also in the simple JSON API's shape
    (`available_loss_functions`, and `descriptions` by name: the first line of each)."""
    return jsonify(
        {
            "loss_functions": [
                {
                    "name": loss.name,
                    "description": loss.description,
                    "loss_fn_inputs": list(loss.inputs),
                    "loss_fn_input_defaults": loss.input_defaults,  # inputs that may be left out
                    "loss_fn_config": loss.config,
                    "loss_fn_outputs": ["logprobs", "elementwise_loss"],
                }
                for loss in LOSSES.values()
            ],
            "available_loss_functions": list(LOSSES),
            "descriptions": {
                name: loss.description.split("\n", 1)[0] for name, loss in LOSSES.items()
            },
        }
    )
