"""Unit tests of tinkerd.cluster.codec: payloads as JSON for Celery and settled results as JSON
for Redis, built back exactly, and nothing but the listed types built from a message."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest

from tinkerd.cluster import codec
from tinkerd.registry import Session
from tinkerd.results import Kind, Result
from tinkerd.types import (
    AdamParams,
    CreateModel,
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    LoadWeights,
    LoraConfig,
    NotFound,
    OptimStep,
    Rejected,
    RemoveModel,
    Sample,
    SampledSequence,
    SampleResult,
    SamplerWeights,
    SamplingParams,
    SaveWeights,
    ServerError,
    UserError,
)

pytestmark = pytest.mark.timeout(30)


def assert_same(got: Any, want: Any, where: str = "value") -> None:
    """Deep equality that also checks types, and arrays' dtype, shape and values."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
        assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f"), f"{where}: values"
        assert got.flags.writeable, f"{where}: a decoded array must be writeable"
    elif dataclasses.is_dataclass(want):
        for f in dataclasses.fields(want):
            assert_same(getattr(got, f.name), getattr(want, f.name), f"{where}.{f.name}")
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def over_json(value: Any) -> Any:
    """What a worker gets: encoded, through JSON text (as Celery sends it), decoded."""
    return codec.decode(json.loads(json.dumps(codec.encode(value))))


def datum(t: int, k: int | None = None) -> Datum:
    rng = np.random.default_rng(t)
    tokens = rng.integers(0, 2**40, size=t, dtype=np.int64)  # beyond int32 on purpose
    inputs: dict[str, np.ndarray] = {
        "target_tokens": np.roll(tokens, -1),
        "weights": rng.random(t, dtype=np.float32),
    }
    if k is not None:
        inputs["target_tokens"] = rng.integers(0, 1000, size=(t, k), dtype=np.int64)
        inputs["logprobs"] = rng.standard_normal((t, k), dtype=np.float32)
    return Datum(tokens=tokens, loss_fn_inputs=inputs)


SAMPLER = SamplerWeights("Qwen/Qwen3-8B", snapshot_id="sess:sample:3")
PAYLOADS: dict[str, Any] = {
    "LoraConfig": LoraConfig(rank=8, seed=None, train_mlp=False, alpha=16.0),
    "AdamParams": AdamParams(learning_rate=3e-4, beta2=0.999, grad_clip_norm=1.0),
    "Datum": datum(7, 3),
    "CreateModel": CreateModel(
        "Qwen/Qwen3-8B", LoraConfig(rank=4, seed=7), "tinker://m/weights/1", True
    ),
    "ForwardBackward": ForwardBackward(
        datums=[datum(5), datum(9, 4), datum(1)],
        loss_fn="importance_sampling",
        loss_fn_config={"clip_low": 0.8, "clip_high": 1.2},
        forward_only=True,
    ),
    "OptimStep": OptimStep(AdamParams(learning_rate=1e-5, eps=1e-8, weight_decay=0.01)),
    "SaveWeights": SaveWeights(
        path="tinker://s:train:0/weights/step-1",
        kind="weights",
        ttl_seconds=3600.0,
        overwrite=True,
        user_metadata={"step": "1", "nested": {"a": [1, 2.5, None, True]}},
    ),
    "LoadWeights": LoadWeights("tinker://s:train:0/weights/step-1", with_optimizer=True),
    "RemoveModel": RemoveModel(),
    "Rejected": Rejected({"error": "datum 0 has no tokens", "category": "user"}),
    "SamplingParams": SamplingParams(
        max_tokens=16,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        seed=3,
        stop_strings=("\n\n", "</s>"),
        stop_tokens=(2, 151645),
    ),  # fmt: skip
    "SamplerWeights": SAMPLER,
    "Sample": Sample(
        weights=SAMPLER,
        prompt=np.array([1, 2, 3, 4], dtype=np.int64),
        num_samples=4,
        params=SamplingParams(max_tokens=8, stop_strings=("stop",), stop_tokens=None),
        prompt_logprobs=True,
        topk_prompt_logprobs=5,
    ),
}


def test_examples_cover_every_payload_type() -> None:
    assert set(PAYLOADS) == set(codec.TYPES)
    assert all(type(v) is codec.TYPES[name] for name, v in PAYLOADS.items())


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_every_payload_type_round_trips_exactly(name: str) -> None:
    assert_same(over_json(PAYLOADS[name]), PAYLOADS[name])


