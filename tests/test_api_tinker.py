"""The Tinker protocol of tinkerd over real HTTP: the official SDK where it covers a flow, raw
requests (httpx + the SDK's own protobuf encoder) where a test must control seq_ids."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
from sdk_versions import needs, ready, server_capabilities
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

pytestmark = pytest.mark.timeout(120)

HEADERS = {"X-API-Key": "tml-test"}
PROTO = "application/x-protobuf"
TOKENS = [5, 17, 42, 99, 300, 7, 8]


# -- raw protocol helpers --------------------------------------------------------------------


def post(server, path: str, body: Any = None, **kwargs) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/{path}", json=body, headers=HEADERS, timeout=60, **kwargs
    )


def new_session(server) -> str:
    r = post(
        server,
        "create_session",
        {"tags": ["test"], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"},
    )
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def retrieve(server, request_id: str) -> httpx.Response:
    """Poll retrieve_future until it answers something other than try_again."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = post(server, "retrieve_future", {"request_id": request_id, "allow_metadata_only": True})
        if r.headers["content-type"].startswith("application/json") and r.status_code == 200:
            if r.json().get("type") == "try_again":
                continue
        return r
    raise AssertionError(f"future {request_id} never settled")


def create_model(
    server, session_id: str, model_seq_id: int = 0, *, base_model: str, rank: int = 8, seed: int = 0
) -> str:
    r = post(
        server,
        "create_model",
        {
            "session_id": session_id,
            "model_seq_id": model_seq_id,
            "base_model": base_model,
            "lora_config": {
                "rank": rank,
                "seed": seed,
                "train_unembed": True,
                "train_mlp": True,
                "train_attn": True,
            },
            "optimizer_config": {"type": "adamw"},
            "type": "create_model",
        },
    )
    assert r.status_code == 200, r.text
    model_id = r.json()["model_id"]
    assert model_id == f"{session_id}:train:{model_seq_id}"
    result = retrieve(server, r.json()["request_id"])
    assert result.status_code == 200 and "error" not in result.json(), result.text
    return model_id


def ce_datum(tokens: list[int] = TOKENS, weights: list[float] | None = None) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "weights": weights if weights is not None else [1.0] * (len(tokens) - 1),
        },
    )


def fwdbwd_body(
    model_id: str,
    seq_id: int,
    data: list[types.Datum],
    *,
    loss_fn: str = "cross_entropy",
    forward_only: bool = False,
) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn),
        model_id=model_id,
        seq_id=seq_id,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def submit_fwdbwd(server, body: bytes) -> str:
    r = httpx.post(
        f"{server.url}/api/v1/forward_backward",
        content=body,
        headers={**HEADERS, "Content-Type": PROTO},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def optim_body(model_id: str, seq_id: int, lr: float = 0.05) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "seq_id": seq_id,
        "type": "optim_step",
        "adam_params": {
            "learning_rate": lr,
            "beta1": 0.9,
            "beta2": 0.95,
            "eps": 1e-12,
            "weight_decay": 0.0,
            "grad_clip_norm": 0.0,
        },
    }


def submit_optim(server, body: dict[str, Any]) -> str:
    r = post(server, "optim_step", body)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def fwdbwd_result(server, request_id: str) -> types.ForwardBackwardOutput:
    r = retrieve(server, request_id)
    assert r.status_code == 200
    assert r.headers["content-type"] == PROTO, r.text
    return deserialize_forward_backward_output(r.content)


def json_result(server, request_id: str) -> dict[str, Any]:
    r = retrieve(server, request_id)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert "error" not in body, body
    return body


