"""The seed's simple JSON API at the root path: training on chat or token ids without seq_ids,
named LoRA adapters, and text sampling.

Nothing here trains or samples by itself. A view checks its request, renders conversations with
the base model's TextCodec and queues the payloads the SDK's routes queue (CreateModel,
ForwardBackward, OptimStep, SaveWeights, Sample, RemoveModel), the server choosing each seq_id
(`submit_next`). An adapter's name (`my-model`) stands for a model id of its own,
`simple:my-model:<8 hex>`, new each time the name is given to a new adapter, so a removed
adapter's queue, placement and run directory never meet the next one's.
"""

from __future__ import annotations

import contextlib
import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from flask import Blueprint, jsonify

from tinkerd.api import audit, limits, registry, service, tinker
from tinkerd.api.queueing import check_model_room, submit_next, submit_unordered, wait
from tinkerd.api.validation import adam_params, get_bool, get_int, get_str, json_body, lora_config
from tinkerd.base_models import resolve_base_model
from tinkerd.loss_functions import Loss, get_loss
from tinkerd.registry import ModelName, ModelRecord
from tinkerd.results import Kind, Result
from tinkerd.storage import iso_time
from tinkerd.text import TextCodec, stop_cut, text_codec, validate_messages
from tinkerd.types import (
    CreateModel,
    Datum,
    LoraConfig,
    NotFound,
    OptimStep,
    RemoveModel,
    Sample,
    SamplerWeights,
    SaveWeights,
    ServerError,
    UserError,
)
from tinkerd.wire.decode import make_forward_backward, parse_sampling_params
from tinkerd.wire.limits import MAX_NUM_SAMPLES, check_datum_count, check_sequence_tokens
from tinkerd.wire.tensors import is_token_ids, tensor_from_json

bp = Blueprint("simple", __name__)

SESSION = "simple"  # the session_id of every simple-API model (no SDK session behind it)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LORA_KEYS = ("rank", "seed", "train_attn", "train_mlp", "train_unembed")
DEFAULT_MAX_TOKENS = 64
SAMPLE_TIMEOUT = 120.0  # seconds a /sample waits for the model's queued work and the sampling


# -- adapters --------------------------------------------------------------------------------


@dataclass
class Adapter:
    entry: ModelName  # name -> model id
    record: ModelRecord  # base model, LoRA config, times

    @property
    def model_id(self) -> str:
        return self.record.model_id


def _name(value: Any) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise UserError(
            "model_id must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit, got {value!r}"
        )
    return value


def _find(name: str) -> Adapter | None:
    seen = registry()
    try:
        entry = seen.named(name)
    except NotFound:
        return None
    try:
        return Adapter(entry, seen.model(entry.model_id))
    except NotFound:  # its creation failed and the worker forgot the model: the name is free
        with contextlib.suppress(NotFound):
            seen.remove_name(name)
        return None


def _adapter(name: str) -> Adapter:
    adapter = _find(name)
    if adapter is None:
        raise NotFound(f"unknown model_id {name!r}: no such adapter (POST /add_lora creates one)")
    return adapter


def _create(name: str, base_model: str, lora: LoraConfig) -> Adapter:
    """Register a new model, queue its creation, then give it `name`. If another request gave
    the name to a model of its own meanwhile, that one is the adapter and ours is removed."""
    check_model_room()
    svc = service()
    source = resolve_base_model(base_model, svc.settings.data_dir)
    model_id = f"{SESSION}:{name}:{uuid.uuid4().hex[:8]}"
    record = ModelRecord(model_id, SESSION, source.name, source.tokenizer_id, lora, {"name": name})
    registry().add_model(record)
    svc.scheduler.open_model(model_id)
    request_id = submit_next(model_id, CreateModel(source.name, lora))
    entry = registry().add_name(ModelName(name, model_id, request_id))
    if entry.model_id != model_id:
        _remove(model_id)
        return _adapter(name)
    audit("training_run_create", model_id=model_id, base_model=source.name, adapter=name)
    return Adapter(entry, record)


