"""The Tinker REST protocol of SDK 0.38 under /api/v1 (see shared/reference/tinker-protocol.md).

Each view validates its request, queues it as plain data keyed by (model_id, seq_id) and answers a
future id at once; `retrieve_future` long-polls for the result and encodes it as the SDK reads it.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, jsonify, request

from tinkerd.api import audit, limits, registry, service
from tinkerd.api.queueing import record_refused, start_model, submit_next, submit_ordered, wait
from tinkerd.api.validation import (
    adam_params,
    check_optimizer_config,
    fingerprint,
    get_int,
    get_optional_str,
    get_str,
    json_body,
    lora_config,
)
from tinkerd.base_models import TINY_MODEL, resolve_base_model
from tinkerd.results import Kind, Result
from tinkerd.types import AdamParams, CreateModel, OptimStep, RemoveModel, UserError, error_body
from tinkerd.wire.decode import (
    decompress_zstd,
    forward_backward_from_proto,
    parse_forward_backward_json,
    parse_forward_backward_proto,
)
from tinkerd.wire.encode import encode_forward_backward_output, encode_sample_response

bp = Blueprint("tinker", __name__, url_prefix="/api/v1")


# -- bootstrap and sessions ------------------------------------------------------------------


@bp.post("/client/config")
def client_config():
    # Every flag at its SDK default but these: no JWTs, and the fwd/bwd protobuf body comes
    # zstd-compressed (`Content-Encoding: zstd`; about 10x smaller).
    return jsonify({"pjwt_auth_enabled": False, "proto_compress_fwdbwd": True})


@bp.post("/client/dynamic_config")
def dynamic_config():
    return jsonify({"refresh_interval_sec": 300, "sample_cancel_enabled": False})


@bp.post("/create_session")
def create_session():
    body = json_body()
    tags = body.get("tags") or []
    metadata = body.get("user_metadata") or {}
    if not isinstance(tags, list) or not isinstance(metadata, dict):
        raise UserError("tags must be a list and user_metadata an object")
    labels = {k: get_optional_str(body, k) for k in ("display_name", "project_id")}
    session = registry().create_session([str(t) for t in tags], metadata, **labels)
    audit("session_create", session_id=session.session_id, **labels)
    return jsonify({"session_id": session.session_id})


@bp.post("/session_heartbeat")
def session_heartbeat():
    session = registry().heartbeat(get_str(json_body(), "session_id"))
    if session.finished:  # 410 tells the SDK to stop heartbeating
        raise UserError("session is finished", 410)
    return jsonify({})


@bp.post("/sessions/<session_id>/finish")
def finish_session(session_id: str):
    reason = json_body().get("reason") or {}
    finished = reason.get("type", "success") if isinstance(reason, dict) else "success"
    registry().finish_session(session_id, str(finished))
    return jsonify({})


@bp.post("/telemetry")
def telemetry():
    return jsonify({"status": "accepted"})


@bp.get("/get_server_capabilities")
def server_capabilities():
    """The base models in use. Each one trains LoRA adapters and also samples, as itself
    (`create_sampling_client(base_model=...)`) and through its adapters' checkpoints."""
    svc = service()
    names = [TINY_MODEL] + sorted(
        {svc.settings.base_model, *(m.base_model for m in registry().models())} - {TINY_MODEL}
    )
    return jsonify(
        {
            "supported_models": [
                {"model_name": n, "trainable": True, "sampleable": True} for n in names
            ]
        }
    )


# -- models and training ---------------------------------------------------------------------


@bp.post("/create_model")
def create_model():
    body = json_body()
    svc = service()
    session = registry().session(get_str(body, "session_id"))
    if session.finished:
        raise UserError(f"session {session.session_id} is finished; create a new ServiceClient")
    model_seq_id = get_int(body, "model_seq_id")
    source = resolve_base_model(body.get("base_model"), svc.settings.data_dir)
    lora = lora_config(body.get("lora_config") or {})
    check_optimizer_config(body.get("optimizer_config"))
    return start_model(session, model_seq_id, source, CreateModel(source.name, lora), body)


@bp.post("/get_info")
def get_info():
    return jsonify(registry().model(get_str(json_body(), "model_id")).info())


