"""REST for training runs and their checkpoints (what RestClient and the cookbook call)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from tinkerd.api import get_str, json_body, service
from tinkerd.api.weights import checkpoint_meta
from tinkerd.registry import ModelRecord
from tinkerd.storage import CheckpointPath, iso_time
from tinkerd.types import UserError

bp = Blueprint("runs", __name__, url_prefix="/api/v1")


def _run(record: ModelRecord) -> dict[str, Any]:
    """The SDK's TrainingRun shape, with its latest checkpoints, and where it runs: `status`
    active (with its `worker`), inactive (from before a restart), or lost (`lost_reason`)."""
    checkpoints = service().store.list(record.model_id)
    last = {kind: None for kind in ("weights", "sampler_weights")}
    for meta in checkpoints:
        last[meta.kind] = meta.to_api()
    return {
        "training_run_id": record.model_id,
        "base_model": record.base_model,
        "model_owner": "local",
        "is_lora": True,
        "corrupted": False,
        "lora_rank": record.lora.rank,
        "last_request_time": iso_time(
            max([record.last_request_time] + [m.created_at for m in checkpoints])
        ),
        "last_checkpoint": last["weights"],
        "last_sampler_checkpoint": last["sampler_weights"],
        "user_metadata": {k: str(v) for k, v in record.user_metadata.items()} or None,
        **service().scheduler.model_status(record.model_id),
    }


def _page(default_limit: int = 20) -> tuple[int, int]:
    try:
        limit = int(request.args.get("limit", default_limit))
        offset = int(request.args.get("offset", 0))
    except ValueError:
        raise UserError("limit and offset must be integers") from None
    if limit < 1 or offset < 0:
        raise UserError("limit must be positive and offset not negative")
    return limit, offset


@bp.get("/training_runs")
def list_training_runs():
    limit, offset = _page()
    runs = service().registry.runs()
    page = runs[offset : offset + limit]
    return jsonify(
        {
            "training_runs": [_run(r) for r in page],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
        }
    )


@bp.get("/training_runs/<run_id>")
def get_training_run(run_id: str):
    return jsonify(_run(service().registry.run(run_id)))


@bp.get("/training_runs/<run_id>/checkpoints")
def list_checkpoints(run_id: str):
    service().registry.run(run_id)
    return jsonify({"checkpoints": [m.to_api() for m in service().store.list(run_id)]})


@bp.delete("/training_runs/<run_id>/checkpoints/<kind>/<name>")
def delete_checkpoint(run_id: str, kind: str, name: str):
    path = CheckpointPath.parse(f"tinker://{run_id}/{kind}/{name}")
    service().store.delete(path)
    return jsonify({})


@bp.get("/checkpoints")
def list_all_checkpoints():
    """All runs' checkpoints, newest first, a page at a time (list_user_checkpoints)."""
    limit, offset = _page(default_limit=100)
    store = service().store
    metas = [m for r in service().registry.runs() for m in store.list(r.model_id)]
    metas.sort(key=lambda m: m.created_at, reverse=True)
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