def _remove(model_id: str) -> str | None:
    """Forget the model here and queue its RemoveModel after its queued work; the request id
    (None if the queue no longer knows the model)."""
    with contextlib.suppress(NotFound):  # a model whose creation failed is forgotten already
        registry().remove_model(model_id)
    try:
        return submit_next(model_id, RemoveModel())
    except NotFound:
        return None


def _creation(adapter: Adapter) -> dict[str, Any] | None:
    """What the worker answered to the adapter's creation ({trainable_params} or {error}), kept
    once read; None while it is pending. Read at each request of the adapter, so its result
    hardly ever expires unread ({} then: created, size unknown)."""
    created = registry().created(adapter.model_id)
    if created is None:
        try:
            result = wait(adapter.entry.create_request_id, 0)
        except NotFound:
            return {}
        if result is None:
            return None
        created = (
            {"error": error.message}
            if (error := result.error) is not None
            else {"trainable_params": result.info().get("trainable_params")}
        )
        registry().set_created(adapter.model_id, created)
    return created


def _describe(adapter: Adapter) -> dict[str, Any]:
    record, created = adapter.record, _creation(adapter)
    placement = service().scheduler.model_status(adapter.model_id)
    if placement["status"] == "lost":
        status, error = "lost", placement.get("lost_reason")
    elif created is None:
        status, error = "creating", None
    else:
        status, error = ("failed", created["error"]) if "error" in created else ("ready", None)
    created = created or {}
    return {
        "model_id": adapter.entry.name,
        "base_model": record.base_model,
        "lora_rank": record.lora.rank,
        "lora_alpha": record.lora.alpha,
        "train_attn": record.lora.train_attn,
        "train_mlp": record.lora.train_mlp,
        "train_unembed": record.lora.train_unembed,
        "trainable_params": created.get("trainable_params"),
        "status": status,
        "error": error,
        "created_at": iso_time(record.created_at),
        "last_request_time": iso_time(record.last_request_time),
        "training_run_id": adapter.model_id,  # under /api/v1/training_runs, and for the SDK
    }


@bp.get("/adapters")
def list_adapters():
    adapters = [a for e in registry().names() if (a := _find(e.name)) is not None]
    adapters.sort(key=lambda a: a.record.created_at)
    return jsonify({"adapters": [_describe(a) for a in adapters]})


@bp.post("/add_lora")
def add_lora():
    """Create an adapter and wait for its worker to hold it. Adding a name that exists with
    the same base model and config answers it again; with another, 409."""
    body = json_body()
    svc = service()
    name = _name(body.get("model_id"))
    base = body.get("base_model") or svc.settings.base_model
    source = resolve_base_model(base, svc.settings.data_dir)
    lora = lora_config({k: body[k] for k in LORA_KEYS if body.get(k) is not None})
    existing = _find(name)
    if existing is not None:
        same_base = resolve_base_model(existing.record.base_model, svc.settings.data_dir)
        if same_base.location != source.location or existing.record.lora != lora:
            raise UserError(
                f"adapter {name!r} exists with another base model or LoRA config; remove it first",
                status=409,
            )
        return jsonify({**_describe(existing), "created": False})
    adapter = _create(name, source.name, lora)
    result = wait(adapter.entry.create_request_id, svc.settings.long_poll_seconds)
    if result is not None and (error := result.error) is not None:
        with contextlib.suppress(NotFound):  # the worker forgets a model that failed
            registry().remove_name(name)
        _remove(adapter.model_id)
        raise error
    return jsonify({**_describe(adapter), "created": True})


def _delete(name: str):
    """Forget the adapter at once (its later requests answer 404), and free it on its worker
    after its queued work; `freed` tells whether that happened within a long-poll."""
    svc = service()
    adapter = _adapter(name)
    registry().remove_name(name)
    request_id = _remove(adapter.model_id)
    audit("training_run_unload", model_id=adapter.model_id, adapter=name)
    freed = request_id is None
    if request_id is not None:
        freed = wait(request_id, svc.settings.long_poll_seconds) is not None
    return jsonify({"model_id": name, "removed": True, "freed": freed})


