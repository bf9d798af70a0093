"""Several API keys on one `tinkerd serve`: every request needs a valid key (401 otherwise), each
key sees only its own sessions, models, samplers, checkpoints and futures (another key's ids
answer 404 on every surface: SDK routes, REST, the simple JSON API, OpenAI routes, checkpoint
files, events), and per-key limits answer 429 with Retry-After, which the SDK honours."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tinkerd.config import Settings
from tinkerd.keys import FileKeys, create_key
from tinkerd.metrics import parse
from tinkerd.serve import EmbeddedServer

pytestmark = pytest.mark.timeout(300)

WAIT = 60
TOKENS = [5, 17, 42, 99, 7, 23, 64, 12, 80, 3]


@dataclass
class KeyedServer:
    url: str
    secrets: dict[str, str]  # key name -> secret
    server: EmbeddedServer

    def call(self, method: str, path: str, key: str | None, **kwargs) -> httpx.Response:
        headers = {"X-API-Key": self.secrets[key]} if key else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def sdk(self, key: str) -> tinker.ServiceClient:
        return tinker.ServiceClient(base_url=self.url, api_key=self.secrets[key])


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    data_dir = tmp_path_factory.mktemp("keyed")
    store = FileKeys(data_dir)
    secrets = {
        "alice": create_key(store, "alice", priority=8)[0],
        "bob": create_key(store, "bob", priority=2)[0],
        "ops": create_key(store, "ops", admin=True)[0],
        "few": create_key(store, "few", max_models=1)[0],
        "narrow": create_key(store, "narrow", max_models=2, max_queued=2)[0],
        "gone": create_key(store, "gone")[0],
    }
    settings = Settings.load(port=0, data_dir=data_dir, device="cpu", long_poll_seconds=5.0)
    server = EmbeddedServer(settings).start()
    yield KeyedServer(server.url, secrets, server)
    server.stop()


def datum(tokens: list[int] = TOKENS) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def json_datum(tokens: list[int] = TOKENS) -> dict:
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
        "loss_fn_inputs": {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    }


def forward_body(model_id: str, seq_id: int, data: list[dict]) -> dict:
    return {
        "model_id": model_id,
        "seq_id": seq_id,
        "forward_only": True,
        "forward_backward_input": {"data": data, "loss_fn": "cross_entropy"},
    }


def train(tc, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward([datum()], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=0.02)).result(timeout=WAIT)
        losses.append(fb.result(timeout=WAIT).metrics["loss:sum"])
    return losses


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    if isinstance(body["error"], dict):  # /v1: OpenAI's error shape
        assert body["error"]["type"] == "invalid_request_error"
        return {"error": body["error"]["message"], "category": "user"}
    assert body["category"] == "user" and body["error"]
    return body


# -- authentication ---------------------------------------------------------------------------


def test_without_a_valid_key_every_route_answers_401(keyed: KeyedServer) -> None:
    for method, path in [
        ("POST", "/api/v1/create_session"),
        ("GET", "/api/v1/training_runs"),
        ("GET", "/api/v1/checkpoints"),
        ("GET", "/adapters"),
        ("POST", "/fwdbwd"),
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/system/status"),
        ("GET", "/api/v1/nonexistent"),
    ]:
        body = assert_error(keyed.call(method, path, None, json={}), 401)
        assert "X-API-Key" in body["error"]
        wrong = httpx.request(
            method, keyed.url + path, headers={"X-API-Key": "tml-" + "w" * 43}, json={}
        )
        assert_error(wrong, 401)
    # liveness stays public, and a bearer token works as well as the header
    assert keyed.call("GET", "/api/v1/healthz", None).status_code == 200
    bearer = {"Authorization": f"Bearer {keyed.secrets['ops']}"}
    assert httpx.get(keyed.url + "/metrics", headers=bearer).status_code == 200


def test_the_sdk_with_a_wrong_key_is_refused(keyed: KeyedServer) -> None:
    client = tinker.ServiceClient(base_url=keyed.url, api_key="tml-not-a-key")
    with pytest.raises(tinker.AuthenticationError):
        client.create_lora_training_client(base_model="tinkerd/tiny", rank=4).result(timeout=30)


def test_a_revoked_key_is_refused_at_once_by_a_running_server(keyed: KeyedServer) -> None:
    assert keyed.call("GET", "/api/v1/training_runs", "gone").status_code == 200
    assert FileKeys(keyed.server.settings.data_dir).revoke("gone")
    time.sleep(1.2)  # the key ring re-reads the store at most once a second
    assert_error(keyed.call("GET", "/api/v1/training_runs", "gone"), 401)


# -- isolation -------------------------------------------------------------------------------


@dataclass
class Work:
    """What one key made: a run, its checkpoints, a sampler, a future, a session."""

    model_id: str
    session_id: str
    state_path: str
    sampler_path: str
    sampler_id: str
    request_id: str
    losses: list[float]


def do_work(keyed: KeyedServer, key: str, out: dict[str, Work]) -> None:
    client = keyed.sdk(key)
    tc = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=3).result()
    losses = train(tc, 3)
    state = tc.save_state(f"{key}-state").result(timeout=WAIT).path
    sampler_path = tc.save_weights_for_sampler(f"{key}-sampler").result(timeout=WAIT).path
    sampler = client.create_sampling_client(model_path=sampler_path).result(timeout=WAIT)
    sampler.sample(
        types.ModelInput.from_ints(TOKENS[:4]), 1, types.SamplingParams(max_tokens=3, seed=0)
    ).result(timeout=WAIT)
    # far ahead of the model's next seq_id: it stays pending, a future for the other key to try
    body = forward_body(tc.model_id, 100, [json_datum()])
    future = keyed.call("POST", "/api/v1/forward_backward", key, json=body)
    out[key] = Work(
        tc.model_id,
        tc.model_id.split(":")[0],
        state,
        sampler_path,
        sampler._sampling_session_id,
        future.json().get("request_id", ""),
        losses,
    )


def test_two_keys_train_concurrently_and_each_sees_only_its_own(keyed: KeyedServer) -> None:
    work: dict[str, Work] = {}
    threads = [threading.Thread(target=do_work, args=(keyed, k, work)) for k in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert set(work) == {"alice", "bob"}, "a training thread failed"
    for w in work.values():
        assert w.losses[-1] < w.losses[0]

    for me, other in (("alice", "bob"), ("bob", "alice")):
        mine, theirs = work[me], work[other]

        runs = keyed.call("GET", "/api/v1/training_runs", me).json()["training_runs"]
        assert {r["training_run_id"] for r in runs} == {mine.model_id}
        ckpts = keyed.call("GET", "/api/v1/checkpoints", me).json()["checkpoints"]
        assert {c["tinker_path"] for c in ckpts} == {mine.state_path, mine.sampler_path}
        models = keyed.call("GET", "/v1/models", me).json()["data"]
        assert mine.sampler_path in {m["id"] for m in models}
        assert not any(theirs.model_id in m["id"] for m in models)

        not_found = [
            ("GET", f"/api/v1/training_runs/{theirs.model_id}", None),
            ("GET", f"/api/v1/training_runs/{theirs.model_id}/checkpoints", None),
            ("GET", f"/api/v1/training_runs/{theirs.model_id}/events", None),
            ("GET", f"/api/v1/training_runs/{theirs.model_id}/log", None),
            ("POST", f"/api/v1/training_runs/{theirs.model_id}/save", {"name": "stolen"}),
            ("POST", "/api/v1/get_info", {"model_id": theirs.model_id}),
            ("POST", "/api/v1/weights_info", {"tinker_path": theirs.state_path}),
            ("GET", f"/api/v1/checkpoints/archive?path={theirs.state_path}", None),
            ("GET", f"/api/v1/samplers/{theirs.sampler_id}", None),
            ("POST", "/api/v1/session_heartbeat", {"session_id": theirs.session_id}),
            ("POST", "/api/v1/retrieve_future", {"request_id": theirs.request_id}),
            (
                "POST",
                "/api/v1/forward_backward",
                {
                    "model_id": theirs.model_id,
                    "seq_id": 50,
                    "forward_backward_input": {"data": [], "loss_fn": "cross_entropy"},
                },
            ),
            (
                "POST",
                "/api/v1/optim_step",
                {"model_id": theirs.model_id, "seq_id": 51, "adam_params": {}},
            ),
            (
                "POST",
                "/api/v1/create_model",
                {"session_id": theirs.session_id, "model_seq_id": 9, "base_model": "tinkerd/tiny"},
            ),
            (
                "POST",
                "/api/v1/create_sampling_session",
                {
                    "session_id": work[me].session_id,
                    "sampling_session_seq_id": 77,
                    "model_path": theirs.sampler_path,
                },
            ),
            (
                "POST",
                "/api/v1/asample",
                {
                    "sampling_session_id": theirs.sampler_id,
                    "seq_id": 5,
                    "num_samples": 1,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": TOKENS[:3]}]},
                    "sampling_params": {"max_tokens": 2},
                },
            ),
            (
                "POST",
                "/api/v1/load_weights",
                {
                    "session_id": work[me].session_id,
                    "model_seq_id": 8,
                    "path": theirs.state_path,
                },
            ),
            ("POST", "/v1/completions", {"model": theirs.sampler_path, "prompt": "hi"}),
            ("GET", f"/v1/models/{theirs.sampler_path}", None),
            (
                "DELETE",
                f"/api/v1/training_runs/{theirs.model_id}/checkpoints/weights/{other}-state",
                None,
            ),
        ]
        for method, path, body in not_found:
            assert_error(keyed.call(method, path, me, json=body), 404)

        # the SDK's own calls fail the same way
        client = keyed.sdk(me)
        with pytest.raises(tinker.NotFoundError):
            client.create_training_client_from_state(theirs.state_path).result(timeout=WAIT)
        rest = client.create_rest_client()
        with pytest.raises(tinker.NotFoundError):
            rest.get_training_run(theirs.model_id).result(timeout=WAIT)

    # nothing was touched: each key's checkpoints are all there, and its run trains on
    for key, w in work.items():
        paths = {
            c["tinker_path"]
            for c in keyed.call("GET", "/api/v1/checkpoints", key).json()["checkpoints"]
        }
        assert paths == {w.state_path, w.sampler_path}
        restored = keyed.sdk(key).create_training_client_from_state(w.state_path).result()
        assert np.isfinite(train(restored, 1)[0])

    # an admin key sees everyone's work
    runs = keyed.call("GET", "/api/v1/training_runs?limit=100", "ops").json()["training_runs"]
    assert {work["alice"].model_id, work["bob"].model_id} <= {r["training_run_id"] for r in runs}
    status = keyed.call("GET", "/api/v1/system/status", "ops").json()
    held = {m for w in status["workers"] for m in w["models"]}
    assert {work["alice"].model_id, work["bob"].model_id} <= held
    # a plain key sees the workers' load but only its own model ids
    status = keyed.call("GET", "/api/v1/system/status", "alice").json()
    held = {m for w in status["workers"] for m in w["models"]}
    assert work["alice"].model_id in held and work["bob"].model_id not in held


def test_simple_api_adapter_names_are_per_key(keyed: KeyedServer) -> None:
    for key in ("alice", "bob"):
        r = keyed.call("POST", "/add_lora", key, json={"model_id": "shared", "rank": 4})
        assert r.status_code == 200, r.text
    only_alice = keyed.call("POST", "/add_lora", "alice", json={"model_id": "alices", "rank": 4})
    assert only_alice.status_code == 200
    alice = {a["model_id"]: a for a in keyed.call("GET", "/adapters", "alice").json()["adapters"]}
    bob = {a["model_id"]: a for a in keyed.call("GET", "/adapters", "bob").json()["adapters"]}
    assert set(alice) == {"shared", "alices"} and set(bob) == {"shared"}
    assert alice["shared"]["training_run_id"] != bob["shared"]["training_run_id"]
    chat = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    for method, path, body in [
        ("POST", "/optim_step", {"model_id": "alices"}),
        ("POST", "/sample", {"model_id": "alices", "prompt": "hi", "max_tokens": 2}),
        ("DELETE", "/adapters/alices", None),
        ("POST", "/remove_lora", {"model_id": "alices"}),
    ]:
        assert_error(keyed.call(method, path, "bob", json=body), 404)
    # fwdbwd on a name bob does not have makes bob's own adapter of that name
    r = keyed.call("POST", "/fwdbwd", "bob", json={"model_id": "alices", "data": chat})
    assert r.status_code == 200
    again = {a["model_id"]: a for a in keyed.call("GET", "/adapters", "alice").json()["adapters"]}
    bobs = {a["model_id"]: a for a in keyed.call("GET", "/adapters", "bob").json()["adapters"]}
    assert again["alices"]["training_run_id"] == alice["alices"]["training_run_id"]
    assert bobs["alices"]["training_run_id"] != alice["alices"]["training_run_id"]
    # bob's fwdbwd future is his alone
    r = keyed.call("POST", "/fwdbwd", "bob", json={"model_id": "shared", "data": chat})
    request_id = r.json()["request_id"]
    assert_error(
        keyed.call("POST", "/retrieve_future", "alice", json={"request_id": request_id}), 404
    )
    done = keyed.call("POST", "/retrieve_future", "bob", json={"request_id": request_id})
    while done.json().get("type") == "try_again":
        done = keyed.call("POST", "/retrieve_future", "bob", json={"request_id": request_id})
    assert done.status_code == 200 and "loss" in done.json()


# -- limits ----------------------------------------------------------------------------------


def test_a_key_at_its_model_limit_gets_429_with_retry_after(keyed: KeyedServer) -> None:
    session = keyed.call("POST", "/api/v1/create_session", "few", json={}).json()["session_id"]

    def create(seq: int) -> httpx.Response:
        body = {"session_id": session, "model_seq_id": seq, "base_model": "tinkerd/tiny",
                "lora_config": {"rank": 4}}  # fmt: skip
        return keyed.call("POST", "/api/v1/create_model", "few", json=body)

    assert create(0).status_code == 200
    assert create(0).status_code == 200  # a retried create is not a second model
    refused = create(1)
    assert_error(refused, 429)
    assert "max_models" in refused.json()["error"] and float(refused.headers["Retry-After"]) > 0
    assert_error(keyed.call("POST", "/add_lora", "few", json={"model_id": "x", "rank": 4}), 429)
    # other keys are not affected
    assert (
        keyed.call("POST", "/add_lora", "alice", json={"model_id": "y", "rank": 4}).status_code
        == 200
    )
    # a finished session frees its models' slots
    keyed.call("POST", f"/api/v1/sessions/{session}/finish", "few", json={})
    fresh = keyed.call("POST", "/api/v1/create_session", "few", json={}).json()["session_id"]
    body = {"session_id": fresh, "model_seq_id": 0, "base_model": "tinkerd/tiny"}
    assert keyed.call("POST", "/api/v1/create_model", "few", json=body).status_code == 200


def test_the_sdk_waits_out_a_429_for_queued_requests(keyed: KeyedServer) -> None:
    """`narrow` may have 2 requests queued or running. Two long forwards fill its quota, so the
    SDK's next request is refused (429, Retry-After); the SDK waits, sends it again once they
    are done, and gets its answer."""
    tc = keyed.sdk("narrow").create_lora_training_client(base_model="tinkerd/tiny", rank=4, seed=1)
    tc = tc.result(timeout=WAIT)
    session = keyed.call("POST", "/api/v1/create_session", "narrow", json={}).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": "tinkerd/tiny",
            "lora_config": {"rank": 4}}  # fmt: skip
    created = keyed.call("POST", "/api/v1/create_model", "narrow", json=body).json()
    settle(keyed, "narrow", created["request_id"])
    long_batch = [json_datum(TOKENS * 12)] * 256  # seconds of work, sent in a fraction

    def forward(seq_id: int, data: list) -> httpx.Response:
        body = forward_body(created["model_id"], seq_id, data)
        return keyed.call("POST", "/api/v1/forward_backward", "narrow", json=body)

    running = [forward(i, long_batch).json()["request_id"] for i in (1, 2)]
    refused = forward(3, [json_datum()])
    assert_error(refused, 429)
    assert float(refused.headers["Retry-After"]) >= 1 and "max_queued" in refused.json()["error"]
    before = parse(keyed.call("GET", "/metrics", "ops").text)

    loss = tc.forward([datum()], "cross_entropy").result(timeout=WAIT).metrics["loss:sum"]

    assert np.isfinite(loss)
    for request_id in running:  # the SDK's request went in only after these were done
        assert (
            settle(keyed, "narrow", request_id).headers["content-type"] == "application/x-protobuf"
        )
    after = parse(keyed.call("GET", "/metrics", "ops").text)

    def refusals(samples: dict) -> float:
        return sum(v for (n, ls), v in samples.items()
                   if n == "tinkerd_http_errors_total" and ("status", "429") in ls)  # fmt: skip

    assert refusals(after) > refusals(before)  # the SDK was refused, then waited


def settle(keyed: KeyedServer, key: str, request_id: str) -> httpx.Response:
    """Poll a future until it is settled."""
    while True:
        r = keyed.call("POST", "/api/v1/retrieve_future", key, json={"request_id": request_id})
        assert r.status_code == 200, r.text
        if r.headers["content-type"] != "application/json" or r.json().get("type") != "try_again":
            return r
