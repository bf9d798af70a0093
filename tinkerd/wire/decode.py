"""Requests in the SDK's protobuf or JSON -> checked plain data (ForwardBackward, Sample,
SamplingParams): what comes out is safe to queue.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from tinkerd.config import InputLimits
from tinkerd.loss_functions import get_loss, resolve_config
from tinkerd.types import Datum, ForwardBackward, Sample, SamplerWeights, SamplingParams, UserError
from tinkerd.wire import pb
from tinkerd.wire.limits import (
    DEFAULT_LIMITS,
    MAX_NUM_SAMPLES,
    MAX_TOPK,
    check_datum_count,
    check_sequence_tokens,
)
from tinkerd.wire.tensors import int_list, tensor_from_json, tensor_from_proto

# ModelInput chunk kinds the SDK can send and tinkerd cannot use yet, by their SDK type names.
_UNSUPPORTED_CHUNKS = {
    "image": "ImageChunk (an image)",
    "image_asset_pointer": "ImageAssetPointerChunk (an image by reference)",
    "dmel": "DmelChunk (audio)",
}
_READ_BYTES = 1 << 20


def unsupported_chunk(kind: object, where: str) -> UserError:
    """The 400 for a ModelInput chunk that is not token ids: names the chunk type, and that this
    server takes text (encoded_text token ids) only."""
    what = _UNSUPPORTED_CHUNKS.get(str(kind), f"a {kind!r} chunk")
    return UserError(
        f"{where}: {what} is not supported: tinkerd serves text models and takes "
        "encoded_text chunks (token ids) only; vision and audio inputs are refused until "
        "a multimodal backend supports them"
    )


def decompress_zstd(body: bytes, limit: int) -> bytes:
    """A zstd-compressed request body (the SDK's `Content-Encoding: zstd`), decompressed a
    megabyte at a time: past `limit` bytes it stops with a 413, so a small body that expands
    without bound (a zstd bomb) costs at most `limit` bytes of memory, never more."""
    import zstandard

    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as reader:
            while chunk := reader.read(_READ_BYTES):
                out += chunk
                if len(out) > limit:
                    raise UserError(
                        f"the zstd-compressed request body expands past {limit} bytes, the most "
                        "this server takes; send smaller batches",
                        413,
                    )
    except zstandard.ZstdError as e:
        raise UserError(f"the request body is not valid zstd ({e})") from None
    return bytes(out)


def parse_forward_backward_proto(body: bytes) -> tuple[pb.ForwardBackwardRequest, str]:
    """The protobuf ForwardBackwardRequest in `body`, and a fingerprint of its content."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise UserError(f"malformed protobuf ForwardBackwardRequest: {e}") from None
    if not msg.model_id:
        raise UserError("ForwardBackwardRequest has no model_id")
    return msg, hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()


def forward_backward_from_proto(
    msg: pb.ForwardBackwardRequest, limits: InputLimits = DEFAULT_LIMITS
) -> ForwardBackward:
    """The checked request carried by a protobuf ForwardBackwardRequest."""
    check_datum_count(len(msg.data), limits)
    config: dict[str, Any] = dict(msg.loss_fn_config)
    for key, value in msg.loss_fn_config_v2.items():  # v2 wins, and may carry strings
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    datums = []
    for i, d in enumerate(msg.data):
        tokens = []
        for chunk in d.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise unsupported_chunk(kind, f"datum {i}")
            raw = chunk.encoded_text.tokens
            if len(raw) % 4:
                raise UserError(f"datum {i}: encoded_text tokens must be int32 bytes ({len(raw)})")
            tokens.append(np.frombuffer(raw, dtype="<i4"))
            check_sequence_tokens(sum(len(t) for t in tokens), limits, f"datum {i}")
        inputs = {k: tensor_from_proto(t, k, f"datum {i} {k}") for k, t in d.loss_fn_inputs.items()}
        datums.append(_datum(np.concatenate(tokens) if tokens else np.zeros(0, np.int64), inputs))
    return make_forward_backward(datums, msg.loss_fn, config, msg.forward_only, limits)


def parse_forward_backward_json(
    body: dict[str, Any], limits: InputLimits = DEFAULT_LIMITS
) -> ForwardBackward:
    """Decode the JSON form of a ForwardBackwardRequest (`forward_backward_input`)."""
    fbi = body.get("forward_backward_input")
    if not isinstance(fbi, dict) or not isinstance(fbi.get("data"), list):
        raise UserError("forward_backward_input.data must be a list of datums")
    check_datum_count(len(fbi["data"]), limits)
    datums = []
    for i, d in enumerate(fbi["data"]):
        if not isinstance(d, dict):
            raise UserError(f"datum {i} must be an object")
        tokens = model_input_tokens(d.get("model_input"), f"datum {i}", limits)
        raw_inputs = d.get("loss_fn_inputs") or {}
        if not isinstance(raw_inputs, dict):
            raise UserError(f"datum {i}: loss_fn_inputs must be an object")
        inputs = {k: tensor_from_json(v, k, f"datum {i} {k}") for k, v in raw_inputs.items()}
        datums.append(_datum(tokens, inputs))
    loss_fn, config = fbi.get("loss_fn", ""), fbi.get("loss_fn_config") or {}
    if not isinstance(loss_fn, str) or not isinstance(config, dict):
        raise UserError("loss_fn must be a string and loss_fn_config an object")
    return make_forward_backward(datums, loss_fn, config, bool(body.get("forward_only")), limits)


def model_input_tokens(
    model_input: Any, where: str, limits: InputLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """The token ids of a JSON ModelInput (`{"chunks": [{"type": "encoded_text", ...}]}`)."""
    chunks = model_input.get("chunks") if isinstance(model_input, dict) else None
    if not isinstance(chunks, list):
        raise UserError(f"{where}: model_input.chunks must be a list")
    tokens: list[int] = []
    for chunk in chunks:
        if not isinstance(chunk, dict):
            raise UserError(f"{where}: each model_input chunk must be an object")
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise unsupported_chunk(chunk.get("type"), where)
        tokens.extend(int_list(chunk.get("tokens"), f"{where} tokens"))
        check_sequence_tokens(len(tokens), limits, where)
    arr = np.asarray(tokens, np.int64)
    if arr.size and arr.min() < 0:
        raise UserError(f"{where}: negative token id {int(arr.min())}")
    return arr


def parse_sample(
    body: dict[str, Any], weights: SamplerWeights, limits: InputLimits = DEFAULT_LIMITS
) -> Sample:
    """Check an asample request (prompt, SamplingParams, logprob options) into a Sample."""
    prompt = model_input_tokens(body.get("prompt"), "prompt", limits)
    if prompt.size == 0:
        raise UserError("the prompt is empty")
    num_samples = body.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise UserError(f"num_samples must be an integer, got {num_samples!r}")
    if not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise UserError(f"num_samples must be in [1, {MAX_NUM_SAMPLES}], got {num_samples}")
    topk = body.get("topk_prompt_logprobs", 0) or 0
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk <= MAX_TOPK:
        raise UserError(f"topk_prompt_logprobs must be an integer in [0, {MAX_TOPK}]")
    return Sample(
        weights=weights,
        prompt=prompt,
        num_samples=num_samples,
        params=parse_sampling_params(body.get("sampling_params") or {}),
        prompt_logprobs=bool(body.get("prompt_logprobs")),
        topk_prompt_logprobs=topk,
    )


def parse_sampling_params(raw: Any, where: str = "sampling_params.") -> SamplingParams:
    """Check SamplingParams; `where` prefixes the names in errors (empty for top-level keys)."""
    if not isinstance(raw, dict):
        raise UserError(f"{where.rstrip('.') or 'the request'} must be an object")

    def number(key: str, default: float) -> float:
        value = raw.get(key, default)
        value = default if value is None else value
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise UserError(f"{where}{key} must be a finite number, got {value!r}")
        return float(value)

    def integer(key: str, default: int | None) -> int | None:
        value = raw.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{where}{key} must be an integer, got {value!r}")
        return value

    max_tokens = integer("max_tokens", None)
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"{where}max_tokens must be at least 1, got {max_tokens}")
    temperature, top_p = number("temperature", 1.0), number("top_p", 1.0)
    if temperature < 0:
        raise UserError(f"{where}temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"{where}top_p must be in (0, 1], got {top_p}")
    top_k = integer("top_k", -1)
    if top_k is None or top_k < -1:
        raise UserError(f"{where}top_k must be -1 (no limit) or positive, got {top_k}")
    stop = raw.get("stop")
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] | None = None
    if isinstance(stop, str):
        stop_strings = (stop,)
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop) and stop:
        stop_strings = tuple(stop)
    elif isinstance(stop, list) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in stop
    ):
        stop_tokens = tuple(stop)  # [] disables even the implicit EOS
    elif stop is not None:
        raise UserError(f"{where}stop must be a string, a list of strings or of token ids")
    if any(not s for s in stop_strings):
        raise UserError(f"{where}stop strings must not be empty")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=integer("seed", None),
        stop_strings=stop_strings,
        stop_tokens=stop_tokens,
    )