def logprobs(out: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.fixture
def base_model(tiny_model_dir: Path) -> str:
    return str(tiny_model_dir)


# -- bootstrap and sessions ------------------------------------------------------------------


def test_client_config_is_valid_for_the_sdk(server) -> None:
    r = post(server, "client/config", {"sdk_version": "0.38.0"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    config = types.ClientConfigResponse.model_validate(r.json())
    assert config.pjwt_auth_enabled is False  # no JWT exchange
    assert config.proto_compress_fwdbwd is True  # fwd/bwd bodies come zstd-compressed


def test_dynamic_config(server) -> None:
    r = post(server, "client/dynamic_config", {"sdk_version": "0.38.0"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["refresh_interval_sec"] > 0
    assert r.json()["sample_cancel_enabled"] is False


def test_session_lifecycle(server, base_model) -> None:
    session_id = new_session(server)
    other = new_session(server)
    assert session_id and session_id != other and "/" not in session_id
    r = post(server, "session_heartbeat", {"session_id": session_id, "type": "session_heartbeat"})
    assert r.status_code == 200 and r.json() == {}
    r = post(
        server,
        "telemetry",
        {
            "events": [],
            "platform": "linux",
            "sdk_version": "0.38.0",
            "session_id": session_id,
            "process_uuid": "x",
        },
    )
    assert r.status_code == 200 and r.json() == {"status": "accepted"}
    r = post(
        server, f"sessions/{session_id}/finish", {"reason": {"type": "success"}, "detail": None}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    # a finished session stops heartbeating (410) and creates no models; others are untouched
    r = post(server, "session_heartbeat", {"session_id": session_id, "type": "session_heartbeat"})
    assert r.status_code == 410
    r = post(
        server,
        "create_model",
        {
            "session_id": session_id,
            "model_seq_id": 0,
            "base_model": base_model,
            "lora_config": {"rank": 8},
        },
    )
    assert r.status_code == 400 and r.json()["category"] == "user"
    assert "finished" in r.json()["error"]
    r = post(server, "session_heartbeat", {"session_id": other, "type": "session_heartbeat"})
    assert r.status_code == 200
    r = post(server, "session_heartbeat", {"session_id": "nope", "type": "session_heartbeat"})
    assert r.status_code == 404 and r.json()["category"] == "user"


def test_sdk_client_lifecycle_sends_finish(server) -> None:
    client = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
    session_id = client.holder.get_session_id()
    needs(client, "close")("success").result(timeout=30)
    r = post(server, "session_heartbeat", {"session_id": session_id, "type": "session_heartbeat"})
    assert r.status_code == 410


def test_healthz(server) -> None:
    for path in ("/api/v1/healthz", "/healthz"):
        r = httpx.get(f"{server.url}{path}", headers=HEADERS)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert isinstance(r.json()["queue_depth"], int)


def test_server_capabilities(server) -> None:
    r = httpx.get(f"{server.url}/api/v1/get_server_capabilities", headers=HEADERS)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    models = r.json()["supported_models"]
    assert all(m["trainable"] and m["sampleable"] for m in models)  # fields older SDKs drop
    caps = server_capabilities(server.url, "tml-test")
    assert [m.model_name for m in caps.supported_models] == [m["model_name"] for m in models]
    assert "tinkerd/tiny" in [m.model_name for m in caps.supported_models]


def test_every_model_said_sampleable_samples(server, service_client) -> None:
    for model in server_capabilities(server.url, "tml-test").supported_models:
        sampler = ready(service_client.create_sampling_client(base_model=model.model_name))
        params = types.SamplingParams(max_tokens=2, seed=0)
        prompt = types.ModelInput.from_ints(TOKENS)
        result = sampler.sample(prompt, num_samples=1, sampling_params=params).result(timeout=60)
        assert len(result.sequences[0].tokens) >= 1, model.model_name


@pytest.mark.parametrize("path", ["/loss_functions", "/api/v1/loss_functions"])
def test_loss_functions(server, path) -> None:
    r = httpx.get(f"{server.url}{path}")
    assert r.status_code == 200
    losses = {entry["name"]: entry for entry in r.json()["loss_functions"]}
    assert set(losses) == {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro"}
    for entry in losses.values():
        assert len(entry["description"]) > 20
        assert "target_tokens" in entry["loss_fn_inputs"]
    assert losses["cross_entropy"]["loss_fn_inputs"] == ["target_tokens", "weights"]
    assert losses["cross_entropy"]["loss_fn_input_defaults"] == {"weights": 1.0}
    assert losses["ppo"]["loss_fn_input_defaults"] == {}
    for entry in losses.values():
        assert entry["loss_fn_outputs"] == ["logprobs", "elementwise_loss"]
    assert "advantages" in losses["ppo"]["loss_fn_inputs"]
    assert losses["ppo"]["loss_fn_config"] == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.2,
    }
    assert set(losses["dro"]["loss_fn_config"]) == {"beta"}


# -- models ----------------------------------------------------------------------------------


def test_create_model_and_get_info(server, service_client, training_client, tiny_model_dir) -> None:
    session_id = service_client.holder.get_session_id()
    assert training_client.model_id == f"{session_id}:train:0"
    info = training_client.get_info()
    assert info.model_id == training_client.model_id
    assert info.model_data.model_name == str(tiny_model_dir)
    tokenizer_id = info.model_data.tokenizer_id
    assert Path(tokenizer_id).is_absolute() and Path(tokenizer_id) == tiny_model_dir.resolve()
    assert info.lora_rank == 8 and info.is_lora
    # the SDK loads the tokenizer from that directory: no hub, no network
    tokenizer = training_client.get_tokenizer()
    ids = tokenizer.encode("the cat sees a dog", add_special_tokens=False)
    assert ids and tokenizer.decode(ids) == "the cat sees a dog"
    # the session's next model gets the next model_seq_id
    second = ready(
        service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4)
    )
    assert second.model_id == f"{session_id}:train:1"
    assert second.get_info().lora_rank == 4
    # get_info over raw HTTP answers directly (no future)
    r = post(server, "get_info", {"model_id": second.model_id, "type": "get_info"})
    assert r.status_code == 200 and r.json()["model_data"]["tokenizer_id"] == tokenizer_id


def test_get_info_of_unknown_model(server) -> None:
    r = post(server, "get_info", {"model_id": "nope:train:0", "type": "get_info"})
    assert r.status_code == 404
    assert r.json()["category"] == "user" and "nope:train:0" in r.json()["error"]


def test_retried_create_model_returns_the_same_future(server, base_model) -> None:
    session_id = new_session(server)
    body = {
        "session_id": session_id,
        "model_seq_id": 0,
        "base_model": base_model,
        "lora_config": {"rank": 8, "seed": 1},
        "type": "create_model",
    }
    first, again = post(server, "create_model", body), post(server, "create_model", body)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert json_result(server, first.json()["request_id"])["model_id"] == first.json()["model_id"]


# -- training through the SDK ----------------------------------------------------------------


@pytest.mark.in_process
def test_forward_backward_forward_and_optim_step(server, training_client) -> None:
    data = [ce_datum(), ce_datum([3, 4, 5, 6], [0.0, 1.0, 0.5])]
    before = server.backend.adapter_state(training_client.model_id)
    fwd = training_client.forward(data, "cross_entropy").result(timeout=60)
    fb = training_client.forward_backward(data, "cross_entropy").result(timeout=60)
    assert [len(x) for x in logprobs(fb)] == [len(TOKENS) - 1, 3]
    assert fb.loss_fn_outputs[0]["logprobs"].dtype == "float32"
    for a, b in zip(logprobs(fwd), logprobs(fb), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all((x < 0).all() for x in logprobs(fb))
    # cross_entropy is a sum: -sum(logprob * weight)
    weights = [np.ones(len(TOKENS) - 1), np.array([0.0, 1.0, 0.5])]
    expected = -sum(float((lp * w).sum()) for lp, w in zip(logprobs(fb), weights, strict=True))
    assert fb.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    assert fwd.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    # beside logprobs, each target's loss: -logprob * weight, shaped like target_tokens
    for out, lp, w in zip(fb.loss_fn_outputs, logprobs(fb), weights, strict=True):
        assert out["elementwise_loss"].shape == [len(w)]
        np.testing.assert_allclose(out["elementwise_loss"].to_numpy(), -lp * w, rtol=1e-6)
    # neither forward nor forward_backward moves the weights; optim_step does
    assert weights_equal(before, server.backend.adapter_state(training_client.model_id))
    step = training_client.optim_step(types.AdamParams(learning_rate=0.05)).result(timeout=60)
    assert step.metrics["grad_norm:mean"] > 0
    assert not weights_equal(before, server.backend.adapter_state(training_client.model_id))
    after = training_client.forward(data, "cross_entropy").result(timeout=60)
    assert after.metrics["loss:sum"] < fwd.metrics["loss:sum"]  # one step on this data helps


@pytest.mark.in_process
def test_sdk_batch_split_into_chunks(server, training_client, monkeypatch) -> None:
    """A batch the SDK splits (chunk 1 sent last) comes back concatenated in datum order."""
    arrivals: list[int] = []
    submit = server.scheduler.submit

    def recording_submit(model_id, seq_id, payload, fingerprint, **scheduling):
        if model_id == training_client.model_id:
            arrivals.append(seq_id)
        return submit(model_id, seq_id, payload, fingerprint, **scheduling)

    monkeypatch.setattr(server.scheduler, "submit", recording_submit)
    holder = training_client.holder
    # what a server answering fwdbwd_max_chunk_len=2 in client/config would make the SDK do
    config = holder._client_config.model_copy(update={"fwdbwd_max_chunk_len": 2})
    monkeypatch.setattr(holder, "_client_config", config)
    rng = np.random.default_rng(0)
    data = [ce_datum(rng.integers(4, 900, size=n).tolist()) for n in (5, 9, 3, 7, 4)]
    fb = training_client.forward_backward(data, "cross_entropy").result(timeout=60)
    assert sorted(arrivals) == [1, 2, 3] and arrivals[-1] == 1  # three chunks, the first last
    assert [len(x) for x in logprobs(fb)] == [4, 8, 2, 6, 3]
    singles = [
        logprobs(training_client.forward([d], "cross_entropy").result(timeout=60))[0] for d in data
    ]
    for got, want in zip(logprobs(fb), singles, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert fb.metrics["loss:sum"] == pytest.approx(-sum(float(s.sum()) for s in singles), rel=1e-4)


# -- futures ---------------------------------------------------------------------------------


@pytest.mark.in_process
def test_retrieve_future_answers(server, base_model, monkeypatch) -> None:
    monkeypatch.setattr(server.settings, "long_poll_seconds", 0.5)
    model_id = create_model(server, new_session(server), base_model=base_model)
    # seq 2 cannot run before seq 1: after the long poll the answer is try_again
    optim_id = submit_optim(server, optim_body(model_id, 2))
    start = time.monotonic()
    r = post(server, "retrieve_future", {"request_id": optim_id, "allow_metadata_only": True})
    assert time.monotonic() - start >= 0.4  # held for the long poll, not answered at once
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["type"] == "try_again" and r.json()["request_id"] == optim_id
    assert r.json()["queue_state"] == "active"
    # fwd/bwd results are protobuf; optim_step results are JSON
    fb_id = submit_fwdbwd(server, fwdbwd_body(model_id, 1, [ce_datum()]))
    r = retrieve(server, fb_id)
    assert r.status_code == 200 and r.headers["content-type"] == PROTO
    out = deserialize_forward_backward_output(r.content)
    assert len(out.loss_fn_outputs) == 1 and "loss:sum" in out.metrics
    r = retrieve(server, optim_id)
    assert r.headers["content-type"] == "application/json"
    assert types.OptimStepResponse.model_validate(r.json()).metrics["grad_norm:mean"] > 0
    # a settled future can be read again
    assert retrieve(server, optim_id).json() == r.json()


def test_retrieve_unknown_future(server) -> None:
    r = post(server, "retrieve_future", {"request_id": "nope", "allow_metadata_only": False})
    assert r.status_code == 404
    assert r.json()["category"] == "user" and "nope" in r.json()["error"]


def test_json_forward_backward_body(server, base_model) -> None:
    model_id = create_model(server, new_session(server), base_model=base_model)
    body = {
        "model_id": model_id,
        "seq_id": 1,
        "forward_only": True,
        "forward_backward_input": {
            "loss_fn": "cross_entropy",
            "data": [
                {
                    "model_input": {"chunks": [{"type": "encoded_text", "tokens": TOKENS[:-1]}]},
                    "loss_fn_inputs": {
                        "target_tokens": TOKENS[1:],
                        "weights": [1.0] * (len(TOKENS) - 1),
                    },
                }
            ],
        },
    }
    r = post(server, "forward_backward", body)
    assert r.status_code == 200, r.text
    with_weights = fwdbwd_result(server, r.json()["request_id"])
    from_json = logprobs(with_weights)
    proto_id = submit_fwdbwd(server, fwdbwd_body(model_id, 2, [ce_datum()], forward_only=True))
    np.testing.assert_allclose(from_json[0], logprobs(fwdbwd_result(server, proto_id))[0])
    # cross_entropy without weights (as other servers take it): 1.0 on every target
    del body["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"]
    body["seq_id"] = 3
    r = post(server, "forward_backward", body)
    assert r.status_code == 200, r.text
    without = fwdbwd_result(server, r.json()["request_id"])
    assert without.metrics == with_weights.metrics
    np.testing.assert_array_equal(
        without.loss_fn_outputs[0]["elementwise_loss"].to_numpy(),
        with_weights.loss_fn_outputs[0]["elementwise_loss"].to_numpy(),
    )


# -- ordering and retries --------------------------------------------------------------------


def test_requests_run_in_seq_order_not_arrival_order(server, base_model) -> None:
    """seq 3 (forward), then 2 (optim_step), then 1 (forward_backward) arrive in that order."""
    session_id = new_session(server)
    model_id = create_model(server, session_id, 0, base_model=base_model)
    twin_id = create_model(server, session_id, 1, base_model=base_model)
    data = [ce_datum()]
    forward_id = submit_fwdbwd(server, fwdbwd_body(model_id, 3, data, forward_only=True))
    optim_id = submit_optim(server, optim_body(model_id, 2))
    fb_id = submit_fwdbwd(server, fwdbwd_body(model_id, 1, data))
    fb, step, fwd = (
        fwdbwd_result(server, fb_id),
        json_result(server, optim_id),
        fwdbwd_result(server, forward_id),
    )
    pristine = fwdbwd_result(
        server, submit_fwdbwd(server, fwdbwd_body(twin_id, 1, data, forward_only=True))
    )
    # seq 1 saw the initial weights, the step used its gradients, seq 3 saw the stepped weights
    np.testing.assert_allclose(logprobs(fb)[0], logprobs(pristine)[0], rtol=1e-5, atol=1e-6)
    assert step["metrics"]["grad_norm:mean"] > 0
    assert np.abs(logprobs(fwd)[0] - logprobs(fb)[0]).max() > 1e-3
    assert fwd.metrics["loss:sum"] < fb.metrics["loss:sum"]


@pytest.mark.in_process
def test_retried_requests_run_once(server, base_model) -> None:
    """The same (model_id, seq_id) body sent twice gets one request id and one effect."""
    session_id = new_session(server)
    model_id = create_model(server, session_id, 0, base_model=base_model)
    twin_id = create_model(server, session_id, 1, base_model=base_model)
    data = [ce_datum()]

    fb_body = fwdbwd_body(model_id, 1, data)
    fb_ids = {submit_fwdbwd(server, fb_body), submit_fwdbwd(server, fb_body)}
    opt_ids = {
        submit_optim(server, optim_body(model_id, 2)),
        submit_optim(server, optim_body(model_id, 2)),
    }
    assert len(fb_ids) == 1 and len(opt_ids) == 1
    (fb_id,), (opt_id,) = fb_ids, opt_ids
    first_bytes = retrieve(server, fb_id).content
    step = json_result(server, opt_id)
    # a retry that arrives after the request ran maps to the same, finished request
    assert submit_fwdbwd(server, fb_body) == fb_id
    assert submit_optim(server, optim_body(model_id, 2)) == opt_id
    assert retrieve(server, fb_id).content == first_bytes

    submit_fwdbwd(server, fwdbwd_body(twin_id, 1, data))
    twin_step = json_result(server, submit_optim(server, optim_body(twin_id, 2)))

    # a doubled fwd/bwd would double the gradient norm; a doubled step would move the weights on
    assert step["metrics"]["grad_norm:mean"] == pytest.approx(
        twin_step["metrics"]["grad_norm:mean"], rel=1e-5
    )
    assert weights_equal(
        server.backend.adapter_state(model_id), server.backend.adapter_state(twin_id)
    )
    after, twin_after = (
        fwdbwd_result(server, submit_fwdbwd(server, fwdbwd_body(m, 3, data, forward_only=True)))
        for m in (model_id, twin_id)
    )
    np.testing.assert_allclose(logprobs(after)[0], logprobs(twin_after)[0], rtol=1e-6)


def test_reused_seq_id_with_different_content_is_refused(server, base_model) -> None:
    model_id = create_model(server, new_session(server), base_model=base_model)
    fb_id = submit_fwdbwd(server, fwdbwd_body(model_id, 1, [ce_datum()]))
    r = httpx.post(
        f"{server.url}/api/v1/forward_backward",
        content=fwdbwd_body(model_id, 1, [ce_datum([1, 2, 3])]),
        headers={**HEADERS, "Content-Type": PROTO},
    )
    assert r.status_code == 400 and r.json()["category"] == "user"
    assert "seq_id 1" in r.json()["error"]
    assert len(fwdbwd_result(server, fb_id).loss_fn_outputs[0]["logprobs"].data) == len(TOKENS) - 1


# -- refused numbered requests ---------------------------------------------------------------
# The server's gap skip (`seq_gap_seconds`, 30 s here) would unstall the model too: these expect
# the refusal itself to take the seq_id, well before that.


def settles_soon(server, request_id: str, seconds: float = 15.0) -> httpx.Response:
    """retrieve_future's answer, which must come within `seconds`."""
    started = time.monotonic()
    r = retrieve(server, request_id)
    assert time.monotonic() - started < seconds, "the model waited for a refused seq_id"
    return r


def test_a_refused_sdk_call_does_not_stall_the_model(server, training_client) -> None:
    """An optim_step with beta1 past 1 is numbered by the SDK but refused here: its 400 takes its
    seq_id, so the model's next request (save_state) runs."""
    with pytest.raises(tinker.BadRequestError, match="beta1"):
        training_client.optim_step(types.AdamParams(beta1=1.5)).result(timeout=30)
    saved = training_client.save_state("after-refused").result(timeout=15)
    assert saved.path.endswith("/weights/after-refused")


def test_an_unserved_route_takes_the_seq_id_it_names(server, base_model) -> None:
    model_id = create_model(server, new_session(server), base_model=base_model)
    r = post(server, "no_such_operation", {"model_id": model_id, "seq_id": 1, "x": 1})
    assert r.status_code == 404 and r.json()["category"] == "user"
    assert "does not serve POST /api/v1/no_such_operation" in r.json()["error"]
    assert f"seq_id 1 of {model_id} is taken" in r.json()["error"]
    assert settles_soon(server, submit_optim(server, optim_body(model_id, 2))).status_code == 200
    # a body without a numbered model's request takes nothing, and is told the usual 404
    for body in ({"model_id": model_id}, {"seq_id": 3}, {"model_id": "nope:train:0", "seq_id": 3}):
        r = post(server, "no_such_operation", body)
        assert r.status_code == 404 and "taken" not in r.json()["error"], r.text
    json_result(server, submit_optim(server, optim_body(model_id, 3)))


def test_a_bad_unnamed_save_for_sampler_takes_its_seq_id(server, base_model) -> None:
    model_id = create_model(server, new_session(server), base_model=base_model)
    body = {"model_id": model_id, "seq_id": 1, "sampling_session_seq_id": "first"}
    r = post(server, "save_weights_for_sampler", body)
    assert r.status_code == 400 and "sampling_session_seq_id" in r.json()["error"]
    assert settles_soon(server, submit_optim(server, optim_body(model_id, 2))).status_code == 200


# -- zstd bodies and what tinkerd refuses by name ----------------------------------------------


def zstd_post(server, body: bytes, encoding: str = "zstd") -> httpx.Response:
    headers = {**HEADERS, "Content-Type": PROTO, "Content-Encoding": encoding}
    return httpx.post(
        f"{server.url}/api/v1/forward_backward", content=body, headers=headers, timeout=60
    )


@pytest.mark.in_process
def test_zstd_bodies_and_their_limit(server, base_model, monkeypatch) -> None:
    """The SDK compresses forward_backward bodies (client/config says so); the size limit holds
    for the decompressed body, so a bomb is a 413 and changes nothing."""
    import zstandard

    model_id = create_model(server, new_session(server), base_model=base_model)
    body = fwdbwd_body(model_id, 1, [ce_datum()], forward_only=True)
    compressed = zstandard.ZstdCompressor().compress(body)
    r = zstd_post(server, compressed)
    assert r.status_code == 200, r.text
    plain = fwdbwd_result(server, submit_fwdbwd(server, fwdbwd_body(model_id, 2, [ce_datum()])))
    assert logprobs(fwdbwd_result(server, r.json()["request_id"]))[0].tolist() == pytest.approx(
        logprobs(plain)[0].tolist()
    )  # the same request as the plain one after it, on the same weights

    monkeypatch.setattr(server.settings, "max_request_bytes", 4 << 20)
    writer = zstandard.ZstdCompressor(level=1).compressobj()
    bomb = writer.compress(body) + b"".join(writer.compress(bytes(1 << 20)) for _ in range(64))
    bomb += writer.flush()
    r = zstd_post(server, bomb)
    assert r.status_code == 413 and r.json()["category"] == "user", r.text
    assert "expands past 4194304 bytes" in r.json()["error"]
    r = zstd_post(server, b"\x28\xb5\x2f\xfd garbage")
    assert r.status_code == 400 and "not valid zstd" in r.json()["error"]
    r = zstd_post(server, body, encoding="br")
    assert r.status_code == 415 and "Content-Encoding 'br'" in r.json()["error"]


def test_dimuon_is_refused_naming_adamw(server, service_client, training_client) -> None:
    dimuon, params = needs(types, "DimuonOptimizerConfig"), needs(types, "DimuonParams")
    with pytest.raises(tinker.BadRequestError, match="Dimuon optimizer .*AdamW"):
        ready(
            service_client.create_lora_training_client(
                base_model="tinkerd/tiny", rank=4, optimizer=dimuon()
            )
        )
    with pytest.raises(tinker.BadRequestError, match="DimuonParams .*AdamParams"):
        training_client.optim_step(params(learning_rate=1e-3)).result(timeout=30)
    fb = training_client.forward([ce_datum()], "cross_entropy").result(timeout=30)  # not stalled
    assert fb.metrics["loss:sum"] > 0


def test_image_inputs_are_refused_by_name(server, service_client, training_client) -> None:
    image = types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=2)
    datum = types.Datum(
        model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[5, 17]), image]),
        loss_fn_inputs={"target_tokens": [17, 42, 99, 7], "weights": [1.0] * 4},
    )
    with pytest.raises(tinker.BadRequestError, match="ImageChunk .*not supported"):
        training_client.forward_backward([datum], "cross_entropy").result(timeout=30)
    sampler = ready(training_client.save_weights_and_get_sampling_client())
    pointer = types.ImageAssetPointerChunk(format="png", location="/x.png", expected_tokens=2)
    prompt = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[5, 17]), pointer])
    with pytest.raises(Exception, match="ImageAssetPointerChunk .*not supported"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result(timeout=30)


def test_the_whole_sdk_flow(server, service_client, tiny_model_dir) -> None:
    """Train, save, resume, sample, list, publish and delete through the SDK alone: what a user
    of any SDK version does (tests/test_old_sdks.py runs it with 0.25 and 0.31 too)."""
    tc = ready(
        service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=1)
    )
    fb = tc.forward_backward([ce_datum()], "cross_entropy")
    step = tc.optim_step(types.AdamParams(learning_rate=0.05))
    first = fb.result(timeout=60).metrics["loss:sum"]
    assert step.result(timeout=60).metrics["grad_norm:mean"] > 0
    state = tc.save_state("flow").result(timeout=60).path
    resumed = ready(service_client.create_training_client_from_state_with_optimizer(state))
    now, again = (
        c.forward([ce_datum()], "cross_entropy").result(timeout=60) for c in (tc, resumed)
    )
    assert now.metrics["loss:sum"] == pytest.approx(again.metrics["loss:sum"], rel=1e-5)
    assert now.metrics["loss:sum"] < first

    sampler_path = tc.save_weights_for_sampler("flow").result(timeout=60).path
    sampler = ready(service_client.create_sampling_client(model_path=sampler_path))
    params = types.SamplingParams(max_tokens=4, seed=3, temperature=0.7)
    out = sampler.sample(types.ModelInput.from_ints(TOKENS), 2, params).result(timeout=60)
    assert len(out.sequences) == 2 and all(1 <= len(s.tokens) <= 4 for s in out.sequences)
    logprobs_ = sampler.compute_logprobs(types.ModelInput.from_ints(TOKENS)).result(timeout=60)
    assert logprobs_[0] is None and len(logprobs_) == len(TOKENS)

    rest = service_client.create_rest_client()
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert {state, sampler_path} <= set(listed)
    assert rest.get_training_run(tc.model_id).result().base_model == str(tiny_model_dir)
    rest.publish_checkpoint_from_tinker_path(state).result()
    assert {
        c.tinker_path: c.public for c in rest.list_checkpoints(tc.model_id).result().checkpoints
    }[state]
    rest.unpublish_checkpoint_from_tinker_path(state).result()
    rest.delete_checkpoint_from_tinker_path(sampler_path).result()
    left = {c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert state in left and sampler_path not in left


def test_save_weights_external_through_the_sdk(training_client) -> None:
    save = needs(training_client, "save_weights_external")
    path = save("external").result(timeout=60).path
    assert path == f"tinker://{training_client.model_id}/external_weights/external"


def test_the_older_sdks_archive_url(service_client, training_client) -> None:
    """SDK 0.31's get_checkpoint_archive_url (GET .../archive, gone in 0.38): a URL to a tar of
    the adapter, which a plain GET downloads."""
    rest = service_client.create_rest_client()
    archive_url = needs(rest, "get_checkpoint_archive_url_from_tinker_path")
    path = training_client.save_state("archived").result(timeout=60).path
    answer = archive_url(path).result(timeout=60)
    tar = httpx.get(answer.url, timeout=30)
    assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
    assert b"adapter_model.safetensors" in tar.content and b"checkpoint_complete" in tar.content


def test_the_older_sdks_unload_model(server, training_client) -> None:
    """SDK 0.25's models.unload (POST unload_model, gone from later SDKs): the model is freed
    after its queued work; its checkpoints stay."""
    import asyncio

    from tinker._client import AsyncTinker

    path = training_client.save_state("before-unload").result(timeout=60).path
    client = AsyncTinker(api_key="tml-test", base_url=server.url)
    unload = needs(client.models, "unload")
    request = types.UnloadModelRequest(model_id=training_client.model_id)
    future = asyncio.run(unload(request=request))
    assert json_result(server, future.request_id)["model_id"] == training_client.model_id
    r = post(server, "get_info", {"model_id": training_client.model_id})
    assert r.status_code == 404
    r = post(server, "weights_info", {"tinker_path": path})
    assert r.status_code == 200
