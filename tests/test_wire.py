"""Unit tests of tinkerd.wire against the SDK's own protobuf encoder and decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)
from tinker.types.tensor_data import TensorData

from tinkerd.types import ForwardBackwardResult, SampledSequence, SampleResult, UserError
from tinkerd.wire.decode import (
    decompress_zstd,
    forward_backward_from_proto,
    model_input_tokens,
    parse_forward_backward_json,
    parse_forward_backward_proto,
)
from tinkerd.wire.encode import encode_forward_backward_output, encode_sample_response

pytestmark = pytest.mark.timeout(60)


def sdk_request(
    data: list[types.Datum],
    loss_fn: str = "cross_entropy",
    config: dict | None = None,
    *,
    model_id: str = "s:train:0",
    seq_id: int = 7,
    forward_only: bool = False,
) -> bytes:
    """The body the SDK's training resource posts to /api/v1/forward_backward."""
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=data, loss_fn=loss_fn, loss_fn_config=config
        ),
        model_id=model_id,
        seq_id=seq_id,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def decode(body: bytes):
    msg, fingerprint = parse_forward_backward_proto(body)
    return msg, fingerprint, forward_backward_from_proto(msg)


def ce_datum(tokens: list[int], targets: list[int], weights: list[float]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )


# -- requests: SDK encoder -> tinkerd decoder ------------------------------------------------


def test_sdk_proto_round_trip() -> None:
    data = [
        ce_datum([5, 6, 7], [6, 7, 8], [0.0, 1.0, 0.5]),
        ce_datum([9, 10], [10, 11], [1.0, 1.0]),
    ]
    msg, _, fb = decode(sdk_request(data, model_id="abc:train:3", seq_id=42))
    assert (msg.model_id, msg.seq_id) == ("abc:train:3", 42)
    assert fb.loss_fn == "cross_entropy" and fb.forward_only is False
    assert fb.loss_fn_config == {}
    assert len(fb.datums) == 2
    np.testing.assert_array_equal(fb.datums[0].tokens, [5, 6, 7])
    np.testing.assert_array_equal(fb.datums[1].tokens, [9, 10])
    assert fb.datums[0].tokens.dtype == np.int64
    targets = fb.datums[0].loss_fn_inputs["target_tokens"]
    assert targets.dtype == np.int64
    np.testing.assert_array_equal(targets, [6, 7, 8])
    weights = fb.datums[0].loss_fn_inputs["weights"]
    assert weights.dtype == np.float32
    np.testing.assert_array_equal(weights, [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(fb.datums[1].loss_fn_inputs["weights"], [1.0, 1.0])


def test_multi_chunk_model_input_is_concatenated_and_forward_only_kept() -> None:
    model_input = types.ModelInput(
        chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.EncodedTextChunk(tokens=[3])]
    )
    datum = types.Datum(
        model_input=model_input,
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    _, _, fb = decode(sdk_request([datum], forward_only=True))
    np.testing.assert_array_equal(fb.datums[0].tokens, [1, 2, 3])
    assert fb.forward_only is True


def test_rl_loss_inputs_and_config() -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": [2, 3, 4],
            "logprobs": [-1.0, -2.0, -0.5],
            "advantages": [0.5, -0.5, 1.0],
        },
    )
    config = {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}
    _, _, fb = decode(sdk_request([datum], "ppo", config))
    assert fb.loss_fn == "ppo"
    assert fb.loss_fn_config == pytest.approx(config)
    np.testing.assert_allclose(fb.datums[0].loss_fn_inputs["advantages"], [0.5, -0.5, 1.0])
    # defaults fill keys that were not sent
    _, _, fb = decode(sdk_request([datum], "ppo", {"clip_low_threshold": 0.5}))
    assert fb.loss_fn_config == pytest.approx(
        {"clip_low_threshold": 0.5, "clip_high_threshold": 1.2}
    )


def test_fingerprint_identifies_content() -> None:
    data = [ce_datum([1, 2], [2, 3], [1.0, 1.0])]
    _, fp1, _ = decode(sdk_request(data))
    _, fp2, _ = decode(sdk_request(data))
    _, fp3, _ = decode(sdk_request([ce_datum([1, 2], [2, 3], [1.0, 0.5])]))
    _, fp4, _ = decode(sdk_request(data, seq_id=8))
    assert fp1 == fp2
    assert len({fp1, fp3, fp4}) == 3