def test_more_payload_variants_round_trip() -> None:
    for value in [
        SaveWeights(path=None, kind="sampler_weights", snapshot_id="s:sample:0"),
        SaveWeights(path="tinker://m/sampler_weights/x", kind="sampler_weights"),
        Sample(SamplerWeights("b", model_path="tinker://m/sampler_weights/x"),
               np.array([5], dtype=np.int64), 1, SamplingParams(stop_tokens=())),
        Sample(SamplerWeights("b"), np.array([], dtype=np.int64), 2, SamplingParams()),
        CreateModel("b", LoraConfig()),
        ForwardBackward([datum(3)], "cross_entropy"),
    ]:  # fmt: skip
        assert_same(over_json(value), value, type(value).__name__)


def test_tuples_stay_tuples_and_none_stays_none() -> None:
    params = over_json(PAYLOADS["SamplingParams"])
    assert params.stop_strings == ("\n\n", "</s>")
    assert params.stop_tokens == (2, 151645)
    assert over_json(SamplingParams(stop_tokens=None)).stop_tokens is None
    assert over_json(SamplingParams(stop_tokens=())).stop_tokens == ()
    # frozen dataclasses come back equal and hashable, as the worker may use them as keys
    assert over_json(PAYLOADS["SamplingParams"]) == PAYLOADS["SamplingParams"]
    assert hash(over_json(SAMPLER)) == hash(SAMPLER)


def test_arrays_keep_dtype_shape_and_values() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    for array in [
        np.array([-(2**62), 0, 2**62], dtype=np.int64),
        np.array([0.1, -1e-30, np.inf, np.nan], dtype=np.float32),
        np.zeros((0,), dtype=np.int64),
        np.zeros((3, 0), dtype=np.float32),
        base.T,  # not C-contiguous
        base[:, ::2],  # strided view
        np.array([1.5, 2.5], dtype=">f4"),  # byte order kept
        np.array([1, 2], dtype=np.int32),
        np.array([[True, False]]),
    ]:
        got = over_json(array)
        assert_same(got, array, f"{array.dtype}{array.shape}")
    tokens = over_json(PAYLOADS["Datum"]).tokens
    assert tokens.dtype == np.int64 and tokens.shape == (7,)


def test_encoded_payloads_are_plain_json() -> None:
    for name, value in PAYLOADS.items():
        encoded = codec.encode(value)
        text = json.dumps(encoded, allow_nan=False)
        assert json.loads(text) == encoded, name
        assert json.loads(text)["__type__"] == name


def test_numpy_scalars_become_json_numbers() -> None:
    fb = ForwardBackward([datum(2)], "ppo", {"clip": np.float32(0.25), "n": np.int64(3)})
    encoded = codec.encode(fb)
    assert encoded["loss_fn_config"] == {"clip": 0.25, "n": 3}
    assert type(encoded["loss_fn_config"]["n"]) is int
    json.dumps(encoded)


@dataclasses.dataclass
class NotAPayload:
    tokens: list[int]


def test_non_payload_dataclasses_are_refused() -> None:
    # a dataclass that merely shares a payload type's name is not that type
    LookAlike = dataclasses.make_dataclass("Datum", [("tokens", list)])
    for value in [
        SampleResult([SampledSequence(np.zeros(1), np.zeros(1), "stop")]),
        SampledSequence(np.zeros(1), np.zeros(1), "length"),
        ForwardBackwardResult([], {}),
        Session("s", [], {}),
        NotAPayload([1]),
        LookAlike([1]),
        OptimStep(NotAPayload([1])),  # nested too
    ]:
        with pytest.raises(TypeError):
            codec.encode(value)


def test_values_that_are_not_data_are_refused() -> None:
    for value in [Datum, {1, 2}, b"bytes", object(), lambda: 0]:
        with pytest.raises(TypeError):
            codec.encode({"x": value})


def test_decode_refuses_unknown_type_names() -> None:
    for name in [
        "SampleResult",  # a dataclass in types, but not a payload
        "SampledSequence",
        "Session",
        "TinkerdError",
        "Path",
        "object",
        "os.system",
        "__builtins__",
        "",
    ]:
        message = {"__type__": name, "error": {"a": "b"}}
        with pytest.raises(KeyError):
            codec.decode(message)
        with pytest.raises(KeyError):  # nested anywhere
            codec.decode({"__type__": "OptimStep", "adam": message})
        with pytest.raises(KeyError):
            codec.decode([1, {"x": message}])


