"""The OpenAPI description tinkerd publishes at /openapi.json: valid OpenAPI 3.1, covering every
route of the app, and fuzzed with schemathesis against a live server over HTTP.

The fuzz runs on a server of its own (its own data directory, and an API key, so every request
goes through authentication), with real ids mixed into the generated requests so that it gets
past the 404s, and costs capped (samples, tokens) so that it stays under a minute and a half.
Never a 5xx; every answer of the status, content type and schema the description declares;
afterwards the worker is alive and trains. `OPENAPI_EXAMPLES` (default 25) sets the examples
an operation; `OPENAPI_PHASES=examples,coverage,fuzzing` adds schemathesis's coverage phase.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import tinker
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.config import HealthCheck
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_bad_input import datum  # noqa: I001 - a sibling test module
from tinker import types

from tinkerd import storage
from tinkerd.api.openapi import describe

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("OPENAPI_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# What one fuzzed request may ask of the tiny model on 2 CPU cores (the description allows
# more: up to 1024 samples, up to the context's tokens).
MAX_SAMPLES = 2
MAX_TOKENS = 8
SAMPLING = ("/api/v1/asample", "/sample", "/generate", "/v1/completions", "/v1/chat/completions")


def openapi_path(rule: str) -> str:
    """A Flask rule in OpenAPI's template syntax: `<path:model>` -> `{model}`."""
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule)


# -- the description -----------------------------------------------------------------------------


def test_the_description_is_valid_openapi() -> None:
    schema = schemathesis.openapi.from_dict(describe())
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    assert all(result.ok() for result in schema.get_all_operations())


def test_every_route_is_described_and_nothing_else(live: Live) -> None:
    routes = set()
    for rule in live.server.app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("console."):
            continue  # Flask's static files; the console's HTML page
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            routes.add((method.lower(), openapi_path(rule.rule)))
    described = {(m, path) for path, item in describe()["paths"].items() for m in item}
    assert routes - described == set(), "routes missing from tinkerd/api/openapi_paths.py"
    assert described - routes == set(), "described operations the app does not have"


def test_the_checkpoint_name_pattern_is_the_one_storage_checks() -> None:
    body = describe()["paths"]["/api/v1/save_weights"]["post"]["requestBody"]
    pattern = body["content"]["application/json"]["schema"]["properties"]["path"]["pattern"]
    assert pattern == storage._NAME.pattern


# -- a live server of its own, with a key ----------------------------------------------------------


@dataclass
class Live:
    url: str
    key: str
    server: Any  # EmbeddedServer
    ids: dict[str, list[Any]]  # field or parameter name -> real values to aim at