def test_two_dimensional_targets() -> None:
    targets = np.array([[2, 5], [3, 6], [4, 7]], dtype=np.int64)
    weights = np.array([[1.0, 0.0], [1.0, 0.5], [0.0, 1.0]], dtype=np.float32)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_numpy(targets),
            "weights": TensorData.from_numpy(weights),
        },
    )
    _, _, fb = decode(sdk_request([datum]))
    np.testing.assert_array_equal(fb.datums[0].loss_fn_inputs["target_tokens"], targets)
    np.testing.assert_array_equal(fb.datums[0].loss_fn_inputs["weights"], weights)


# -- CSR inputs ------------------------------------------------------------------------------


def test_csr_inputs_are_densified() -> None:
    dense_targets = torch.zeros(6, 4, dtype=torch.int64)
    dense_targets[1, 2] = 17
    dense_targets[4, 0] = 3
    dense_weights = torch.zeros(6, 4)
    dense_weights[1, 2] = 0.25
    dense_weights[5, 3] = -2.0
    targets = TensorData.from_torch_sparse(dense_targets)
    weights = TensorData.from_torch_sparse(dense_weights)
    assert targets.sparse_crow_indices is not None  # the SDK really chose CSR
    assert weights.sparse_crow_indices is not None
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(list(range(6))),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    body = sdk_request([datum])
    raw = pb.ForwardBackwardRequest.FromString(body)
    assert raw.data[0].loss_fn_inputs["weights"].WhichOneof("encoding") == "sparse_csr"
    _, _, fb = decode(body)
    got_targets = fb.datums[0].loss_fn_inputs["target_tokens"]
    got_weights = fb.datums[0].loss_fn_inputs["weights"]
    assert got_targets.dtype == np.int64 and got_weights.dtype == np.float32
    np.testing.assert_array_equal(got_targets, dense_targets.numpy())
    np.testing.assert_array_equal(got_weights, dense_weights.numpy())


def test_json_csr_inputs_are_densified() -> None:
    body = {
        "model_id": "s:train:0",
        "seq_id": 1,
        "forward_backward_input": {
            "loss_fn": "cross_entropy",
            "data": [
                {
                    "model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                    "loss_fn_inputs": {
                        "target_tokens": {
                            "data": [4, 9],
                            "dtype": "int64",
                            "shape": [3, 2],
                            "sparse_crow_indices": [0, 1, 1, 2],
                            "sparse_col_indices": [1, 0],
                        },
                        "weights": {
                            "data": [1, 0.5, 0, 0, 1, 1],
                            "dtype": "float32",
                            "shape": [3, 2],
                        },
                    },
                }
            ],
        },
    }
    fb = parse_forward_backward_json(body)
    np.testing.assert_array_equal(
        fb.datums[0].loss_fn_inputs["target_tokens"], [[0, 4], [0, 0], [9, 0]]
    )
    np.testing.assert_array_equal(
        fb.datums[0].loss_fn_inputs["weights"], [[1, 0.5], [0, 0], [1, 1]]
    )


def _csr_tensor(values, crow, col, shape, dtype=pb.DTYPE_INT64) -> pb.Tensor:
    np_dtype = "<i8" if dtype == pb.DTYPE_INT64 else "<f4"
    t = pb.Tensor(dtype=dtype, shape=shape)
    t.sparse_csr.values = np.asarray(values, np_dtype).tobytes()
    t.sparse_csr.crow_indices = np.asarray(crow, "<i8").tobytes()
    t.sparse_csr.col_indices = np.asarray(col, "<i8").tobytes()
    return t


def _proto_with_targets(targets: pb.Tensor, n_tokens: int = 2) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id="s:train:0", seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.arange(n_tokens, dtype="<i4").tobytes()
    d.loss_fn_inputs["target_tokens"].CopyFrom(targets)
    weights = d.loss_fn_inputs["weights"]
    weights.dtype = pb.DTYPE_FLOAT32
    weights.shape.append(n_tokens)
    weights.dense = np.ones(n_tokens, "<f4").tobytes()
    return msg.SerializeToString()


