"""Bad input: each gets a clear user error (a 4xx with a JSON body, or an SDK error carrying the
message), changes nothing, and leaves the server and the same TrainingClient serving."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

pytestmark = pytest.mark.timeout(120)

HEADERS = {"X-API-Key": "tml-test"}
PROTO = "application/x-protobuf"
VOCAB = 909  # the tiny model's vocabulary (tinkerd/tiny_model.py)
TOKENS = [5, 17, 42, 99, 300, 7]
WAIT = 60


# -- helpers ---------------------------------------------------------------------------------


def assert_user_error(r: httpx.Response, *fragments: str, status: int = 400) -> dict[str, Any]:
    """A 4xx answer with a JSON body {"error": <message>, "category": "user"} (never empty)."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["category"] == "user"
    assert isinstance(body["error"], str) and body["error"]
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body


def sdk_user_error(future, *fragments: str) -> str:
    """The SDK's error for a refused request: a 400 at submit, or a failed future."""
    with pytest.raises((tinker.BadRequestError, tinker.RequestFailedError)) as info:
        future.result(timeout=WAIT)
    error = info.value
    if isinstance(error, tinker.BadRequestError):
        assert error.status_code == 400
        assert isinstance(error.body, dict) and error.body["category"] == "user"
        message = error.body["error"]
    else:
        assert error.category == "user"
        message = error.message
    for fragment in fragments:
        assert fragment in message, message
    return message


def post(server, path: str, **kwargs) -> httpx.Response:
    headers = {**HEADERS, **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}/api/v1/{path}", headers=headers, timeout=WAIT, **kwargs)


def datum(tokens: list[int] = TOKENS, **inputs: Any) -> types.Datum:
    """A cross_entropy datum by default; keyword arguments replace or add loss inputs."""
    loss_fn_inputs: dict[str, Any] = {
        "target_tokens": tokens[1:],
        "weights": [1.0] * (len(tokens) - 1),
    }
    loss_fn_inputs.update(inputs)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={k: v for k, v in loss_fn_inputs.items() if v is not None},
    )


def rl_datum(**inputs: Any) -> types.Datum:
    n = len(TOKENS) - 1
    base = {"weights": None, "logprobs": [-2.0] * n, "advantages": [1.0] * n}
    return datum(**{**base, **inputs})


def fwdbwd_proto(
    model_id: str, seq_id: int, data: list[types.Datum], loss_fn: str = "cross_entropy"
) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn),
        model_id=model_id,
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


@contextmanager
def raw_turn(training_client) -> Iterator[int]:
    """Take the TrainingClient's next seq_id (and its turn) for a raw request, as one of its own
    ops would, so that the client's later ops carry on from the next seq_id."""
    request_id = training_client._get_request_id()

    async def take_turn() -> None:
        async with training_client._take_turn(request_id):
            pass

    try:
        yield request_id + 1
    finally:
        training_client.holder.run_coroutine_threadsafe(take_turn()).result(timeout=WAIT)


class Probe:
    """Watches one model: its adapter weights, its forward logprobs, and its gradients."""

    def __init__(self, server, training_client) -> None:
        self.server = server
        self.tc = training_client
        self.data = [datum(), datum([9, 8, 7, 6])]
        self.weights = self.adapter()
        self.logprobs = self.forward()

    def adapter(self) -> dict:
        return self.server.backend.adapter_state(self.tc.model_id)

    def forward(self) -> list[np.ndarray]:
        out = self.tc.forward(self.data, "cross_entropy").result(timeout=WAIT)
        return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]

    def assert_unchanged(self) -> None:
        """Nothing moved, and no gradient was left behind for the next optim_step: a step now
        sees a zero gradient norm. Also shows that the same client still gets served."""
        weights = self.adapter()
        assert weights.keys() == self.weights.keys()
        assert all(bool((weights[k] == self.weights[k]).all()) for k in weights)
        for got, want in zip(self.forward(), self.logprobs, strict=True):
            np.testing.assert_array_equal(got, want)
        step = self.tc.optim_step(types.AdamParams(learning_rate=0.05)).result(timeout=WAIT)
        assert step.metrics["grad_norm:mean"] == 0.0
        weights = self.adapter()
        assert all(bool((weights[k] == self.weights[k]).all()) for k in weights)

    def assert_trains(self) -> None:
        """A normal fwd/bwd + step on the same client still works and changes the weights."""
        fb = self.tc.forward_backward(self.data, "cross_entropy")
        step = self.tc.optim_step(types.AdamParams(learning_rate=0.05))
        assert fb.result(timeout=WAIT).metrics["loss:sum"] > 0
        assert step.result(timeout=WAIT).metrics["grad_norm:mean"] > 0
        weights = self.adapter()
        assert any(bool((weights[k] != self.weights[k]).any()) for k in weights)


