"""Sampling sessions and asample.

A sampling session names the weights it samples from (a base model, a sampler checkpoint, or an
in-memory snapshot). asample requests need no order: they go to the workers' unordered queue,
where every waiting request is batched into one generation pass per set of weights.
"""

from __future__ import annotations

from flask import Blueprint, jsonify

from tinkerd.api import limits, registry, service
from tinkerd.api.queueing import submit_unordered
from tinkerd.api.validation import fingerprint, get_int, get_str, json_body
from tinkerd.api.weights import checkpoint_meta
from tinkerd.base_models import resolve_base_model
from tinkerd.registry import SamplerRecord
from tinkerd.types import SamplerWeights, UserError
from tinkerd.wire.decode import parse_sample

bp = Blueprint("sampling", __name__, url_prefix="/api/v1")

# SampleRequest options tinkerd does not compute; refused rather than silently ignored.
UNSUPPORTED = (
    "topk_sample_logprobs",
    "target_prompt_logprobs",
    "prompt_alt_tokens_k",
    "prompt_logprobs_last_n",
)


@bp.post("/create_sampling_session")
def create_sampling_session():
    body = json_body()
    session = registry().session(get_str(body, "session_id"))
    sampler_id = f"{session.session_id}:sample:{get_int(body, 'sampling_session_seq_id')}"
    weights = _weights(body.get("base_model"), body.get("model_path"), "sample")
    registry().add_sampler(SamplerRecord(sampler_id, session.session_id, weights))
    return jsonify({"sampling_session_id": sampler_id})


def _weights(base_model: object, model_path: object, purpose: str | None = None) -> SamplerWeights:
    data_dir = service().settings.data_dir
    if model_path is not None:
        path, meta = checkpoint_meta(model_path, purpose)
        if base_model is not None and resolve_base_model(base_model, data_dir) != (
            resolve_base_model(meta.base_model, data_dir)
        ):
            raise UserError(f"{path} was trained on {meta.base_model!r}, not {base_model!r}")
        return SamplerWeights(meta.base_model, model_path=str(path))
    if base_model is None:
        raise UserError("give a base_model or a model_path to sample from")
    return SamplerWeights(resolve_base_model(base_model, data_dir).name)


@bp.get("/samplers/<sampler_id>")
def get_sampler(sampler_id: str):
    return jsonify(registry().sampler(sampler_id).info())


@bp.post("/asample")
def asample():
    body = json_body()
    for option in UNSUPPORTED:
        if body.get(option) not in (None, 0, False):
            raise UserError(f"{option} is not supported by this server")
    if body.get("sampling_session_id") is not None:
        key = get_str(body, "sampling_session_id")
        weights = registry().sampler(key).weights
        if weights.model_path is not None:  # deleted or expired since the session began: 404
            checkpoint_meta(weights.model_path)
    else:  # a one-off request naming its weights directly
        weights = _weights(body.get("base_model"), body.get("model_path"))
        key = weights.key
    sample = parse_sample(body, weights, limits())
    seq_id = get_int(body, "seq_id", 0)
    request_id = submit_unordered(key, seq_id, sample, fingerprint(body))
    sequence_ids = [f"{request_id}:{i}" for i in range(sample.num_samples)]
    return jsonify({"request_id": request_id, "sample_sequence_ids": sequence_ids})