def settle(http: httpx.Client, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if body.get("type") != "try_again":
            assert "error" not in body, body
            return body
    raise TimeoutError(request_id)


def seed(http: httpx.Client, base_model: str) -> dict[str, list[Any]]:
    """A session, a trained model with a checkpoint of each kind, a sampling session on one and
    an adapter: the ids the fuzz draws from beside random ones."""
    post = lambda path, body: http.post(path, json=body).raise_for_status().json()  # noqa: E731
    session = post("/api/v1/create_session", {})["session_id"]
    created = post(
        "/api/v1/create_model",
        {"session_id": session, "model_seq_id": 0, "base_model": base_model},
    )
    model = created["model_id"]
    settle(http, created["request_id"])
    paths = []
    for seq_id, route, name in ((1, "save_weights", "fuzz"), (2, "save_weights_for_sampler", "s")):
        saved = post(f"/api/v1/{route}", {"model_id": model, "seq_id": seq_id, "path": name})
        paths.append(settle(http, saved["request_id"])["path"])
    sampler = post(
        "/api/v1/create_sampling_session",
        {"session_id": session, "sampling_session_seq_id": 0, "model_path": paths[1]},
    )["sampling_session_id"]
    post("/add_lora", {"model_id": "fuzz-adapter", "rank": 4})
    return {
        "session_id": [session],
        "model_id": [model, "fuzz-adapter"],
        "run_id": [model],
        "request_id": [created["request_id"]],
        "sampling_session_id": [sampler],
        "sampler_id": [sampler],
        "path": [*paths, "fuzz"],
        "model_path": [paths[1]],
        "tinker_path": paths,
        "base_model": [base_model],
        "model": [base_model, paths[1]],
        "name": ["fuzz-adapter", "fuzz"],
        "kind": ["weights"],
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    from tinkerd.config import Settings
    from tinkerd.keys import FileKeys, create_key
    from tinkerd.serve import EmbeddedServer

    data_dir = tmp_path_factory.mktemp("openapi-data")
    key, _ = create_key(FileKeys(data_dir), "fuzz")
    settings = Settings.load(
        host="127.0.0.1",
        port=0,
        data_dir=data_dir,
        base_model=str(tiny_model_dir),
        device="cpu",
        long_poll_seconds=2.0,
    )
    srv = EmbeddedServer(settings).start()
    try:
        with httpx.Client(base_url=srv.url, headers={"X-API-Key": key}, timeout=60) as http:
            ids = seed(http, str(tiny_model_dir))
        yield Live(srv.url, key, srv, ids)
    finally:
        srv.stop()


def test_the_description_is_public_and_the_rest_is_not(live: Live) -> None:
    r = httpx.get(f"{live.url}/openapi.json")
    assert r.status_code == 200 and r.json() == describe()
    assert httpx.get(f"{live.url}/api/v1/training_runs").status_code == 401


def regressions(ids: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Requests that answered 500 before their fixes: token ids past int64 (an OverflowError),
    an unhashable loss_fn, and user_metadata that is no object (stored, then every listing of
    the runs failed)."""
    huge = 2**70
    chunk = {"type": "encoded_text", "tokens": [1, huge]}
    return [
        (
            "/api/v1/forward_backward",
            {
                "model_id": ids["run_id"][0],
                "seq_id": 100,
                "forward_backward_input": {
                    "data": [{"model_input": {"chunks": [chunk]}}],
                    "loss_fn": "cross_entropy",
                },
            },
        ),
        (
            "/api/v1/asample",
            {"sampling_session_id": ids["sampler_id"][0], "prompt": {"chunks": [chunk]}},
        ),
        ("/fwdbwd", {"model_id": "regress", "data": [[1, huge]]}),
        ("/sample", {"model_id": "regress", "prompt": [1, huge]}),
        ("/fwdbwd", {"model_id": "regress", "data": [[1, 2]], "loss_fn": []}),
        (
            "/api/v1/create_model",
            {
                "session_id": ids["session_id"][0],
                "model_seq_id": 100,
                "base_model": ids["base_model"][0],
                "user_metadata": ["not", "an", "object"],
            },
        ),
    ]


def test_what_the_fuzz_found_is_refused(live: Live) -> None:
    with httpx.Client(base_url=live.url, headers={"X-API-Key": live.key}, timeout=60) as http:
        session = http.post("/api/v1/create_session", json={}).json()["session_id"]
        http.post("/add_lora", json={"model_id": "regress", "rank": 4}).raise_for_status()
        for path, body in regressions({**live.ids, "session_id": [session]}):
            r = http.post(path, json=body)
            assert r.status_code == 400 and r.json()["category"] == "user", (path, r.text)
        assert http.get("/api/v1/training_runs").status_code == 200
        r = http.get("/v1/no-such-route")  # every answer under /v1 in OpenAI's shape
        assert r.status_code == 404 and isinstance(r.json()["error"], dict)


# -- the fuzz ------------------------------------------------------------------------------------


def with_ids(values: Any, ids: dict[str, list[Any]]) -> st.SearchStrategy[Any]:
    """`values` (a body, path or query parameters) with some of the entries named like an id
    replaced by a real one."""
    if not isinstance(values, dict):
        return st.just(values)
    real = {
        k: st.one_of(st.just(v), st.sampled_from(ids[k])) for k, v in values.items() if k in ids
    }
    return st.fixed_dictionaries(real).map(lambda new: {**values, **new})


def capped(body: Any, path: str) -> Any:
    """A sampling request's body with its sample count and token budget capped (a valid one
    stays valid; an absent budget samples up to the context's end)."""
    if not isinstance(body, dict):
        return body
    out = dict(body)
    for key in ("n", "num_samples"):
        if isinstance(out.get(key), int) and out[key] > MAX_SAMPLES:
            out[key] = MAX_SAMPLES
    if path != "/api/v1/asample":
        return capped_tokens(out)
    if out.get("sampling_params") is None or isinstance(out["sampling_params"], dict):
        out["sampling_params"] = capped_tokens(out.get("sampling_params") or {})
    return out


def capped_tokens(params: dict[str, Any]) -> dict[str, Any]:
    key = (
        "max_completion_tokens" if params.get("max_completion_tokens") is not None else "max_tokens"
    )
    value = params.get(key)
    if value is None or (isinstance(value, int) and value > MAX_TOKENS):
        return {**params, key: MAX_TOKENS}
    return params


# The description the server publishes (`/openapi.json` serves describe(), compared above), set
# up at import: schemathesis makes a test of each operation as pytest collects this module.
# (Its lazy `from_fixture` loader, which could read the live server's copy, fails on pytest 9.2.)
schema = schemathesis.openapi.from_dict(describe())
schemathesis.serializer.alias("application/x-protobuf", "application/octet-stream")  # raw bytes
schema.config.update(suppress_health_check=[HealthCheck.all])
schema.config.generation.update(max_examples=EXAMPLES, deterministic=True, database="none")
schema.config.phases.update(phases=os.environ.get("OPENAPI_PHASES", "examples,fuzzing").split(","))
IDS: dict[str, list[Any]] = {}  # the live server's real ids (`seed`), for the hooks below


@schema.hook
def flatmap_body(context, body):
    path = context.operation.path
    real = with_ids(body, IDS)
    return real.map(lambda b: capped(b, path)) if path in SAMPLING else real


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    return with_ids(path_parameters, IDS)


@schema.hook
def flatmap_query(context, query):
    return with_ids(query, IDS)


@schema.parametrize()
def test_fuzz(case, live: Live) -> None:
    IDS.update(live.ids)
    case.call_and_validate(
        base_url=live.url, headers={"X-API-Key": live.key}, checks=CHECKS, timeout=150
    )


def test_the_worker_trains_after_the_fuzz(live: Live, tiny_model_dir: Path) -> None:
    worker = live.server.worker._thread
    assert worker is not None and worker.is_alive()
    client = tinker.ServiceClient(base_url=live.url, api_key=live.key)
    try:
        training = client.create_lora_training_client(
            base_model=str(tiny_model_dir), rank=4
        ).result()
        fb = training.forward_backward([datum()], "cross_entropy").result(timeout=60)
        assert fb.metrics["loss:sum"] > 0
        step = training.optim_step(types.AdamParams(learning_rate=0.01)).result(timeout=60)
        assert step.metrics["grad_norm:mean"] > 0
    finally:
        client.close("success").result()