@pytest.fixture
def probe(server, training_client) -> Probe:
    return Probe(server, training_client)


# -- forward_backward through the SDK --------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "fragments"),
    [
        (datum([5, VOCAB + 10, 7]), ["token id", "outside the vocabulary"]),
        (datum([5, 6, 7], target_tokens=[6, VOCAB]), ["target token id", "vocabulary"]),
        (datum([5, 6, 7], target_tokens=[6, 7, 8]), ["target_tokens", "positions"]),
        (datum([5, 6, 7], weights=[1.0]), ["weights", "shape"]),
        (datum([5, 6, 7], weights=[1.0, math.nan]), ["weights", "finite"]),
        (datum([5, 6, 7], weights=[math.inf, 1.0]), ["weights", "finite"]),
        (datum([5, 6, 7], target_tokens=[6, -1]), ["negative token id"]),
    ],
    ids=[
        "input-vocab",
        "target-vocab",
        "target-length",
        "weights-length",
        "weights-nan",
        "weights-inf",
        "negative-target",
    ],
)
def test_bad_cross_entropy_datum(probe: Probe, bad: types.Datum, fragments: list[str]) -> None:
    # the bad datum rides with a good one: the whole request is refused, the good part too
    sdk_user_error(probe.tc.forward_backward([datum(), bad], "cross_entropy"), *fragments)
    sdk_user_error(probe.tc.forward([bad], "cross_entropy"), *fragments)
    probe.assert_unchanged()
    probe.assert_trains()


@pytest.mark.parametrize(
    ("loss_fn", "bad", "fragments"),
    [
        ("ppo", rl_datum(advantages=None), ["ppo", "advantages"]),
        ("importance_sampling", rl_datum(logprobs=None), ["logprobs"]),
        ("cross_entropy", datum(target_tokens=None), ["target_tokens"]),  # weights default
        (
            "importance_sampling",
            rl_datum(advantages=[1.0, math.inf, 1, 1, 1]),
            ["advantages", "finite"],
        ),
        ("ppo", rl_datum(advantages=[math.nan] * 5), ["advantages", "finite"]),
        ("dro", rl_datum(logprobs=[-1.0, -math.inf, -1, -1, -1]), ["logprobs", "finite"]),
        ("nonexistent_loss", datum(), ["unknown loss_fn", "nonexistent_loss", "cross_entropy"]),
    ],
    ids=[
        "ppo-no-advantages",
        "is-no-logprobs",
        "ce-no-targets",
        "is-inf-advantage",
        "ppo-nan-advantages",
        "dro-inf-logprob",
        "unknown-loss",
    ],
)
def test_bad_loss_request(probe: Probe, loss_fn: str, bad: types.Datum, fragments) -> None:
    sdk_user_error(probe.tc.forward_backward([bad], loss_fn), *fragments)
    probe.assert_unchanged()


def test_bad_loss_config(probe: Probe) -> None:
    future = probe.tc.forward_backward([rl_datum()], "ppo", {"clip_lower": 0.5})
    sdk_user_error(future, "clip_lower")
    future = probe.tc.forward_backward([rl_datum()], "ppo", {"clip_low_threshold": math.nan})
    sdk_user_error(future, "clip_low_threshold")
    probe.assert_unchanged()


def test_empty_batch(server, probe: Probe) -> None:
    with pytest.raises(ValueError):  # the SDK itself refuses []
        probe.tc.forward_backward([], "cross_entropy")
    # a raw request on one of the client's seq_ids; refusing it must not stall the client
    with raw_turn(probe.tc) as seq_id:
        r = post(
            server,
            "forward_backward",
            content=fwdbwd_proto(probe.tc.model_id, seq_id, []),
            headers={"Content-Type": PROTO},
        )
    assert_user_error(r, "empty batch")
    probe.assert_unchanged()
    probe.assert_trains()


# -- raw requests --------------------------------------------------------------------------


def test_unknown_model_id(server, probe: Probe) -> None:
    r = post(
        server,
        "forward_backward",
        content=fwdbwd_proto("nope:train:0", 1, [datum()]),
        headers={"Content-Type": PROTO},
    )
    assert_user_error(r, "nope:train:0", status=404)
    r = post(
        server,
        "optim_step",
        json={"model_id": "nope:train:0", "seq_id": 1, "adam_params": {"learning_rate": 1e-4}},
    )
    assert_user_error(r, "nope:train:0", status=404)
    r = post(server, "get_info", json={"model_id": "nope:train:0"})
    assert_user_error(r, "nope:train:0", status=404)
    probe.assert_unchanged()


