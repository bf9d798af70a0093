"""What a settled future holds: a request's typed result, in tinkerd's own terms.

The worker knows what it ran and what came of it, not who asked, so it settles each future with a
`Result`: the kind of request and its plain-data value (a `ForwardBackwardResult`, a
`SampleResult`, or a dict of JSON values), or the error it failed with. Each API surface encodes a
result for its own clients when the future is fetched: the Tinker routes as the SDK's protobuf or
JSON (`api.tinker`), the simple API and the OpenAI routes as their JSON. Scaled out, a result
crosses Redis as `cluster.codec.dump_result`'s JSON (arrays as base64), never pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tinkerd.types import (
    ForwardBackwardResult,
    SampleResult,
    ServerError,
    TinkerdError,
    error_body,
)


class Kind(StrEnum):
    """What a request was, and so what its result's value is."""

    CREATE_MODEL = "create_model"  # dict: the backend's answer ({model_id, trainable_params})
    FORWARD_BACKWARD = "forward_backward"  # ForwardBackwardResult (also of a forward pass)
    OPTIM_STEP = "optim_step"  # dict[str, float]: the step's metrics
    SAVE_WEIGHTS = "save_weights"  # dict: {path} or, for a snapshot, {sampling_session_id}
    LOAD_WEIGHTS = "load_weights"  # dict: {path, model_id}
    REMOVE_MODEL = "remove_model"  # dict: {model_id, removed}
    SAMPLE = "sample"  # SampleResult
    ERROR = "error"  # dict: the error body ({error, category}) the request failed with


Value = ForwardBackwardResult | SampleResult | dict[str, Any]


@dataclass(frozen=True)
class Result:
    """A settled request: its kind and value. A failure keeps only what its client is told,
    the error body, so it reads the same from a future in process as from one in Redis."""

    kind: Kind
    value: Value

    @staticmethod
    def of(kind: Kind, value: Value) -> Result:
        """A result; a dict value is copied as JSON, so it holds plain JSON data only and
        nothing the backend still owns (a bad value fails its request here, in the worker)."""
        if isinstance(value, dict):
            value = json.loads(json.dumps(value))
        return Result(kind, value)

    @staticmethod
    def failed(error: TinkerdError | dict[str, Any]) -> Result:
        """The result of a request that failed with `error` (or its error body)."""
        return Result(Kind.ERROR, error_body(error) if isinstance(error, TinkerdError) else error)

    @property
    def error(self) -> TinkerdError | None:
        """The error the request failed with, as its client sees it (a UserError or a
        ServerError); None if it succeeded."""
        if self.kind is not Kind.ERROR:
            return None
        assert isinstance(self.value, dict)
        return TinkerdError.from_json(self.value)

    def forward_backward(self) -> ForwardBackwardResult:
        """The value of a forward/backward; raises the error it failed with."""
        return self._value(Kind.FORWARD_BACKWARD, ForwardBackwardResult)

    def sample(self) -> SampleResult:
        """The value of a sample; raises the error it failed with."""
        return self._value(Kind.SAMPLE, SampleResult)

    def info(self) -> dict[str, Any]:
        """The JSON value of any other request; raises the error it failed with."""
        return self._value(self.kind, dict)

    def _value(self, kind: Kind, cls: type) -> Any:
        if (error := self.error) is not None:
            raise error
        if self.kind is not kind or not isinstance(self.value, cls):
            raise ServerError(f"a {self.kind} result where a {kind} one was expected")
        return self.value
