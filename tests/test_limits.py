"""Request limits: a body over max_request_bytes answers 413 with a JSON body on every route
(before waitress or Flask reads it), and a request over the datum or token limits answers a clear
4xx with nothing trained; the same model keeps training afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import tinker
from test_bad_input import HEADERS, PROTO, datum, fwdbwd_proto, raw_turn  # noqa: I001 - a sibling
from tinker import types
from tinker.types.client_config_response import ClientConfigResponse

from tinkerd.config import InputLimits, Settings

pytestmark = pytest.mark.timeout(180)

MAX_BYTES = 64 * 1024
LIMITS = InputLimits(max_datums=4, max_sequence_tokens=40, max_request_tokens=100)
WAIT = 60


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from tinkerd.serve import EmbeddedServer

    settings = Settings.load(
        port=0,
        data_dir=tmp_path_factory.mktemp("limits"),
        device="cpu",
        long_poll_seconds=5.0,
        max_request_bytes=MAX_BYTES,
        max_datums_per_request=LIMITS.max_datums,
        max_sequence_tokens=LIMITS.max_sequence_tokens,
        max_tokens_per_request=LIMITS.max_request_tokens,
    )
    srv = EmbeddedServer(settings).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small_client(small_server, tiny_model_dir) -> Iterator:
    service = tinker.ServiceClient(base_url=small_server.url, api_key="tml-test")
    tc = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0)
    yield tc.result()
    service.close("success").result()


def assert_json_error(r: httpx.Response, status: int, *fragments: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    error = body["error"]
    if isinstance(error, dict):  # the OpenAI routes' shape
        assert error["type"] == "invalid_request_error"
        error = error["message"]
    else:
        assert body["category"] == "user"
    for fragment in fragments:
        assert fragment in error, error
    return error


ROUTES = [
    "/api/v1/create_session",
    "/api/v1/client/config",  # reads no body at all
    "/api/v1/forward_backward",
    "/api/v1/optim_step",
    "/api/v1/asample",
    "/api/v1/retrieve_future",
    "/api/v1/telemetry",
    "/fwdbwd",
    "/sample",
    "/add_lora",
    "/v1/completions",
    "/v1/chat/completions",
]


@pytest.mark.parametrize("path", ROUTES)
def test_body_over_the_limit_answers_413_json(small_server, path: str) -> None:
    big = b"x" * (MAX_BYTES + 1)
    r = httpx.post(small_server.url + path, content=big, headers=HEADERS, timeout=WAIT)
    assert_json_error(r, 413)


@pytest.mark.parametrize("path", ["/api/v1/forward_backward", "/fwdbwd", "/v1/completions"])
def test_chunked_body_over_the_limit_answers_413_json(small_server, path: str) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        for _ in range(4):
            yield b"y" * (MAX_BYTES // 2)

    r = httpx.post(small_server.url + path, content=chunks(), headers=HEADERS, timeout=WAIT)
    assert "content-length" not in r.request.headers
    assert_json_error(r, 413)


def test_body_at_the_limit_is_read(small_server) -> None:
    """Exactly max_request_bytes passes both waitress and Flask (and is then bad JSON)."""
    body = b"{" + b" " * (MAX_BYTES - 1)
    r = httpx.post(
        small_server.url + "/api/v1/create_session",
        content=body,
        headers={**HEADERS, "Content-Type": "application/json"},
        timeout=WAIT,
    )
    assert_json_error(r, 400, "JSON object")


def test_default_limits_take_every_sdk_request() -> None:
    """The SDK splits a batch at fwdbwd_max_chunk_len datums / ~5 MB (4 bytes a token, plus
    8-byte target tokens): the defaults refuse none of its chunks."""
    sdk, settings = ClientConfigResponse(), Settings()
    assert settings.max_datums_per_request >= sdk.fwdbwd_max_chunk_len
    assert settings.max_tokens_per_request >= sdk.fwdbwd_max_chunk_bytes_count // 12
    assert settings.max_tokens_per_request >= settings.max_sequence_tokens
    # a chunk of one longest datum: tokens, target tokens and weights
    assert settings.max_request_bytes > 20 * settings.max_sequence_tokens + 1024
    assert settings.max_request_bytes > 2 * sdk.fwdbwd_max_chunk_bytes_count


def fb_json(model_id: str, seq_id: int, data: list[types.Datum]) -> dict:
    datums = [
        {
            "model_input": {
                "chunks": [{"type": "encoded_text", "tokens": d.model_input.to_ints()}]
            },
            "loss_fn_inputs": {k: v.tolist() for k, v in d.loss_fn_inputs.items()},
        }
        for d in data
    ]
    return {
        "model_id": model_id,
        "seq_id": seq_id,
        "forward_backward_input": {"data": datums, "loss_fn": "cross_entropy"},
    }


def tokens(n: int) -> list[int]:
    return [(7 * i) % 800 + 3 for i in range(n)]


OVER = [
    ([datum()] * (LIMITS.max_datums + 1), ["5 datums", "at most 4"]),
    ([datum(tokens(LIMITS.max_sequence_tokens + 2))], ["datum 0", "41 tokens", "at most 40"]),
    ([datum(tokens(31))] * 4, ["120 tokens in one request", "at most 100"]),
]
OVER_IDS = ["datums", "sequence", "request-tokens"]


@pytest.mark.parametrize("encoding", ["proto", "json"])
@pytest.mark.parametrize(("data", "fragments"), OVER, ids=OVER_IDS)
def test_sdk_forward_backward_over_limits(
    small_server, small_client, encoding: str, data, fragments
) -> None:
    with raw_turn(small_client) as seq_id:
        if encoding == "proto":
            r = httpx.post(
                f"{small_server.url}/api/v1/forward_backward",
                content=fwdbwd_proto(small_client.model_id, seq_id, data),
                headers={**HEADERS, "Content-Type": PROTO},
                timeout=WAIT,
            )
        else:
            r = httpx.post(
                f"{small_server.url}/api/v1/forward_backward",
                json=fb_json(small_client.model_id, seq_id, data),
                headers=HEADERS,
                timeout=WAIT,
            )
    assert_json_error(r, 413, *fragments)
    before = small_server.backend.adapter_state(small_client.model_id)
    # the model's queue is not stuck behind the refused seq_id, and nothing was trained
    fb = small_client.forward_backward([datum()], "cross_entropy").result(timeout=WAIT)
    assert fb.metrics["loss:sum"] > 0
    step = small_client.optim_step(types.AdamParams(learning_rate=0.01)).result(timeout=WAIT)
    assert step.metrics["grad_norm:mean"] > 0
    after = small_server.backend.adapter_state(small_client.model_id)
    assert any(bool((after[k] != before[k]).any()) for k in after)


def test_sdk_batch_within_limits_is_chunked_by_the_client(small_server, small_client) -> None:
    """At the limits exactly: taken."""
    data = [datum(tokens(LIMITS.max_request_tokens // LIMITS.max_datums))] * LIMITS.max_datums
    fb = small_client.forward_backward(data, "cross_entropy").result(timeout=WAIT)
    assert len(fb.loss_fn_outputs) == LIMITS.max_datums


def test_asample_prompt_over_the_limit(small_server) -> None:
    body = {
        "base_model": "tinkerd/tiny",
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens(41)}]},
        "sampling_params": {"max_tokens": 2},
        "num_samples": 1,
    }
    r = httpx.post(f"{small_server.url}/api/v1/asample", json=body, headers=HEADERS, timeout=WAIT)
    assert_json_error(r, 413, "prompt has 41 tokens", "at most 40")


@pytest.mark.parametrize(
    ("path", "body", "fragments"),
    [
        ("/fwdbwd", {"model_id": "lim", "data": [[5, 6, 7]] * 5}, ["5 datums"]),
        ("/fwdbwd", {"model_id": "lim", "data": [tokens(41)]}, ["data[0] has 41 tokens"]),
        ("/fwdbwd", {"model_id": "lim", "data": [tokens(30)] * 4}, ["116 tokens in one"]),
        ("/sample", {"prompt": tokens(41), "max_tokens": 2}, ["the prompt has 41 tokens"]),
        ("/v1/completions", {"model": "tinkerd/tiny", "prompt": tokens(41)}, ["41 tokens"]),
    ],
    ids=["simple-datums", "simple-sequence", "simple-request-tokens", "simple-sample", "openai"],
)
def test_simple_and_openai_over_limits(small_server, path: str, body: dict, fragments) -> None:
    r = httpx.post(small_server.url + path, json=body, timeout=WAIT)
    assert_json_error(r, 413, *fragments)
    adapters = httpx.get(small_server.url + "/adapters", timeout=WAIT).json()["adapters"]
    assert "lim" not in [a["model_id"] for a in adapters]  # refused before anything was made


def test_error_answer_is_json_for_waitress_refusals(small_server) -> None:
    """A request waitress itself refuses (bad chunked encoding) still answers JSON."""
    import socket

    host, port = small_server.settings.host, small_server.port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n0\r\n\r\n"
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"application/json" in head
    assert json.loads(body)["category"] == "user"