def make_forward_backward(
    datums: list[Datum],
    loss_fn: str,
    config: dict[str, Any],
    forward_only: bool,
    limits: InputLimits = DEFAULT_LIMITS,
) -> ForwardBackward:
    """Check a decoded batch against its loss and the limits, and return the request to queue."""
    loss = get_loss(loss_fn)
    if not datums:
        raise UserError("empty batch: forward_backward needs at least one datum")
    check_datum_count(len(datums), limits)
    total = 0
    for i, datum in enumerate(datums):
        check_sequence_tokens(len(datum.tokens), limits, f"datum {i}")
        total += len(datum.tokens)
    if total > limits.max_request_tokens:
        raise UserError(
            f"{total} tokens in one request; the server takes at most "
            f"{limits.max_request_tokens} (split the batch)",
            status=413,
        )
    for key, value in config.items():
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value):
            raise UserError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
    config = resolve_config(loss, {k: float(v) for k, v in config.items()})
    for i, datum in enumerate(datums):
        n = len(datum.tokens)
        if n == 0:
            raise UserError(f"datum {i} has no tokens")
        missing = [k for k in loss.required_inputs if k not in datum.loss_fn_inputs]
        if missing:
            raise UserError(f"datum {i}: loss {loss.name} needs loss_fn_inputs {missing}")
        target_shape = datum.loss_fn_inputs["target_tokens"].shape
        if target_shape[0] != n:
            raise UserError(
                f"datum {i}: target_tokens has {target_shape[0]} positions, input has {n}"
            )
        for name, value in loss.input_defaults.items():  # left out: the same value per target
            if name not in datum.loss_fn_inputs:
                datum.loss_fn_inputs[name] = np.full(target_shape, value, np.float32)
        for name in loss.inputs:
            shape = datum.loss_fn_inputs[name].shape
            if shape != target_shape:
                raise UserError(
                    f"datum {i}: {name} has shape {list(shape)}, target_tokens {list(target_shape)}"
                )
    return ForwardBackward(datums, loss.name, config, forward_only)


def _datum(tokens: np.ndarray, inputs: dict[str, np.ndarray]) -> Datum:
    if tokens.size and tokens.min() < 0:
        raise UserError(f"negative token id {int(tokens.min())}")
    return Datum(tokens.astype(np.int64), inputs)