@bp.post("/remove_lora")
def remove_lora():
    return _delete(_name(json_body().get("model_id")))


@bp.delete("/adapters/<name>")
def delete_adapter(name: str):
    return _delete(_name(name))


# -- training --------------------------------------------------------------------------------


@bp.post("/fwdbwd")
def fwdbwd():
    """Queue a forward/backward pass. `data`: conversations (only assistant tokens are trained)
    or token id lists; each becomes next-token prediction. A new model_id gets an adapter on
    the server's base model."""
    body = json_body()
    svc = service()
    name = _name(body.get("model_id"))
    loss_fn = body.get("loss_fn", "cross_entropy")
    if not isinstance(loss_fn, str):  # an unhashable one would fail the registry's lookup
        raise UserError(f"loss_fn must be a string, got {loss_fn!r}")
    loss = get_loss(loss_fn)
    config = body.get("loss_fn_config") or {}
    if not isinstance(config, dict):
        raise UserError("loss_fn_config must be an object")
    adapter = _find(name)
    base = adapter.record.base_model if adapter else svc.settings.base_model
    codec = text_codec(base, svc.settings.data_dir)
    datums = _datums(body.get("data"), body.get("loss_fn_inputs"), loss, codec)
    request = make_forward_backward(
        datums, loss.name, config, get_bool(body, "forward_only", False), limits()
    )
    if adapter is None:
        adapter = _create(name, base, lora_config({}))
    else:
        _creation(adapter)
    request_id = submit_next(adapter.model_id, request)
    registry().touch_model(adapter.model_id)
    return jsonify({"request_id": request_id, "model_id": name})


def _datums(data: Any, inputs: Any, loss: Loss, codec: TextCodec) -> list[Datum]:
    """Next-token datums: input tokens[:-1], target_tokens tokens[1:], weights shifted alike.
    `inputs` gives a loss input per datum: a list (one value per input position) or a number
    (for the trained positions: the assistant tokens of a conversation, else all)."""
    if not isinstance(data, list) or not data:
        raise UserError(
            "data must be a non-empty list of conversations ([{role, content}, ...]) "
            "or of token id lists"
        )
    check_datum_count(len(data), limits())
    inputs = {} if inputs is None else inputs
    if not isinstance(inputs, dict):
        raise UserError("loss_fn_inputs must be an object: input name -> one entry per datum")
    for key, values in inputs.items():
        if key not in loss.inputs:
            raise UserError(
                f"loss_fn_inputs: {loss.name} takes {', '.join(loss.inputs)}, not {key!r}"
            )
        if not isinstance(values, list) or len(values) != len(data):
            raise UserError(f"loss_fn_inputs.{key} must be a list of {len(data)} (one per datum)")
    datums = []
    for i, item in enumerate(data):
        tokens, weights = _sequence(item, codec, f"data[{i}]")
        trained = np.asarray(weights[1:], np.float32)
        datum_inputs: dict[str, np.ndarray] = {"target_tokens": np.asarray(tokens[1:], np.int64)}
        if "weights" in loss.inputs:
            datum_inputs["weights"] = trained
        for key, values in inputs.items():
            datum_inputs[key] = _loss_input(values[i], key, trained, f"loss_fn_inputs.{key}[{i}]")
        if loss.name == "cross_entropy" and not datum_inputs["weights"].any():
            raise UserError(f"data[{i}] has no assistant message (no token to learn)")
        datums.append(Datum(np.asarray(tokens[:-1], np.int64), datum_inputs))
    return datums


