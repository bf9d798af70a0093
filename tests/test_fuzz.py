"""Fuzzing with hypothesis against the live in-process server: random and malformed JSON bodies
on every POST route (the SDK's under /api/v1, the simple API at the root, OpenAI's under /v1),
random protobuf bytes and mutated or randomly built ForwardBackwardRequests on
/api/v1/forward_backward. Never a 5xx, every refusal a JSON body, and afterwards the worker
still trains.

Bounded: a few dozen examples a route (`FUZZ_EXAMPLES` raises it), no deadline, no example
database, derandomized so that a run here is the run in CI.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import datum, fwdbwd_proto  # noqa: I001 - a sibling test module
from tinker import types

from tinkerd.wire import pb

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HEADERS = {"X-API-Key": "tml-test"}
OK_NON_JSON = ("text/event-stream", "application/x-protobuf")  # a stream, an SDK result


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def target(http, tiny_model_dir) -> dict[str, str]:
    """A session and a model made by raw requests, for the fuzz to aim at (not the SDK client
    the final check trains with, whose seq_ids the fuzz must not take)."""
    session_id = http.post("/api/v1/create_session", json={}).json()["session_id"]
    created = http.post(
        "/api/v1/create_model",
        json={
            "session_id": session_id,
            "model_seq_id": 0,
            "base_model": str(tiny_model_dir),
            "lora_config": {"rank": 4},
        },
    ).json()
    return {"session_id": session_id, "model_id": created["model_id"]}


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:500])
    kind = r.headers.get("content-type", "")
    if r.status_code >= 300 or not kind.startswith(OK_NON_JSON):
        assert kind.startswith("application/json"), (r.request.url, r.status_code, kind, r.text)
        r.json()


def post_routes(server) -> list[str]:
    """Every POST route the app has, path variables filled in later."""
    rules = [r.rule for r in server.app.url_map.iter_rules() if "POST" in (r.methods or ())]
    return sorted(rules)


# -- JSON bodies -----------------------------------------------------------------------------

KEYS = [
    "model_id", "seq_id", "session_id", "request_id", "model_seq_id", "base_model",
    "lora_config", "forward_backward_input", "data", "loss_fn", "loss_fn_config",
    "loss_fn_inputs", "forward_only", "adam_params", "learning_rate", "prompt", "messages",
    "sampling_params", "num_samples", "max_tokens", "temperature", "top_p", "top_k", "stop",
    "seed", "n", "stream", "logprobs", "model", "path", "name", "rank", "sampling_session_id",
    "model_path", "prompt_logprobs", "topk_prompt_logprobs", "chunks", "tokens", "type",
    "role", "content", "dtype", "shape", "target_tokens", "weights", "ttl_seconds",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["tinkerd/tiny", "cross_entropy", "importance_sampling", "ppo", "user", "assistant",
         "encoded_text", "float32", "int64", "adamw", "x" * 300, "../../etc/passwd"]
    ),
)  # fmt: skip


def json_values(ids: list[str]) -> st.SearchStrategy[Any]:
    leaves = st.one_of(scalars, st.sampled_from(ids))
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=6),
            st.dictionaries(
                st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=6
            ),
        ),
        max_leaves=30,
    )


def json_bodies(ids: list[str]) -> st.SearchStrategy[bytes]:
    import json

    values = json_values(ids)
    objects = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)
    encoded = st.one_of(objects, values).map(lambda v: json.dumps(v).encode())
    broken = st.one_of(
        st.binary(max_size=200),
        encoded.map(lambda b: b[: len(b) // 2]),  # truncated JSON
        st.just(b'{"model_id": "\\ud800"}'),  # a lone surrogate
        st.just(b"[" * 5000 + b"]" * 5000),  # deep nesting
    )
    return st.one_of(encoded, encoded, broken)


def fill(rule: str, data: st.DataObject, ids: list[str]) -> str:
    """The rule's path with each <variable> a known id or random text."""
    import re
    from urllib.parse import quote

    def value(_: re.Match) -> str:
        text = data.draw(st.one_of(st.sampled_from(ids), st.text(min_size=1, max_size=12)))
        return quote(text, safe="")

    return re.sub(r"<[^>]+>", value, rule)