def test_decode_refuses_object_arrays() -> None:
    """An array's dtype comes from the message: it must never make numpy build objects."""
    message = {"__ndarray__": base64.b64encode(bytes(8)).decode(), "dtype": "|O", "shape": [1]}
    with pytest.raises(ValueError):
        codec.decode(message)


def test_decode_refuses_fields_a_payload_does_not_have() -> None:
    encoded = codec.encode(PAYLOADS["OptimStep"])
    with pytest.raises(TypeError):
        codec.decode({**encoded, "__init__": "x"})
    with pytest.raises(TypeError):
        codec.decode({**encoded, "extra": 1})


def test_user_dicts_with_reserved_keys_round_trip() -> None:
    """user_metadata is any JSON object a client sends with save_weights; it must come back as
    sent, whatever its keys (it must not be read as a tuple, an array or a payload type)."""
    for metadata in [
        {"__tuple__": [1, 2]},
        {"__type__": "Rejected", "error": {"a": "b"}},
        {"__type__": "no-such-type"},
        {"__ndarray__": "AAAA", "dtype": "<f4", "shape": [1]},
    ]:
        save = SaveWeights(path="tinker://m/weights/x", user_metadata=metadata)
        try:
            got = over_json(save).user_metadata
        except Exception as e:  # any failure is the bug reported below
            got = e
        assert got == metadata, (
            f"BUG codec: user_metadata {metadata!r} decodes as {got!r}: plain dicts whose keys "
            "collide with the codec's markers (__type__/__tuple__/__ndarray__) are not escaped"
        )


# -- settled results, as stored in Redis ------------------------------------------------------

RESULTS = [
    Result(
        Kind.FORWARD_BACKWARD,
        ForwardBackwardResult(
            [
                {"logprobs": np.array([-0.5, np.nan], np.float32), "x": np.zeros((2, 3))},
                {"logprobs": np.array([], np.float32)},
            ],
            {"loss:sum": 1.25, "num_tokens:sum": 2.0},
        ),
    ),
    Result(
        Kind.SAMPLE,
        SampleResult(
            [
                SampledSequence(
                    np.array([3, 1], np.int32), np.array([-1.0, -2.0], np.float32), "stop"
                )
            ],
            prompt_logprobs=np.array([np.nan, -0.75], np.float32),
            topk_prompt_logprobs=(np.array([[0], [4]], np.int64), np.zeros((2, 1), np.float32)),
        ),
    ),
    Result(Kind.SAMPLE, SampleResult([])),
    Result(Kind.OPTIM_STEP, {"learning_rate:mean": 1e-4, "grad_norm:mean": 0.1 + 0.2}),
    Result(Kind.CREATE_MODEL, {"model_id": "s:train:0", "trainable_params": 1024}),
    Result(Kind.SAVE_WEIGHTS, {"path": "tinker://m/weights/x", "__tuple__": [1]}),
    Result.failed(UserError("bad input")),
    Result.failed(ServerError("boom")),
]


@pytest.mark.parametrize("result", RESULTS, ids=lambda r: r.kind)
def test_every_result_round_trips_exactly(result: Result) -> None:
    data = codec.dump_result(result)
    json.loads(data)  # plain JSON
    got = codec.load_result(data)
    assert got.kind is result.kind
    assert_same(got.value, result.value)


def test_a_metric_that_is_not_a_number_round_trips() -> None:
    got = codec.load_result(codec.dump_result(Result(Kind.OPTIM_STEP, {"loss": float("nan")})))
    assert math.isnan(got.info()["loss"])


def test_a_failed_result_keeps_what_its_client_is_told() -> None:
    got = codec.load_result(codec.dump_result(Result.failed(NotFound("no such model"))))
    assert got.value == {"error": "no such model", "category": "user"}
    error = got.error
    assert isinstance(error, UserError) and error.message == "no such model"


def test_results_build_only_result_types() -> None:
    """A result from Redis builds results, never payloads or anything else; a payload's codec
    still refuses results (test_non_payload_dataclasses_are_refused)."""
    for name in ["OptimStep", "Datum", "Session", "TinkerdError", "object"]:
        data = json.dumps({"kind": "sample", "value": {"__type__": name}}).encode()
        with pytest.raises(KeyError):
            codec.load_result(data)
    with pytest.raises(ValueError):  # an unknown kind
        codec.load_result(json.dumps({"kind": "exec", "value": {}}).encode())
    with pytest.raises(TypeError):
        codec.dump_result(Result(Kind.SAMPLE, PAYLOADS["Sample"]))  # type: ignore[arg-type]
