"""The HTTP surfaces, one blueprint each; helpers every view uses."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

from flask import Response, current_app, g, jsonify, request

from tinkerd import audit as audit_log
from tinkerd.base_models import BaseModelSource
from tinkerd.config import InputLimits
from tinkerd.keys import ApiKey
from tinkerd.registry import ModelRecord, Registry, Session
from tinkerd.results import Result
from tinkerd.storage import MAX_TTL_SECONDS
from tinkerd.types import (
    AdamParams,
    CreateModel,
    LoraConfig,
    NotFound,
    Payload,
    Rejected,
    TinkerdError,
    TooManyRequests,
    UserError,
    error_body,
)

MAX_LORA_RANK = 1024
# A session silent this long no longer counts its models against its key's `max_models`.
SESSION_IDLE_SECONDS = 600.0
# What a 429 asks the client to wait: a queued request finishes in about a step; a model slot
# frees only when the user deletes a model or ends a session.
QUEUE_RETRY_SECONDS = 1.0
MODELS_RETRY_SECONDS = 30.0
# The 4xx answers the SDK sends again with the same seq_id (as it does every 5xx).
RETRIED_STATUSES = (408, 409, 429)


def service():
    """The app's Service (settings, scheduler, registry)."""
    return current_app.extensions["tinkerd"]


def caller() -> ApiKey:
    """The API key of this request (`keys.OPEN` on a server without keys), set by the app's
    authentication before any view runs."""
    return g.api_key


def registry() -> Registry:
    """The registry as this request's key sees it: another key's records are NotFound."""
    key = caller()
    return service().registry.seen_by(key.name, key.admin)


def audit(event: str, **details: Any) -> None:
    """Record in the audit log that this request's key did `event` (`tinkerd.audit`)."""
    audit_log.record(service().audit, caller().name, event, **details)


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


def limits() -> InputLimits:
    """The settings' limits on datums and tokens per request."""
    return service().settings.input_limits


def page(default_limit: int = 20) -> tuple[int, int]:
    """A listing's `limit` and `offset` query parameters."""
    try:
        limit = int(request.args.get("limit", default_limit))
        offset = int(request.args.get("offset", 0))
    except ValueError:
        raise UserError("limit and offset must be integers") from None
    if limit < 1 or offset < 0:
        raise UserError("limit must be positive and offset not negative")
    return limit, offset


def json_body(raw: bytes | None = None) -> dict[str, Any]:
    """The request's JSON object body (or `raw`'s, a body already read and decompressed)."""
    try:
        if raw is None:
            body = request.get_json(force=True, silent=True)
        else:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
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
    maximum: float | None = None,
) -> float:
    """A finite number in [minimum, below), or in [minimum, maximum] when `maximum` is given;
    a UserError naming the field and its range otherwise."""
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{key!r} must be a finite number, got {value!r}")
    if maximum is not None and not minimum <= value <= maximum:
        raise UserError(f"{key!r} must be in [{minimum}, {maximum}], got {value!r}")
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
    if seed is not None and not -(2**63) <= seed < 2**64:  # what torch.manual_seed takes
        raise UserError(f"lora seed must be in [-2**63, 2**64), got {seed!r}")
    return LoraConfig(
        rank=rank,
        seed=seed,
        train_mlp=get_bool(raw, "train_mlp", True),
        train_attn=get_bool(raw, "train_attn", True),
        train_unembed=get_bool(raw, "train_unembed", True),
    )


def check_optimizer_config(raw: Any) -> None:
    """The optimizer a model is created with: AdamW (absent means AdamW), the only one tinkerd
    trains with; anything else is a 400 naming it, before anything is created."""
    if raw is None:
        return
    kind = raw.get("type", "adamw") if isinstance(raw, dict) else raw
    if kind == "adamw":
        return
    if kind == "dimuon":
        raise UserError(
            "optimizer_config: the Dimuon optimizer (DimuonOptimizerConfig) is not supported; "
            "tinkerd trains with AdamW: create the model with AdamOptimizerConfig (the "
            "default) and step it with AdamParams"
        )
    raise UserError(
        f"unsupported optimizer_config {raw!r}: tinkerd trains with AdamW "
        "(AdamOptimizerConfig, the default)"
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


def get_ttl_seconds(body: dict[str, Any]) -> float | None:
    """A checkpoint's `ttl_seconds`: None (absent) never expires, else (0, 10 years]. A
    longer one would store an expiry past what a time can hold, and break listings."""
    if body.get("ttl_seconds") is None:
        return None
    return get_float(body, "ttl_seconds", minimum=1e-9, maximum=MAX_TTL_SECONDS)


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
