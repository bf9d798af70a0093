"""The HTTP surfaces, one blueprint each; helpers every view uses."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from flask import Response, current_app, jsonify, request

from tinkerd.base_models import BaseModelSource
from tinkerd.registry import ModelRecord, Session
from tinkerd.types import CreateModel, Payload, Rejected, UserError


def service():
    """The app's Service (settings, scheduler, registry)."""
    return current_app.extensions["tinkerd"]


def json_body() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    return body


def fingerprint(body: dict[str, Any]) -> str:
    """Identifies a request's content, so a retry can be told from a clash of seq_ids."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def get_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise UserError(f"{key!r} must be a non-empty string")
    return value


def get_int(body: dict[str, Any], key: str, default: int | None = None, minimum: int = 0) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def get_float(
    body: dict[str, Any],
    key: str,
    default: float | None = None,
    minimum: float = 0.0,
    below: float = math.inf,
) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{key!r} must be a finite number, got {value!r}")
    if not minimum <= value < below:
        raise UserError(f"{key!r} must be in [{minimum}, {below}), got {value!r}")
    return float(value)


def get_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"{key!r} must be true or false, got {value!r}")
    return value


def submit_ordered(
    model_id: str, seq_id: int, content: str, build: Callable[[], Payload]
) -> Response:
    """Queue build() as (model_id, seq_id) and answer its future. A request that fails validation
    still takes its seq_id (as a Rejected task), so the model's later requests are not left
    waiting for it."""
    svc = service()
    svc.registry.touch_model(model_id)
    try:
        payload = build()
    except UserError as e:
        try:
            svc.scheduler.submit(model_id, seq_id, Rejected(e.to_json()), content)
        except UserError:
            pass  # a seq_id from the past or a clash: nothing to hold open
        raise
    request_id = svc.scheduler.submit(model_id, seq_id, payload, content)
    return jsonify({"request_id": request_id, "model_id": model_id})


def get_optional_float(body: dict[str, Any], key: str) -> float | None:
    """A positive number, or None when absent."""
    if body.get(key) is None:
        return None
    return get_float(body, key, minimum=1e-9)


def start_model(
    session: Session,
    model_seq_id: int,
    source: BaseModelSource,
    create: CreateModel,
    body: dict[str, Any],
) -> Response:
    """Register `{session}:train:{model_seq_id}` (the id the SDK computes) and queue its creation
    as the model's seq 0; a retry answers the first request's future."""
    svc = service()
    model_id = f"{session.session_id}:train:{model_seq_id}"
    record = ModelRecord(
        model_id,
        session.session_id,
        source.name,
        source.tokenizer_id,
        create.lora,
        body.get("user_metadata") or {},
    )
    if svc.registry.add_model(record).lora != create.lora:
        raise UserError(f"model_seq_id {model_seq_id} of this session is already a different model")
    svc.scheduler.open_model(model_id)
    request_id = svc.scheduler.submit(model_id, 0, create, fingerprint(body))
    return jsonify({"request_id": request_id, "model_id": model_id})