@pytest.mark.parametrize(
    ("values", "crow", "col", "shape"),
    [
        ([1], [0, 1, 1], [5], [2, 2]),  # column out of range
        ([1], [0, 1, 1], [-1], [2, 2]),  # negative column
        ([1, 2], [0, 2, 1], [0, 1], [2, 2]),  # row pointers go down
        ([1], [0, 1], [0], [2, 2]),  # too few row pointers
        ([1], [0, 1, 1], [0, 1], [2, 2]),  # more columns than values
        ([1], [0, 1, 1], [0], [2]),  # CSR needs 2-D
        ([], [0, 0, 0], [], [2, 10**12]),  # would densify to terabytes
        ([], [], [], [-1, 5]),  # negative rows
        ([], [0, 0, 0], [], [2, -3]),  # negative columns
    ],
)
def test_bad_csr_is_a_user_error(values, crow, col, shape) -> None:
    body = _proto_with_targets(_csr_tensor(values, crow, col, shape))
    with pytest.raises(UserError, match="target_tokens"):
        decode(body)


# -- loss_fn_config v1/v2 --------------------------------------------------------------------


def _dro_proto() -> pb.ForwardBackwardRequest:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": [2, 3], "logprobs": [-1.0, -1.0], "advantages": [1, 1]},
    )
    return pb.ForwardBackwardRequest.FromString(sdk_request([datum], "dro", {"beta": 0.3}))


def test_sdk_writes_config_twice_and_v2_is_read() -> None:
    msg = _dro_proto()
    assert dict(msg.loss_fn_config) == pytest.approx({"beta": 0.3})
    assert msg.loss_fn_config_v2["beta"].number == pytest.approx(0.3)
    assert forward_backward_from_proto(msg).loss_fn_config == pytest.approx({"beta": 0.3})


def test_loss_fn_config_v2_is_preferred_over_v1() -> None:
    msg = _dro_proto()
    msg.loss_fn_config["beta"] = 0.9  # an old-style value that disagrees with v2
    msg.loss_fn_config_v2["beta"].number = 0.05
    assert forward_backward_from_proto(msg).loss_fn_config["beta"] == pytest.approx(0.05)


def test_loss_fn_config_v1_alone_is_still_read() -> None:
    msg = _dro_proto()
    msg.ClearField("loss_fn_config_v2")
    msg.loss_fn_config["beta"] = 0.7
    assert forward_backward_from_proto(msg).loss_fn_config["beta"] == pytest.approx(0.7)


def test_text_config_value_is_a_user_error() -> None:
    msg = _dro_proto()
    msg.loss_fn_config_v2["beta"].text = "high"
    with pytest.raises(UserError, match="beta"):
        forward_backward_from_proto(msg)


def test_unknown_config_key_is_a_user_error() -> None:
    msg = _dro_proto()
    msg.loss_fn_config_v2["gamma"].number = 1.0
    with pytest.raises(UserError, match="gamma"):
        forward_backward_from_proto(msg)


# -- request validation ----------------------------------------------------------------------


def test_malformed_protobuf_is_a_user_error() -> None:
    with pytest.raises(UserError, match="malformed protobuf"):
        parse_forward_backward_proto(b"\xff\xff\xff\xff not a protobuf")
    with pytest.raises(UserError, match="model_id"):
        parse_forward_backward_proto(b"")


def test_token_bytes_not_a_multiple_of_four_is_a_user_error() -> None:
    msg = pb.ForwardBackwardRequest.FromString(sdk_request([ce_datum([1, 2], [2, 3], [1, 1])]))
    msg.data[0].model_input[0].encoded_text.tokens = b"\x01\x00\x00\x00\x02"
    with pytest.raises(UserError, match="tokens"):
        forward_backward_from_proto(msg)


def test_image_and_audio_chunks_are_refused_by_their_sdk_names() -> None:
    msg = pb.ForwardBackwardRequest.FromString(sdk_request([ce_datum([1, 2], [2, 3], [1, 1])]))
    msg.data[0].model_input.add().image.data = b"png"
    with pytest.raises(UserError, match="datum 0: ImageChunk .* encoded_text chunks"):
        forward_backward_from_proto(msg)
    for kind, name in (("image_asset_pointer", "ImageAssetPointerChunk"), ("dmel", "DmelChunk")):
        with pytest.raises(UserError, match=f"prompt: {name}"):
            model_input_tokens({"chunks": [{"type": kind}]}, "prompt")