def test_json_bodies_on_every_post_route(server, http, target) -> None:
    routes = post_routes(server)
    assert {"/api/v1/forward_backward", "/fwdbwd", "/v1/chat/completions"} <= set(routes)
    ids = [target["model_id"], target["session_id"], "simple-fuzz", "tinkerd/tiny"]

    @FUZZ
    @given(data=st.data())
    def fuzz_route(rule: str, data: st.DataObject) -> None:
        path = fill(rule, data, ids)
        body = data.draw(json_bodies(ids))
        kind = data.draw(st.sampled_from(["application/json", "text/plain", ""]))
        r = http.post(path, content=body, headers={"Content-Type": kind} if kind else {})
        check(r)

    for rule in routes:
        fuzz_route(rule)


# -- protobuf --------------------------------------------------------------------------------


def valid_fwdbwd(model_id: str, seq_id: int) -> bytes:
    return fwdbwd_proto(model_id, seq_id, [datum(), datum([9, 8, 7, 6])])


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    out = bytearray(base)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "byte"]))
        i = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and out:
            out[i] = draw(st.integers(0, 255))
        elif op == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and out:
            del out[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del out[i:]
    return bytes(out)


@st.composite
def tensors(draw: st.DrawFn) -> Any:
    t = pb.Tensor(dtype=draw(st.sampled_from([0, 1, 2, 3, 99])))
    t.shape.extend(draw(st.lists(st.integers(-2, 10), max_size=3)))
    if draw(st.booleans()):
        t.dense = draw(st.binary(max_size=64))
    else:
        t.sparse_csr.values = draw(st.binary(max_size=32))
        t.sparse_csr.crow_indices = draw(st.binary(max_size=32))
        t.sparse_csr.col_indices = draw(st.binary(max_size=32))
    return t


@st.composite
def built_fwdbwd(draw: st.DrawFn, model_id: str) -> bytes:
    """A well-formed protobuf with arbitrary content: the decoder's checks, not the parser's."""
    msg = pb.ForwardBackwardRequest(
        model_id=draw(st.sampled_from([model_id, "", "nope:train:0"])),
        seq_id=draw(st.integers(0, 2**63 - 1) | st.integers(1, 50)),
        loss_fn=draw(st.sampled_from(["cross_entropy", "ppo", "importance_sampling", "", "x"])),
        forward_only=draw(st.booleans()),
    )
    for key in draw(st.lists(st.sampled_from(["clip_low_threshold", "beta", "z"]), max_size=2)):
        msg.loss_fn_config[key] = draw(st.floats())
    for _ in range(draw(st.integers(0, 3))):
        d = msg.data.add()
        for _ in range(draw(st.integers(0, 2))):
            d.model_input.add().encoded_text.tokens = draw(st.binary(max_size=40))
        for name in draw(st.lists(st.sampled_from(["target_tokens", "weights", "logprobs"]))):
            d.loss_fn_inputs[name].CopyFrom(draw(tensors()))
    return msg.SerializeToString()


def test_protobuf_bodies_on_forward_backward(server, http, target, training_client) -> None:
    model_id = target["model_id"]
    base = valid_fwdbwd(model_id, 1)
    first = http.post(
        "/api/v1/forward_backward",
        content=base,
        headers={"Content-Type": "application/x-protobuf"},
    )
    check(first)
    bodies = st.one_of(
        st.binary(max_size=400),
        mutated(base),
        mutated(valid_fwdbwd(model_id, 2)),
        built_fwdbwd(model_id),
    )

    @settings(FUZZ, max_examples=EXAMPLES * 8)
    @given(body=bodies)
    def fuzz(body: bytes) -> None:
        r = http.post(
            "/api/v1/forward_backward",
            content=body,
            headers={"Content-Type": "application/x-protobuf"},
        )
        check(r)

    fuzz()
    assert_worker_trains(server, training_client)


def assert_worker_trains(server, training_client) -> None:
    """The worker thread is alive and runs a valid forward_backward and step."""
    assert server.worker._thread is not None and server.worker._thread.is_alive()
    fb = training_client.forward_backward([datum()], "cross_entropy").result(timeout=60)
    assert fb.metrics["loss:sum"] > 0
    step = training_client.optim_step(types.AdamParams(learning_rate=0.01)).result(timeout=60)
    assert step.metrics["grad_norm:mean"] > 0


def test_worker_still_trains_after_the_json_fuzz(server, training_client) -> None:
    assert_worker_trains(server, training_client)
