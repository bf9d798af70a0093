"""Payloads as JSON for Celery, and settled results as JSON for Redis: the payload (or result)
dataclasses of `types`, numpy arrays (base64, with dtype and shape) and tuples, and nothing else.

JSON rather than pickle: a message or a result from Redis is data, never code, and only the
listed types are built from it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from tinkerd import types
from tinkerd.results import Kind, Result

# Marker keys; a user's dict (user_metadata) that has one is wrapped as {"__dict__": {...}}.
RESERVED = {"__type__", "__ndarray__", "__tuple__", "__dict__"}

TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        types.LoraConfig,
        types.AdamParams,
        types.Datum,
        types.CreateModel,
        types.ForwardBackward,
        types.OptimStep,
        types.SaveWeights,
        types.LoadWeights,
        types.RemoveModel,
        types.Rejected,
        types.SamplingParams,
        types.SamplerWeights,
        types.Sample,
    )
}
# What a settled result's value may hold (`results.Result`), besides JSON values.
RESULT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (types.ForwardBackwardResult, types.SampleResult, types.SampledSequence)
}


def dump_result(result: Result) -> bytes:
    """A settled result as stored in Redis."""
    encoded = {"kind": result.kind.value, "value": encode(result.value, RESULT_TYPES)}
    return json.dumps(encoded).encode()


def load_result(data: bytes | str) -> Result:
    """`dump_result`'s inverse."""
    raw = json.loads(data)
    return Result(Kind(raw["kind"]), decode(raw["value"], RESULT_TYPES))


def encode(value: Any, known: Mapping[str, type] = TYPES) -> Any:
    """`value` as JSON values; a dataclass must be one of `known` (by default the payloads)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if known.get(name) is not type(value):
            raise TypeError(f"{name} is not a type this codec builds")
        fields = {f.name: encode(getattr(value, f.name), known) for f in dataclasses.fields(value)}
        return {"__type__": name, **fields}
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {
            "__ndarray__": base64.b64encode(array.tobytes()).decode(),
            "dtype": array.dtype.str,
            "shape": list(array.shape),
        }
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, known) for v in value]}
    if isinstance(value, list):
        return [encode(v, known) for v in value]
    if isinstance(value, dict):
        fields = {str(k): encode(v, known) for k, v in value.items()}
        return {"__dict__": fields} if RESERVED & fields.keys() else fields
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot encode {type(value).__name__}")


def decode(value: Any, known: Mapping[str, type] = TYPES) -> Any:
    """`encode`'s inverse; builds only the dataclasses in `known`."""
    if isinstance(value, list):
        return [decode(v, known) for v in value]
    if not isinstance(value, dict):
        return value
    if "__dict__" in value:  # a user's dict that has one of our marker keys
        return {k: decode(v, known) for k, v in value["__dict__"].items()}
    if "__type__" in value:
        cls = known[value["__type__"]]
        return cls(**{k: decode(v, known) for k, v in value.items() if k != "__type__"})
    if "__ndarray__" in value:
        raw = base64.b64decode(value["__ndarray__"])
        return np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    if "__tuple__" in value:
        return tuple(decode(v, known) for v in value["__tuple__"])
    return {k: decode(v, known) for k, v in value.items()}