def test_a_zstd_body_is_limited_as_it_is_decompressed() -> None:
    """A bomb (a small body that expands without bound) stops at the limit, holding about the
    limit in memory, never what the frame claims."""
    import tracemalloc

    import zstandard

    body = sdk_request([ce_datum([1, 2], [2, 3], [1, 1])])
    assert decompress_zstd(zstandard.ZstdCompressor().compress(body), 1 << 20) == body
    writer = zstandard.ZstdCompressor(level=1).compressobj()
    bomb = b"".join(writer.compress(bytes(1 << 20)) for _ in range(256)) + writer.flush()
    assert len(bomb) < 64 << 10  # 256 MiB of zeros in a few kilobytes
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as refused:
            decompress_zstd(bomb, 4 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413 and "expands past 4194304 bytes" in refused.value.message
    assert peak < 16 << 20, peak
    with pytest.raises(UserError, match="not valid zstd") as bad:
        decompress_zstd(b"not zstd at all", 1 << 20)
    assert bad.value.status == 400


@pytest.mark.parametrize(
    ("datum", "loss_fn", "match"),
    [
        (ce_datum([1, 2, 3], [2, 3], [1.0, 1.0]), "cross_entropy", "positions"),
        (ce_datum([1, 2], [2, 3], [1.0, 1.0, 1.0]), "cross_entropy", "weights"),
        (ce_datum([1, 2], [2, -3], [1.0, 1.0]), "cross_entropy", "negative"),
        (ce_datum([1, 2], [2, 3], [1.0, float("nan")]), "cross_entropy", "finite"),
        (ce_datum([1, 2], [2, 3], [1.0, float("inf")]), "cross_entropy", "finite"),
        (ce_datum([1, 2], [2, 3], [1.0, 1.0]), "ppo", "advantages"),
        (ce_datum([1, 2], [2, 3], [1.0, 1.0]), "custom", "unknown loss_fn"),
    ],
)
def test_invalid_datums_are_user_errors(datum, loss_fn, match) -> None:
    with pytest.raises(UserError, match=match):
        decode(sdk_request([datum], loss_fn))


def test_empty_batch_and_empty_datum_are_user_errors() -> None:
    with pytest.raises(UserError, match="empty batch"):
        decode(sdk_request([]))
    with pytest.raises(UserError, match="no tokens"):
        decode(sdk_request([ce_datum([], [], [])]))


def test_dense_tensor_not_matching_its_shape_is_a_user_error() -> None:
    t = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[3])
    t.dense = np.arange(2, dtype="<i8").tobytes()
    with pytest.raises(UserError, match="target_tokens"):
        decode(_proto_with_targets(t))
    t.dense = b"\x00" * 9  # not a whole number of int64s
    with pytest.raises(UserError, match="target_tokens"):
        decode(_proto_with_targets(t))


_JSON_DATUM = {
    "model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
    "loss_fn_inputs": {"target_tokens": [2, 3], "logprobs": [-1, -1], "advantages": [1, 1]},
}


_TARGETS_ONLY = {**_JSON_DATUM, "loss_fn_inputs": {"target_tokens": [2, 3]}}


def test_valid_json_request_decodes() -> None:
    body = {
        "forward_backward_input": {
            "data": [_JSON_DATUM],
            "loss_fn": "dro",
            "loss_fn_config": {"beta": 0.5},
        },
        "forward_only": True,
    }
    fb = parse_forward_backward_json(body)
    assert (fb.loss_fn, fb.loss_fn_config, fb.forward_only) == ("dro", {"beta": 0.5}, True)
    np.testing.assert_array_equal(fb.datums[0].tokens, [1, 2])
    assert fb.datums[0].loss_fn_inputs["advantages"].dtype == np.float32


@pytest.mark.parametrize(
    "body",
    [
        {"forward_backward_input": {"data": "nope"}},
        {"forward_backward_input": {"data": [1]}},
        {"forward_backward_input": {"data": [{"model_input": [1, 2]}], "loss_fn": "cross_entropy"}},
        {"forward_backward_input": {"data": [{"model_input": {"chunks": [{"tokens": ["a"]}]}}]}},
        {"forward_backward_input": {"data": [], "loss_fn": ["cross_entropy"]}},
        {
            "forward_backward_input": {
                "data": [_JSON_DATUM],
                "loss_fn": "dro",
                "loss_fn_config": [1],
            }
        },
        {
            "forward_backward_input": {
                "data": [_JSON_DATUM],
                "loss_fn": "dro",
                "loss_fn_config": {"beta": "big"},
            }
        },
        {"forward_backward_input": {"data": [_TARGETS_ONLY], "loss_fn": "importance_sampling"}},
    ],
)
def test_malformed_json_request_is_a_user_error(body) -> None:
    with pytest.raises(UserError):
        parse_forward_backward_json(body)


