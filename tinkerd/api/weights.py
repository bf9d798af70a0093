"""Saving and loading training state: save_weights, save_weights_for_sampler,
save_weights_external, load_weights.

Each is an ordered request of its model (it takes a seq_id). Checkpoints are PEFT directories in
the store, addressed as tinker://<model_id>/{weights|sampler_weights|external_weights}/<name>.
A key reads its own checkpoints and those another key has published (`checkpoint_meta`).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from tinkerd.api import audit, registry, service
from tinkerd.api.queueing import start_model, submit_ordered
from tinkerd.api.validation import (
    check_optimizer_config,
    fingerprint,
    get_bool,
    get_int,
    get_str,
    get_ttl_seconds,
    json_body,
)
from tinkerd.base_models import resolve_base_model
from tinkerd.registry import ModelRecord, SamplerRecord
from tinkerd.storage import CheckpointMeta, CheckpointPath, check_name
from tinkerd.types import (
    CreateModel,
    LoadWeights,
    LoraConfig,
    NotFound,
    SamplerWeights,
    SaveWeights,
    UserError,
)

bp = Blueprint("weights", __name__, url_prefix="/api/v1")


def _save(body: dict[str, Any], kind: str) -> SaveWeights:
    model_id = get_str(body, "model_id")
    metadata = body.get("user_metadata") or {}
    if not isinstance(metadata, dict):
        raise UserError("user_metadata must be an object")
    return SaveWeights(
        path=str(CheckpointPath(model_id, kind, check_name(body.get("path")))),
        kind=kind,
        ttl_seconds=get_ttl_seconds(body),
        overwrite=get_bool(body, "overwrite", False),
        user_metadata=metadata,
    )


@bp.post("/save_weights")
def save_weights():
    body = json_body()
    model_id, seq_id = get_str(body, "model_id"), get_int(body, "seq_id")
    return submit_ordered(model_id, seq_id, fingerprint(body), lambda: _save(body, "weights"))


@bp.post("/save_weights_external")
def save_weights_external():
    """The adapter alone, as a Hugging Face PEFT directory, under
    tinker://<model_id>/external_weights/<name>: downloaded through the signed URLs of
    `get_external_weights_urls`, listed and deleted like any checkpoint."""
    body = json_body()
    model_id, seq_id = get_str(body, "model_id"), get_int(body, "seq_id")

    def build() -> SaveWeights:
        if body.get("age_encryption_recipients"):
            raise UserError(
                "age_encryption_recipients: encrypting external weights is not supported by "
                "tinkerd; save without recipients (the files stay on this server's disk)"
            )
        return _save(body, "external_weights")

    return submit_ordered(model_id, seq_id, fingerprint(body), build)


@bp.post("/save_weights_for_sampler")
def save_weights_for_sampler():
    body = json_body()
    model_id, seq_id = get_str(body, "model_id"), get_int(body, "seq_id")
    if body.get("path") is not None:
        build = lambda: _save(body, "sampler_weights")  # noqa: E731
    else:  # unnamed: the server creates the sampling session, on an in-memory snapshot
        build = lambda: _snapshot(model_id, body)  # noqa: E731
    return submit_ordered(model_id, seq_id, fingerprint(body), build)


def _snapshot(model_id: str, body: dict[str, Any]) -> SaveWeights:
    """An unnamed save_weights_for_sampler: the sampling session it creates, registered here,
    and the save of the snapshot it samples."""
    model = registry().model(model_id)
    sampler_id = f"{model.session_id}:sample:{get_int(body, 'sampling_session_seq_id')}"
    weights = SamplerWeights(model.base_model, snapshot_id=sampler_id)
    registry().add_sampler(SamplerRecord(sampler_id, model.session_id, weights))
    return SaveWeights(path=None, kind="sampler_weights", snapshot_id=sampler_id)


def checkpoint_meta(
    path: object, purpose: str | None = None
) -> tuple[CheckpointPath, CheckpointMeta]:
    """A checkpoint this key may read, that exists: its parsed path and metadata. It reads its
    own, and another key's once published (the one crossing of tenant isolation: reading it,
    never listing, changing or deleting it); any other is NotFound, as an unknown one. A read
    of another key's with a `purpose` (load, sample, download, copy) goes in the audit log."""
    parsed = CheckpointPath.parse(path)
    try:
        registry().run(parsed.model_id)
    except NotFound:  # no such run, or another key's: the same answer unless published
        try:
            meta = service().store.meta(parsed)
        except NotFound:
            meta = None
        if meta is None or meta.public is not True:
            raise NotFound(f"checkpoint {parsed} not found") from None
        if purpose is not None:
            audit(
                "checkpoint_read",
                tinker_path=str(parsed),
                model_id=parsed.model_id,
                purpose=purpose,
            )
        return parsed, meta
    return parsed, service().store.meta(parsed)


@bp.post("/load_weights")
def load_weights():
    body = json_body()
    if "model_id" in body:  # load_state*: into a live model, in its order
        model_id, seq_id = get_str(body, "model_id"), get_int(body, "seq_id")
        build = lambda: _load(body, registry().model(model_id))  # noqa: E731
        return submit_ordered(model_id, seq_id, fingerprint(body), build)
    return _create_from_checkpoint(body)


def _load(body: dict[str, Any], model: ModelRecord) -> LoadWeights:
    path, meta = checkpoint_meta(body.get("path"), "load")
    _check_base(meta, model.base_model)
    with_optimizer = get_bool(body, "optimizer", False)
    if with_optimizer and not meta.has_optimizer:
        raise UserError(f"{path} has no optimizer state; load it without the optimizer")
    return LoadWeights(str(path), with_optimizer)


def _check_base(meta: CheckpointMeta, base_model: str) -> None:
    data_dir = service().settings.data_dir
    checkpoint_base = resolve_base_model(meta.base_model, data_dir).location
    if checkpoint_base != resolve_base_model(base_model, data_dir).location:
        raise UserError(
            f"checkpoint {meta.tinker_path} was trained on {meta.base_model!r}, not {base_model!r}"
        )


def _create_from_checkpoint(body: dict[str, Any]) -> Any:
    """create_training_client_from_state*: a new model whose LoRA config comes from the
    checkpoint, created as `{session}:train:{model_seq_id}`, as the SDK computes it."""
    svc = service()
    session = registry().session(get_str(body, "session_id"))
    model_seq_id = get_int(body, "model_seq_id")
    check_optimizer_config(body.get("optimizer_config"))
    path, meta = checkpoint_meta(body.get("path"), "load")
    if body.get("base_model") is not None:
        _check_base(meta, body["base_model"])
    with_optimizer = get_bool(body, "optimizer", False)
    if with_optimizer and not meta.has_optimizer:
        raise UserError(f"{path} has no optimizer state; load it without the optimizer")
    source = resolve_base_model(meta.base_model, svc.settings.data_dir)
    lora = LoraConfig(**meta.lora)
    create = CreateModel(
        source.name, lora, from_checkpoint=str(path), with_optimizer=with_optimizer
    )
    return start_model(session, model_seq_id, source, create, body)