def _sequence(item: Any, codec: TextCodec, where: str) -> tuple[list[int], list[float]]:
    """The tokens of one datum and their weights (assistant tokens of a conversation, else 1)."""
    if isinstance(item, list) and item and all(isinstance(x, dict) for x in item):
        tokens, weights = codec.training_tokens(validate_messages(item, where))
    elif is_token_ids(item):
        check_sequence_tokens(len(item), limits(), where)
        tokens, weights = item, [1.0] * len(item)
    else:
        raise UserError(
            f"{where} must be a conversation (a list of {{role, content}} objects) "
            "or a list of non-negative token ids"
        )
    if len(tokens) < 2:
        raise UserError(f"{where} has {len(tokens)} token(s); next-token training needs 2")
    check_sequence_tokens(len(tokens), limits(), where)
    codec.check_length(len(tokens), where)
    return tokens, weights


def _loss_input(value: Any, key: str, trained: np.ndarray, where: str) -> np.ndarray:
    if isinstance(value, int | float) and not isinstance(value, bool) and key != "target_tokens":
        if not math.isfinite(value):
            raise UserError(f"{where} must be finite, got {value!r}")
        return np.where(trained != 0, np.float32(value), np.float32(0))
    return tensor_from_json(value, key, where)


@bp.post("/optim_step")
def optim_step():
    """Queue an AdamW step: `adam_params` (Tinker's AdamParams), or just `learning_rate`."""
    body = json_body()
    adapter = _adapter(_name(body.get("model_id")))
    raw = body.get("adam_params") or {}
    if body.get("learning_rate") is not None and isinstance(raw, dict):
        raw = {**raw, "learning_rate": body["learning_rate"]}
    step = OptimStep(adam_params(raw))
    request_id = submit_next(adapter.model_id, step)
    registry().touch_model(adapter.model_id)
    return jsonify({"request_id": request_id, "model_id": adapter.entry.name})


@bp.post("/retrieve_future")
def retrieve_future():
    """A request's result as JSON, long-polling like /api/v1/retrieve_future. fwdbwd:
    {loss, metrics}; optim_step: {metrics}; still running: {"type": "try_again", ...}; failed:
    {error, category} with a 4xx (user) or 500 (server) status."""
    svc = service()
    request_id = get_str(json_body(), "request_id")
    result = wait(request_id, svc.settings.long_poll_seconds)
    if result is None:
        return jsonify({"type": "try_again", "request_id": request_id, "queue_state": "active"})
    if (error := result.error) is not None:  # answered as the error body it settled with
        return jsonify(result.value), 400 if error.category == "user" else 500
    if result.kind in (Kind.FORWARD_BACKWARD, Kind.SAMPLE):
        return jsonify(_fwdbwd_result(request_id, result))
    if result.kind is Kind.OPTIM_STEP:  # names without the reduction
        return jsonify({"metrics": {k.split(":")[0]: v for k, v in result.info().items()}})
    return jsonify(result.info())


# Server metric -> the simple API's name.
_RL_METRICS = {
    "advantage:mean": "mean_advantage",
    "ratio:mean": "mean_ratio",
    "clip_fraction:mean": "clip_fraction",
}


def _fwdbwd_result(request_id: str, result: Result) -> dict[str, Any]:
    """{loss, metrics} from the loss's metrics: cross_entropy's mean_nll (loss per weighted
    token) and perplexity; the RL losses' mean advantage, ratio and clip fraction."""
    metrics: dict[str, float] = {}
    if result.kind is Kind.FORWARD_BACKWARD:
        metrics = {k: float(v) for k, v in result.forward_backward().metrics.items()}
    if "loss:sum" not in metrics:  # a sample (an SDK asample's): not ours to answer
        raise UserError(f"{request_id} is not a fwdbwd request; ask /api/v1/retrieve_future")
    loss = metrics["loss:sum"]
    named: dict[str, Any] = {"num_tokens": int(metrics.get("num_tokens:sum", 0))}
    if "num_weighted_tokens:sum" in metrics:
        weighted = int(metrics["num_weighted_tokens:sum"])
        mean_nll = loss / weighted if weighted else 0.0
        perplexity = math.exp(mean_nll) if mean_nll < 700 else None  # JSON has no inf
        named.update(mean_nll=mean_nll, perplexity=perplexity, num_weighted_tokens=weighted)
    named.update({ours: metrics[key] for key, ours in _RL_METRICS.items() if key in metrics})
    return {"loss": loss, "metrics": named}


