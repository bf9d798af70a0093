"""Queueing a request as this request's key: its limits, its ids and its ordering.

Each submit goes to the app's scheduler with the key's tenant and priority, after the key's
`max_queued` allows it; the id returned is marked with the key, so another key asking for it is
told it does not exist.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from flask import Response, jsonify

from tinkerd.api import audit, caller, registry, service
from tinkerd.api.validation import fingerprint
from tinkerd.base_models import BaseModelSource
from tinkerd.registry import ModelRecord, Session
from tinkerd.results import Result
from tinkerd.types import (
    CreateModel,
    NotFound,
    Payload,
    Rejected,
    TinkerdError,
    TooManyRequests,
    UserError,
    error_body,
)

# A session silent this long no longer counts its models against its key's `max_models`.
SESSION_IDLE_SECONDS = 600.0
# What a 429 asks the client to wait: a queued request finishes in about a step; a model slot
# frees only when the user deletes a model or ends a session.
QUEUE_RETRY_SECONDS = 1.0
MODELS_RETRY_SECONDS = 30.0
# The 4xx answers the SDK sends again with the same seq_id (as it does every 5xx).
RETRIED_STATUSES = (408, 409, 429)


def _queue_room() -> dict[str, Any]:
    """The scheduling of this key's next request, once its `max_queued` allows one more."""
    key = caller()
    if key.max_queued is not None:
        queued = service().scheduler.pending(key.name)
        if queued >= key.max_queued:
            raise TooManyRequests(
                f"key {key.name!r} has {queued} requests queued or running, its limit "
                f"(max_queued {key.max_queued}); send this one again when some finish",
                QUEUE_RETRY_SECONDS,
            )
    return _scheduling()


def _scheduling() -> dict[str, Any]:
    """The tenant and priority a request of this key is queued with."""
    key = caller()
    return {"tenant": key.name, "priority": key.priority}


def _tag(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:12] if owner else ""


def _public_id(request_id: str) -> str:
    """The id a client gets for its request: the queue's, marked with its key, so that
    another key asking for it is told it does not exist."""
    tag = _tag(caller().name)
    return f"{tag}.{request_id}" if tag else request_id


def wait(public_id: str, timeout: float) -> Result | None:
    """The result of one of this key's requests (None while pending); NotFound for another
    key's, as for an unknown id."""
    tag, _, request_id = public_id.rpartition(".")
    key = caller()
    if tag != _tag(key.name) and not key.admin:
        raise NotFound(f"unknown request_id {public_id!r} (it may have expired)")
    return service().scheduler.wait(request_id, timeout)


def submit(model_id: str, seq_id: int, payload: Payload, content: str) -> str:
    """Queue a model's request as (model_id, seq_id), as this request's key."""
    scheduler = service().scheduler
    return _public_id(scheduler.submit(model_id, seq_id, payload, content, **_queue_room()))


def submit_next(model_id: str, payload: Payload) -> str:
    """Queue a model's request as its next one, the server choosing the seq_id."""
    return _public_id(service().scheduler.submit_next(model_id, payload, **_queue_room()))


def submit_unordered(key: str, seq_id: int, payload: Payload, content: str) -> str:
    """Queue a request outside any model's order (sampling). Retries are told apart by
    (key, seq_id) within this API key's own namespace: two keys sampling one base model with the
    same seq_id are different requests."""
    scheduler = service().scheduler
    tag = _tag(caller().name)
    key = f"{tag}/{key}" if tag else key
    return _public_id(scheduler.submit_unordered(key, seq_id, payload, content, **_queue_room()))


def check_model_room() -> None:
    """429 when this key holds `max_models` live models: those of its simple-API adapters and
    of its sessions that are neither finished nor idle."""
    key = caller()
    if key.max_models is None:
        return
    reg = service().registry.seen_by(key.name)
    now = time.time()

    def live(model: ModelRecord) -> bool:
        try:
            session = reg.session(model.session_id)
        except UserError:  # the simple JSON API's adapters have no SDK session
            return True
        return not session.finished and now - session.last_heartbeat < SESSION_IDLE_SECONDS

    held = sum(live(m) for m in reg.models())
    if held >= key.max_models:
        raise TooManyRequests(
            f"key {key.name!r} holds {held} live models, its limit (max_models "
            f"{key.max_models}); delete one or end a session first",
            MODELS_RETRY_SECONDS,
        )


def submit_ordered(
    model_id: str, seq_id: int, content: str, build: Callable[[], Payload]
) -> Response:
    """Queue build() as (model_id, seq_id) and answer its future. A request that fails validation
    still takes its seq_id (as a Rejected task), so the model's later requests are not left
    waiting for it. An answer the SDK retries (429, a server error) takes nothing: the same
    seq_id comes again. A model whose creation failed is listed nowhere, but its requests are
    still queued: its worker answers each with the reason."""
    try:
        registry().touch_model(model_id)
    except NotFound:
        if registry().failed(model_id) is None:
            raise
    try:
        payload = build()
    except UserError as e:
        if e.status not in RETRIED_STATUSES:
            record_refused(model_id, seq_id, content, e)
        raise
    request_id = submit(model_id, seq_id, payload, content)
    return jsonify({"request_id": request_id, "model_id": model_id})


def record_refused(model_id: str, seq_id: int, content: str, error: TinkerdError) -> bool:
    """Take (model_id, seq_id) as a Rejected request that settles to `error`, as this request's
    key, so the model's later requests do not wait for one the server refused (the SDK numbers
    every training request and sends the next whatever became of this one). Not counted
    against the key's `max_queued`: refusing it would leave the gap. False, and nothing held
    open, for another key's or an unknown model, a seq_id from the past or a clash."""
    try:
        registry().model(model_id)  # this key's
        service().scheduler.submit(
            model_id, seq_id, Rejected(error_body(error)), content, **_scheduling()
        )
    except TinkerdError:
        return False
    return True


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
    metadata = body.get("user_metadata") or {}
    if not isinstance(metadata, dict):  # kept with the run, whose listing reads it as one
        raise UserError("user_metadata must be an object")
    model_id = f"{session.session_id}:train:{model_seq_id}"
    retried = svc.registry.exists("model", model_id)
    if not retried:  # a retried create is let through
        check_model_room()
    record = ModelRecord(
        model_id,
        session.session_id,
        source.name,
        source.tokenizer_id,
        create.lora,
        metadata,
    )
    if registry().add_model(record).lora != create.lora:
        raise UserError(f"model_seq_id {model_seq_id} of this session is already a different model")
    svc.scheduler.open_model(model_id)
    request_id = submit(model_id, 0, create, fingerprint(body))
    if not retried:
        audit(
            "training_run_create",
            model_id=model_id,
            base_model=source.name,
            lora_rank=create.lora.rank,
            from_checkpoint=create.from_checkpoint,
        )
    return jsonify({"request_id": request_id, "model_id": model_id})