@pytest.mark.parametrize(
    "body",
    [b"\xff\xff\xff\xff\x0f garbage", b"\x0a\x05ab", b"not protobuf at all"],
    ids=["garbage", "truncated", "text"],
)
def test_malformed_protobuf_body(server, probe: Probe, body: bytes) -> None:
    r = post(server, "forward_backward", content=body, headers={"Content-Type": PROTO})
    assert 400 <= r.status_code < 500
    assert_user_error(r, status=r.status_code)
    probe.assert_unchanged()


def test_protobuf_with_bad_token_bytes(server, probe: Probe) -> None:
    """A parseable message whose token bytes are not int32s: a user error, not a crash."""
    from tinker.proto import tinker_public_pb2 as pb

    with raw_turn(probe.tc) as seq_id:
        msg = pb.ForwardBackwardRequest.FromString(
            fwdbwd_proto(probe.tc.model_id, seq_id, [datum()])
        )
        msg.data[0].model_input[0].encoded_text.tokens = b"\x01\x02\x03"
        r = post(
            server,
            "forward_backward",
            content=msg.SerializeToString(),
            headers={"Content-Type": PROTO},
        )
    assert_user_error(r, "tokens")
    probe.assert_unchanged()


@pytest.mark.parametrize(
    "path",
    [
        "optim_step",
        "create_session",
        "create_model",
        "get_info",
        "retrieve_future",
        "session_heartbeat",
        "forward_backward",
    ],
)
@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2, 3]", b'"a string"', b"null", b""],
    ids=["malformed", "list", "string", "null", "empty"],
)
def test_malformed_or_non_object_json(server, path: str, content: bytes) -> None:
    r = post(server, path, content=content, headers={"Content-Type": "application/json"})
    assert_user_error(r, "JSON object")


def test_missing_or_mistyped_fields(server, training_client) -> None:
    model_id = training_client.model_id
    r = post(server, "optim_step", json={"seq_id": 1, "adam_params": {}})
    assert_user_error(r, "model_id")
    r = post(server, "optim_step", json={"model_id": model_id, "seq_id": "one", "adam_params": {}})
    assert_user_error(r, "seq_id")
    r = post(server, "retrieve_future", json={"request_id": 5})
    assert_user_error(r, "request_id")
    r = post(server, "create_session", json={"tags": "not-a-list"})
    assert_user_error(r, "tags")


def test_seq_id_from_the_past(server, probe: Probe) -> None:
    """seq 1 of this client was its first forward; seq -1 never exists."""
    model_id = probe.tc.model_id
    for seq_id in (1, -1):
        r = post(
            server,
            "forward_backward",
            content=fwdbwd_proto(model_id, seq_id, [datum()]),
            headers={"Content-Type": PROTO},
        )
        assert_user_error(r, "seq_id")
    r = post(
        server,
        "optim_step",
        json={
            "model_id": model_id,
            "seq_id": 1,
            "type": "optim_step",
            "adam_params": {"learning_rate": 0.5},
        },
    )
    assert_user_error(r, "seq_id")
    probe.assert_unchanged()
    probe.assert_trains()


# -- optim_step ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"learning_rate": math.inf}, "learning_rate"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": 1.5}, "beta2"),
        ({"beta1": -0.1}, "beta1"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
    ],
)
def test_bad_adam_params(probe: Probe, params: dict[str, float], field: str) -> None:
    # gradients are waiting: a refused step must neither apply them nor drop them
    fb = probe.tc.forward_backward(probe.data, "cross_entropy").result(timeout=WAIT)
    assert fb.metrics["loss:sum"] > 0
    sdk_user_error(probe.tc.optim_step(types.AdamParams(**params)), field)
    weights = probe.adapter()
    assert all(bool((weights[k] == probe.weights[k]).all()) for k in weights)
    step = probe.tc.optim_step(types.AdamParams(learning_rate=0.05)).result(timeout=WAIT)
    assert step.metrics["grad_norm:mean"] > 0
    weights = probe.adapter()
    assert any(bool((weights[k] != probe.weights[k]).any()) for k in weights)


def test_optimizer_params_of_another_optimizer(server, training_client) -> None:
    with raw_turn(training_client) as seq_id:
        r = post(
            server,
            "optim_step",
            json={
                "model_id": training_client.model_id,
                "seq_id": seq_id,
                "type": "optim_step",
                "optimizer_params": {"type": "dimuon", "learning_rate": 0.01},
            },
        )
    assert_user_error(r, "adam_params")
    out = training_client.forward([datum()], "cross_entropy").result(timeout=WAIT)
    assert len(out.loss_fn_outputs) == 1


