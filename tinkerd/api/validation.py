"""Checks of request bodies: fields, paging and the configs a body carries.

Plain functions that raise UserError (a 400 naming the field), so each view reads as the list
of what it accepts; `api/openapi.py` describes the same rules for clients.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from flask import request

from tinkerd.storage import MAX_TTL_SECONDS
from tinkerd.types import AdamParams, LoraConfig, UserError

MAX_LORA_RANK = 1024


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


def get_optional_str(body: dict[str, Any], key: str) -> str | None:
    """An optional string field: absent or null is None."""
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{key} must be a string")
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


def get_ttl_seconds(body: dict[str, Any]) -> float | None:
    """A checkpoint's `ttl_seconds`: None (absent) never expires, else (0, 10 years]. A
    longer one would store an expiry past what a time can hold, and break listings."""
    if body.get("ttl_seconds") is None:
        return None
    return get_float(body, "ttl_seconds", minimum=1e-9, maximum=MAX_TTL_SECONDS)
