"""REST for training runs and their checkpoints (what RestClient and the cookbook call), and
what the `tinkerd` command line adds: saving a run without seq_ids, a checkpoint as a tar file."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from tinkerd.api import audit, registry, service
from tinkerd.api.checkpoints import checkpoint_files, file_name_of, tar_response
from tinkerd.api.queueing import submit_next
from tinkerd.api.validation import get_bool, get_str, get_ttl_seconds, json_body, page
from tinkerd.api.weights import checkpoint_meta
from tinkerd.registry import ModelRecord
from tinkerd.storage import KINDS, CheckpointPath, check_name, iso_time, sort_time, timestamp
from tinkerd.types import NotFound, SaveWeights, UserError

bp = Blueprint("runs", __name__, url_prefix="/api/v1")


def _run(record: ModelRecord) -> dict[str, Any]:
    """The SDK's TrainingRun shape, with its latest checkpoints, and where it runs: `status`
    active (with its `worker`), inactive (from before a restart), lost (`lost_reason`), or
    stopped (saved by a clean stop of the cluster until a worker starts, `stopped_reason`).
    Any stored value renders (see CheckpointMeta.to_api): one damaged record never fails a
    listing."""
    checkpoints = service().store.list(record.model_id)
    last = {kind: None for kind in ("weights", "sampler_weights")}
    for meta in checkpoints:
        last[meta.kind] = meta.to_api()
    times = [timestamp(t) for t in [record.last_request_time, *(m.created_at for m in checkpoints)]]
    metadata = record.user_metadata if isinstance(record.user_metadata, dict) else {}
    rank = record.lora.rank
    return {
        "training_run_id": record.model_id,
        "base_model": record.base_model,
        "model_owner": "local",
        "is_lora": True,
        "corrupted": False,
        "lora_rank": rank if type(rank) is int and 0 < rank < 2**31 else None,
        "last_request_time": iso_time(max((t for t in times if t is not None), default=None)),
        "last_checkpoint": last["weights"],
        "last_sampler_checkpoint": last["sampler_weights"],
        "user_metadata": {k: str(v) for k, v in metadata.items()} or None,
        **service().scheduler.model_status(record.model_id),
    }


@bp.get("/training_runs")
def list_training_runs():
    limit, offset = page()
    runs = registry().runs()
    return jsonify(
        {
            "training_runs": [_run(r) for r in runs[offset : offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
        }
    )


@bp.get("/training_runs/<run_id>")
def get_training_run(run_id: str):
    return jsonify(_run(registry().run(run_id)))


@bp.get("/training_runs/<run_id>/checkpoints")
def list_checkpoints(run_id: str):
    registry().run(run_id)
    return jsonify({"checkpoints": [m.to_api() for m in service().store.list(run_id)]})


@bp.delete("/training_runs/<run_id>/checkpoints/<kind>/<name>")
def delete_checkpoint(run_id: str, kind: str, name: str):
    path = CheckpointPath.parse(f"tinker://{run_id}/{kind}/{name}")
    registry().run(run_id)  # this key's
    service().store.delete(path)
    audit("checkpoint_delete", tinker_path=str(path), model_id=run_id)
    return jsonify({})


@bp.get("/checkpoints")
def list_all_checkpoints():
    """All runs' checkpoints, newest first, a page at a time (list_user_checkpoints)."""
    limit, offset = page(default_limit=100)
    store = service().store
    metas = [m for r in registry().runs() for m in store.list(r.model_id)]
    metas.sort(key=lambda m: sort_time(m.created_at), reverse=True)
    return jsonify(
        {
            "checkpoints": [m.to_api() for m in metas[offset : offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(metas)},
        }
    )


@bp.post("/weights_info")
def weights_info():
    _, meta = checkpoint_meta(get_str(json_body(), "tinker_path"))
    return jsonify(
        {
            "base_model": meta.base_model,
            "is_lora": True,
            "lora_rank": meta.lora.get("rank"),
            "train_unembed": meta.lora.get("train_unembed"),
            "train_mlp": meta.lora.get("train_mlp"),
            "train_attn": meta.lora.get("train_attn"),
        }
    )


@bp.post("/training_runs/<run_id>/save")
def save_training_run(run_id: str):
    """Save a live run's weights for a client that tracks no seq_ids (`tinkerd save`): queued as
    the run's next request, the server choosing its seq_id; answers the future to poll with
    retrieve_future. Body: {name, kind ("weights" | "sampler_weights"), ttl_seconds, overwrite}.

    An SDK TrainingClient that is still driving the run numbers its own requests, so saving its
    run from elsewhere takes a seq_id that client will then also send."""
    body = json_body()
    try:
        registry().touch_model(run_id)
    except NotFound:
        registry().run(run_id)  # 404 for a run this server never had
        raise UserError(
            f"training run {run_id} is not loaded in this server (it ran before a restart); "
            "resume it with create_training_client_from_state from its last checkpoint"
        ) from None
    kind = body.get("kind", "weights")
    if kind not in KINDS:
        raise UserError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    metadata = body.get("user_metadata") or {}
    if not isinstance(metadata, dict):
        raise UserError("user_metadata must be an object")
    path = CheckpointPath(run_id, kind, check_name(body.get("name")))
    save = SaveWeights(
        path=str(path),
        kind=kind,
        ttl_seconds=get_ttl_seconds(body),
        overwrite=get_bool(body, "overwrite", False),
        user_metadata=metadata,
    )
    request_id = submit_next(run_id, save)
    return jsonify({"request_id": request_id, "model_id": run_id, "path": str(path)})


@bp.get("/checkpoints/archive")
def checkpoint_archive():
    """A checkpoint's files as an uncompressed tar stream, under a directory named after the
    checkpoint (what `tinkerd export` downloads): the PEFT adapter and tinkerd.json, and the
    optimizer state only with `optimizer=true`. 404 for a missing, deleted or expired one."""
    path, _ = checkpoint_meta(request.args.get("path"))
    with_optimizer = request.args.get("optimizer", "false").lower() in ("1", "true", "yes")
    files = checkpoint_files(path, service().store.directory(path), with_optimizer)
    return tar_response(path, files, f"{path.name}/", file_name_of(path))