# -- create_model ----------------------------------------------------------------------------


@pytest.mark.parametrize(("rank", "fragment"), [(0, "rank"), (-4, "rank"), (10**6, "rank")])
def test_bad_lora_rank(server, service_client, tiny_model_dir: Path, rank: int, fragment) -> None:
    future = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=rank)
    sdk_user_error(future, fragment)
    assert not any(
        str(rank) == str(m.lora.rank)
        for m in server.app.extensions["tinkerd"].registry.models()
        if m.session_id == service_client.holder.get_session_id()
    )
    # the same ServiceClient still creates a working model
    tc = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4)
    tc = tc.result(timeout=WAIT)
    out = tc.forward([datum()], "cross_entropy").result(timeout=WAIT)
    assert len(out.loss_fn_outputs) == 1


def test_lora_config_that_trains_nothing(server, service_client, tiny_model_dir: Path) -> None:
    """The SDK refuses this itself; sent raw, the creation fails with a user error."""
    r = post(
        server,
        "create_model",
        json={
            "session_id": service_client.holder.get_session_id(),
            "model_seq_id": 60,
            "base_model": str(tiny_model_dir),
            "type": "create_model",
            "lora_config": {
                "rank": 4,
                "train_mlp": False,
                "train_attn": False,
                "train_unembed": False,
            },
        },
    )
    assert r.status_code == 200, r.text
    result = post(server, "retrieve_future", json={"request_id": r.json()["request_id"]})
    assert result.status_code == 200
    assert result.json()["category"] == "user" and "trains no layer" in result.json()["error"]
    # later work on that model fails fast with the same reason
    r = post(
        server,
        "optim_step",
        json={
            "model_id": r.json()["model_id"],
            "seq_id": 1,
            "adam_params": {"learning_rate": 1e-3},
        },
    )
    assert r.status_code == 200
    result = post(server, "retrieve_future", json={"request_id": r.json()["request_id"]})
    assert result.json()["category"] == "user" and "trains no layer" in result.json()["error"]


@pytest.mark.parametrize("kind", ["missing", "no-config", "relative-missing"])
def test_bad_local_base_model(service_client, tmp_path: Path, tiny_model_dir: Path, kind) -> None:
    if kind == "missing":
        name, fragment = str(tmp_path / "no-such-model"), "no-such-model"
    elif kind == "no-config":
        (tmp_path / "empty-model").mkdir()
        name, fragment = str(tmp_path / "empty-model"), "config.json"
    else:
        name, fragment = "./no-such-model-dir", "no-such-model-dir"
    sdk_user_error(service_client.create_lora_training_client(base_model=name, rank=4), fragment)
    tc = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4)
    assert tc.result(timeout=WAIT).get_info().model_data.model_name == str(tiny_model_dir)


def test_unknown_session(server, tiny_model_dir: Path) -> None:
    r = post(
        server,
        "create_model",
        json={
            "session_id": "no-such-session",
            "model_seq_id": 0,
            "base_model": str(tiny_model_dir),
            "lora_config": {"rank": 4},
            "type": "create_model",
        },
    )
    assert_user_error(r, "no-such-session", status=404)
    assert not any(
        m.session_id == "no-such-session"
        for m in server.app.extensions["tinkerd"].registry.models()
    )
    r = post(server, "session_heartbeat", json={"session_id": "no-such-session"})
    assert_user_error(r, "no-such-session", status=404)


@pytest.mark.parametrize(
    "body",
    [
        {"model_seq_id": -1},
        {"model_seq_id": "zero"},
        {"base_model": ""},
        {"base_model": 42},
        {"lora_config": [8]},
        {"lora_config": {"rank": 8, "seed": "x"}},
        {"lora_config": {"rank": 8, "seed": 2**64}},  # stored with the run; torch takes < 2**64
        {"lora_config": {"rank": 8, "seed": -(2**63) - 1}},
        {"lora_config": {"rank": 8, "train_mlp": "yes"}},
        {"optimizer_config": {"type": "dimuon", "version": 1}},
    ],
)
def test_bad_create_model_fields(server, service_client, tiny_model_dir: Path, body) -> None:
    session_id = service_client.holder.get_session_id()
    full = {
        "session_id": session_id,
        "model_seq_id": 50,
        "base_model": str(tiny_model_dir),
        "lora_config": {"rank": 4},
        "type": "create_model",
        **body,
    }
    assert_user_error(post(server, "create_model", json=full))
    assert not any(
        m.model_id == f"{session_id}:train:50"
        for m in server.app.extensions["tinkerd"].registry.models()
    )
