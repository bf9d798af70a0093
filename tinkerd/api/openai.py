"""OpenAI-compatible serving under /v1: completions, chat completions and the model list.

Text in, text out over the SDK's own sampling path: a view tokenizes the prompt (or renders the
conversation with the chat template) with the base model's TextCodec, queues a `Sample` on the
scheduler's unordered queue exactly as asample does, waits on its future and decodes the tokens.
The engine returns whole sequences, so `stream=true` sends a sequence's chunks once it is
generated. Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
Reading a request is in `openai_request.py`, answering it in `openai_response.py`; this module
holds the routes and the error shape.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from flask import Blueprint, Response, jsonify, request

from tinkerd.api import registry, service
from tinkerd.api.openai_request import (
    check_length,
    completion_prompts,
    option,
    resolve_target,
    sampling_params,
    stream_options,
    text_messages,
)
from tinkerd.api.openai_response import Reply
from tinkerd.api.validation import get_bool, get_int, json_body
from tinkerd.api.weights import checkpoint_meta
from tinkerd.base_models import TINY_MODEL
from tinkerd.text import validate_messages
from tinkerd.types import OpenAIError, TinkerdError, UserError, error_body
from tinkerd.wire.limits import MAX_NUM_SAMPLES

bp = Blueprint("openai", __name__, url_prefix="/v1")


@bp.errorhandler(TinkerdError)
def tinkerd_error(e: TinkerdError):
    return jsonify(error_body(e, openai=True)), e.status


@bp.after_app_request
def openai_errors(response: Response) -> Response:
    """The app's other error answers under /v1 (`{"error": "...", "category"}`: an unknown
    method or path, an internal error, a cluster's Redis being down) in OpenAI's shape, status
    and headers kept. An app hook, as a path no route matches never reaches the blueprint's."""
    if request.path != bp.url_prefix and not request.path.startswith(f"{bp.url_prefix}/"):
        return response
    body = response.get_json(silent=True) if response.is_json else None
    if (
        response.status_code >= 400
        and isinstance(body, dict)
        and isinstance(body.get("error"), str)
    ):
        error = TinkerdError(body["error"], response.status_code)
        response.set_data(json.dumps(error_body(error, openai=True)))
    return response


# -- the routes ------------------------------------------------------------------------------


@bp.get("/models")
def list_models():
    """The built-in model, the base models of live training runs, and every run's sampler
    checkpoints (each with its base model as `parent`)."""
    svc = service()
    cards = {TINY_MODEL: _card(TINY_MODEL, 0)}
    for model in sorted(registry().models(), key=lambda m: m.created_at):
        cards.setdefault(model.base_model, _card(model.base_model, model.created_at))
    for run in registry().runs():
        for meta in svc.store.list(run.model_id):
            if meta.kind == "sampler_weights":
                cards[meta.tinker_path] = _card(meta.tinker_path, meta.created_at, meta.base_model)
    return jsonify({"object": "list", "data": list(cards.values())})


@bp.get("/models/<path:model>", merge_slashes=False)
def get_model(model: str):
    if model.startswith("tinker:/") and not model.startswith("tinker://"):
        model = "tinker://" + model[len("tinker:/") :]  # a proxy merged the slashes
    target = resolve_target(model)
    if target.weights.model_path is None:
        return jsonify(_card(model, 0))
    meta = checkpoint_meta(target.weights.model_path)[1]
    return jsonify(_card(model, meta.created_at, meta.base_model))


def _card(name: str, created: float, parent: str | None = None) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": int(created), "owned_by": "tinkerd"}
    return card | ({"parent": parent} if parent else {})


@bp.post("/completions")
def completions():
    body = json_body()
    target = resolve_target(body.get("model"))
    params, n = sampling_params(body, "max_tokens", default_max=16)  # OpenAI's default
    logprobs = option(body, "logprobs", None, lambda: get_int(body, "logprobs"))
    if logprobs:
        raise OpenAIError(
            "logprobs > 0 (each token's top alternatives) is not supported by this server; "
            "logprobs=0 returns the sampled tokens' logprobs",
            param="logprobs",
        )
    prompts = completion_prompts(target.codec, body.get("prompt"))
    if len(prompts) * n > MAX_NUM_SAMPLES:
        raise OpenAIError(f"at most {MAX_NUM_SAMPLES} completions (prompts x n) per request")
    for prompt in prompts:
        check_length(target, prompt, params.max_tokens, "prompt")
    options = stream_options(body)
    return Reply(
        "text_completion", target, prompts, params, n, logprobs is not None, **options
    ).respond()


@bp.post("/chat/completions")
def chat_completions():
    body = json_body()
    target = resolve_target(body.get("model"))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params, n = sampling_params(body, key, default_max=None)  # up to the context, as OpenAI
    params = replace(params, stop_tokens=target.codec.end_of_turn() or None)
    logprobs = option(body, "logprobs", False, lambda: get_bool(body, "logprobs", False))
    if option(body, "top_logprobs", 0, lambda: get_int(body, "top_logprobs")):
        raise OpenAIError(
            "top_logprobs is not supported by this server; logprobs=true returns the sampled "
            "tokens' logprobs",
            param="top_logprobs",
        )
    try:
        messages = validate_messages(text_messages(body.get("messages")))
    except UserError as e:
        raise OpenAIError(e.message, param="messages") from None
    prompt = target.codec.prompt(messages)
    check_length(target, prompt, params.max_tokens, "messages")
    options = stream_options(body)
    return Reply("chat.completion", target, [prompt], params, n, logprobs, **options).respond()