# -- sampling --------------------------------------------------------------------------------


@bp.post("/sample")
@bp.post("/generate")
def sample():
    """Sample text from an adapter's current weights (after its queued training) or from a
    base model, and wait for it: {text, samples: [{text, tokens, logprobs, stop_reason}]}."""
    body = json_body()
    svc = service()
    adapter = None
    if body.get("model_id") is not None:
        adapter = _adapter(_name(body["model_id"]))
        base = adapter.record.base_model
    else:
        base = resolve_base_model(
            body.get("base_model") or svc.settings.base_model, svc.settings.data_dir
        ).name
    codec = text_codec(base, svc.settings.data_dir)
    prompt = _prompt(body, codec)
    check_sequence_tokens(len(prompt), limits(), "the prompt")
    keys = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    raw = {k: body[k] for k in keys if body.get(k) is not None}
    params = parse_sampling_params({"max_tokens": DEFAULT_MAX_TOKENS, **raw}, where="")
    if body.get("messages") is not None:  # a reply ends with its turn, as at EOS
        params = replace(params, stop_tokens=codec.end_of_turn() or None)
    num_samples = get_int(body, "num_samples", 1, minimum=1)
    if num_samples > MAX_NUM_SAMPLES:
        raise UserError(f"num_samples must be at most {MAX_NUM_SAMPLES}, got {num_samples}")
    assert params.max_tokens is not None
    codec.check_length(
        len(prompt) + params.max_tokens,
        f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens})",
    )

    deadline = time.monotonic() + SAMPLE_TIMEOUT
    weights = SamplerWeights(base)
    if adapter is not None:  # a snapshot of its weights, taken in its order
        snapshot = f"{adapter.model_id}:sample:latest"
        save = SaveWeights(path=None, kind="sampler_weights", snapshot_id=snapshot)
        _settled(submit_next(adapter.model_id, save), deadline)
        registry().touch_model(adapter.model_id)
        weights = SamplerWeights(base, snapshot_id=snapshot)
    request = Sample(weights, np.asarray(prompt, np.int64), num_samples, params)
    request_id = submit_unordered(
        f"{SESSION}:{weights.key}", secrets.randbits(52), request, uuid.uuid4().hex
    )
    sequences = _settled(request_id, deadline).sample().sequences
    samples = []
    for seq in sequences:
        text = codec.decode([int(t) for t in seq.tokens])
        samples.append(
            {
                "text": text[: stop_cut(text, params.stop_strings)],  # without the stop string
                "tokens": [int(t) for t in seq.tokens],
                "logprobs": [float(x) for x in seq.logprobs],
                "stop_reason": seq.stop_reason,
            }
        )
    return jsonify(
        {
            "model_id": adapter.entry.name if adapter else None,
            "base_model": base,
            "text": samples[0]["text"],
            "samples": samples,
            "prompt_tokens": prompt,
        }
    )


def _prompt(body: dict[str, Any], codec: TextCodec) -> list[int]:
    """`prompt` (text or token ids) or `messages` (a conversation, ready for the reply)."""
    if body.get("prompt") is not None and body.get("messages") is not None:
        raise UserError("give a prompt or messages, not both")
    if body.get("messages") is not None:
        return codec.prompt(validate_messages(body["messages"]))
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return codec.encode(prompt)
    if is_token_ids(prompt):
        return prompt
    raise UserError("give a prompt (non-empty text or token ids) or messages (a conversation)")


def _settled(request_id: str, deadline: float) -> Result:
    """The request's result by `deadline`; raises the error it failed with."""
    result = wait(request_id, max(0.0, deadline - time.monotonic()))
    if result is None:
        raise ServerError(f"the request did not finish within {SAMPLE_TIMEOUT:.0f} s", 504)
    if (error := result.error) is not None:
        raise error
    return result


# -- info ------------------------------------------------------------------------------------


@bp.get("/get_server_capabilities")
def server_capabilities():
    return tinker.server_capabilities()