@bp.post("/forward_backward")
def forward_backward():
    """The SDK's protobuf ForwardBackwardRequest (zstd-compressed when `client/config` says
    so), or the same request as JSON."""
    raw = _body_bytes()
    if request.mimetype == "application/json":
        body = json_body(raw)
        model_id, seq_id = get_str(body, "model_id"), get_int(body, "seq_id")
        return submit_ordered(
            model_id, seq_id, fingerprint(body), lambda: parse_forward_backward_json(body, limits())
        )
    msg, content = parse_forward_backward_proto(raw)
    return submit_ordered(
        msg.model_id, msg.seq_id, content, lambda: forward_backward_from_proto(msg, limits())
    )


def _body_bytes() -> bytes:
    """The request body, decompressed if it came `Content-Encoding: zstd` (the size limit then
    holds for the decompressed bytes, checked as they come: `wire.decode.decompress_zstd`)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return request.get_data()
    if encoding != "zstd":
        raise UserError(f"Content-Encoding {encoding!r} is not supported: send zstd or none", 415)
    return decompress_zstd(request.get_data(), service().settings.max_request_bytes)


@bp.post("/optim_step")
def optim_step():
    body = json_body()
    model_id, seq_id = get_str(body, "model_id"), get_int(body, "seq_id")
    return submit_ordered(
        model_id, seq_id, fingerprint(body), lambda: OptimStep(_adam_params(body))
    )


def _adam_params(body: dict[str, Any]) -> AdamParams:
    if "optimizer_params" in body and "adam_params" not in body:
        params = body["optimizer_params"]
        name = params.get("type") if isinstance(params, dict) else None
        what = "DimuonParams (the Dimuon optimizer)" if name == "dimuon" else f"{name!r} params"
        raise UserError(
            f"optimizer_params: {what} are not supported; tinkerd trains with AdamW: "
            "step with AdamParams (adam_params)"
        )
    return adam_params(body.get("adam_params"))


@bp.post("/unload_model")
def unload_model():
    """Free a model (older SDKs' `models.unload`): after the requests queued before it, its
    worker drops its adapter, optimizer state and sampling snapshots; its run and checkpoints
    stay listed (resume it with `create_training_client_from_state`). Answers a future whose
    result is `{model_id, type: "unload_model"}`."""
    model_id = get_str(json_body(), "model_id")
    registry().remove_model(model_id)  # this key's; later requests for it are NotFound
    request_id = submit_next(model_id, RemoveModel())
    audit("training_run_unload", model_id=model_id)
    return jsonify({"request_id": request_id, "model_id": model_id})


@bp.after_app_request
def take_unserved_seq_id(response: Response) -> Response:
    """A POST under /api/v1 that no route serves (a newer SDK's) whose JSON body names a
    model_id and seq_id still takes that seq_id, as a rejected request:
    the SDK numbers each training request and sends the model's next one whatever became of
    this one, which would wait for it. An app hook: a path no route matches has no view."""
    if (
        response.status_code not in (404, 405)
        or request.routing_exception is None
        or request.method != "POST"
        or not request.path.startswith(f"{bp.url_prefix}/")
    ):
        return response
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:
        return response
    if not isinstance(body, dict):
        return response
    model_id, seq_id = body.get("model_id"), body.get("seq_id")
    if not isinstance(model_id, str) or type(seq_id) is not int or seq_id < 0:
        return response
    error = UserError(f"tinkerd does not serve POST {request.path}; nothing of it was applied")
    if record_refused(model_id, seq_id, fingerprint(body), error):
        error.message += f" (seq_id {seq_id} of {model_id} is taken, so its later requests run)"
        response.set_data(json.dumps(error_body(error)))
    return response


# -- futures ---------------------------------------------------------------------------------


@bp.post("/retrieve_future")
def retrieve_future():
    svc = service()
    request_id = get_str(json_body(), "request_id")
    result = wait(request_id, svc.settings.long_poll_seconds)
    if result is None:
        return jsonify({"type": "try_again", "request_id": request_id, "queue_state": "active"})
    return encoded(result)


def encoded(result: Result) -> Response:
    """A result as the SDK reads it: forward/backward and sample results as its protobuf
    (the only form it takes for them), the others as JSON; an error as its error body, status
    200 (the SDK raises it as the request's failure)."""
    if result.kind is Kind.FORWARD_BACKWARD:
        body = encode_forward_backward_output(result.forward_backward())
        return Response(body, content_type="application/x-protobuf")
    if result.kind is Kind.SAMPLE:
        return Response(
            encode_sample_response(result.sample()), content_type="application/x-protobuf"
        )
    value = {"metrics": result.value} if result.kind is Kind.OPTIM_STEP else result.value
    return Response(json.dumps(value), content_type="application/json")
