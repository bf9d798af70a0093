"""The HTTP surfaces, one blueprint each; helpers every view uses."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from flask import Response, current_app, jsonify, request

from tinkerd.base_models import BaseModelSource
from tinkerd.config import InputLimits
from tinkerd.registry import ModelRecord, Session
from tinkerd.types import AdamParams, CreateModel, LoraConfig, Payload, Rejected, UserError

MAX_LORA_RANK = 1024


def service():
    """The app's Service (settings, scheduler, registry)."""
    return current_app.extensions["tinkerd"]


def limits() -> InputLimits:
    """The settings' limits on datums and tokens per request."""
    return service().settings.input_limits


def json_body() -> dict[str, Any]:
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:  # a body nested deeper than the decoder recurses
        raise UserError("the request body is not valid JSON: nested too deeply") from None
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


def lora_config(raw: Any) -> LoraConfig:
    """A checked LoRA config from the SDK's `lora_config` object (rank 32 when absent)."""
    if not isinstance(raw, dict):
        raise UserError("lora_config must be an object")
    rank = get_int(raw, "rank", 32, minimum=1)
    if rank > MAX_LORA_RANK:
        raise UserError(f"lora rank must be at most {MAX_LORA_RANK}, got {rank}")
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UserError(f"lora seed must be an integer, got {seed!r}")
    return LoraConfig(
        rank=rank,
        seed=seed,
        train_mlp=get_bool(raw, "train_mlp", True),
        train_attn=get_bool(raw, "train_attn", True),
        train_unembed=get_bool(raw, "train_unembed", True),
    )


def adam_params(raw: Any) -> AdamParams:
    """Checked AdamParams from the SDK's `adam_params` object; absent fields take the defaults."""
    if not isinstance(raw, dict):
        raise UserError("adam_params must be an object")
    defaults = AdamParams()
    return AdamParams(
        learning_rate=get_float(raw, "learning_rate", defaults.learning_rate),
        beta1=get_float(raw, "beta1", defaults.beta1, below=1.0),
        beta2=get_float(raw, "beta2", defaults.beta2, below=1.0),
        eps=get_float(raw, "eps", defaults.eps),
        weight_decay=get_float(raw, "weight_decay", defaults.weight_decay),
        grad_clip_norm=get_float(raw, "grad_clip_norm", defaults.grad_clip_norm),
    )


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