def test_cross_entropy_weights_default_to_one() -> None:
    """A datum without weights (as other servers take it) weighs each target 1.0."""
    body = {"forward_backward_input": {"data": [_TARGETS_ONLY], "loss_fn": "cross_entropy"}}
    fb = parse_forward_backward_json(body)
    np.testing.assert_array_equal(fb.datums[0].loss_fn_inputs["weights"], [1.0, 1.0])
    assert fb.datums[0].loss_fn_inputs["weights"].dtype == np.float32


# -- responses: tinkerd encoder -> SDK decoder -----------------------------------------------


def test_output_round_trip_through_the_sdk_decoder() -> None:
    outputs = [
        {"logprobs": np.array([-1.0, -2.5, -0.125], np.float32)},
        {"logprobs": np.array([-3.0], np.float32)},
        {"logprobs": np.array([-0.5, -0.25], np.float32)},
    ]
    metrics = {"loss:sum": 9.375, "ratio:mean": 1.0}
    decoded = deserialize_forward_backward_output(
        encode_forward_backward_output(ForwardBackwardResult(outputs, metrics))
    )
    assert decoded.metrics == pytest.approx(metrics)
    assert len(decoded.loss_fn_outputs) == 3
    for got, want in zip(decoded.loss_fn_outputs, outputs, strict=True):
        assert set(got) == {"logprobs"}
        assert got["logprobs"].dtype == "float32"
        assert got["logprobs"].shape == [len(want["logprobs"])]
        np.testing.assert_array_equal(got["logprobs"].to_numpy(), want["logprobs"])


def test_output_with_mixed_trailing_shapes_keeps_datum_order() -> None:
    outputs = [
        {"logprobs": np.array([-1.0, -2.0], np.float32)},
        {"logprobs": np.array([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]], np.float32)},
        {"logprobs": np.array([[-7.0, -8.0]], np.float32)},
        {"logprobs": np.array([-9.0], np.float32)},
    ]
    body = encode_forward_backward_output(ForwardBackwardResult(outputs, {"loss:sum": 1.0}))
    raw = pb.ForwardBackwardOutput.FromString(body)
    assert [r.num_datums for r in raw.loss_fn_outputs] == [1, 2, 1]
    decoded = deserialize_forward_backward_output(body)
    assert [o["logprobs"].shape for o in decoded.loss_fn_outputs] == [[2], [3, 2], [1, 2], [1]]
    for got, want in zip(decoded.loss_fn_outputs, outputs, strict=True):
        np.testing.assert_array_equal(got["logprobs"].to_numpy(), want["logprobs"])


def test_sample_response_round_trip_through_the_sdk_decoder() -> None:
    result = SampleResult(
        [
            SampledSequence(np.array([3, 1, 4]), np.array([-0.5, -1.0, -2.0], np.float32), "stop"),
            SampledSequence(np.array([], np.int32), np.array([], np.float32), "length"),
        ],
        prompt_logprobs=np.array([np.nan, -1.5], np.float32),
        topk_prompt_logprobs=(np.array([[0, 0], [7, 2]]), np.array([[0, 0], [-0.25, -3.0]])),
    )
    back = deserialize_sample_response(encode_sample_response(result))
    assert [s.tokens for s in back.sequences] == [[3, 1, 4], []]
    assert [s.stop_reason for s in back.sequences] == ["stop", "length"]
    np.testing.assert_array_equal(back.sequences[0].logprobs_np, result.sequences[0].logprobs)
    np.testing.assert_array_equal(back.prompt_logprobs_np, result.prompt_logprobs)
    assert back.prompt_logprobs == [None, -1.5]
    assert back.topk_prompt_logprobs_np is not None
    np.testing.assert_array_equal(back.topk_prompt_logprobs_np.token_ids, [[0, 0], [7, 2]])
    np.testing.assert_array_equal(back.topk_prompt_logprobs_np.logprobs, [[0, 0], [-0.25, -3]])
