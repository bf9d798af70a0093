"""The scaled-out topology with real processes: redis-server, two `tinkerd worker`s (Celery),
`tinkerd serve --redis` under gunicorn, driven by the official SDK and raw HTTP.

The same training through the cluster and through the embedded server gives the same numbers;
order and de-duplication hold across API processes; and the faults of the issue: a worker killed
with SIGKILL, Redis restarted, an API process restarted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import tinker
from tinker import types
from tinker.proto.response_conv import deserialize_forward_backward_output

from tinkerd.cluster.keys import LOST, PLACEMENT
from tinkerd.local_cluster import APIProcess, Cluster, wait_until

pytestmark = pytest.mark.timeout(240)

TOKENS = [5, 17, 42, 99, 300, 7, 8, 61, 23, 400, 12]
ADAM = types.AdamParams(learning_rate=1e-2)
# Short for tests: a worker is lost after 8 s without a heartbeat (the default is 15 s).
ENV = {
    "TINKERD_WORKER_TTL_SECONDS": "8",
    "TINKERD_LONG_POLL_SECONDS": "5",
    "TINKERD_CHECKPOINT_SWEEP_SECONDS": "1",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(
        tmp_path_factory.mktemp("cluster"), workers=2, api_workers=2, env=ENV
    ).running() as c:
        yield c


@pytest.fixture
def client(cluster: Cluster) -> Iterator[tinker.ServiceClient]:
    sc = tinker.ServiceClient(base_url=cluster.url, api_key="tml-test")
    yield sc
    sc.close("success").result()


def rdb(cluster: Cluster) -> redis.Redis:
    return redis.Redis.from_url(cluster.redis.url, decode_responses=True)


def datum(tokens: list[int] = TOKENS) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def train(tc: tinker.TrainingClient, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward([datum()], "cross_entropy")
        tc.optim_step(ADAM).result()
        losses.append(fb.result().metrics["loss:sum"])
    return losses


def owner(cluster: Cluster, model_id: str) -> str:
    return rdb(cluster).hget(PLACEMENT, model_id)


def test_training_matches_the_embedded_server(cluster: Cluster, client, service_client) -> None:
    """One code path: the same seed and data give the same losses in both modes."""
    clustered = client.create_lora_training_client(
        base_model="tinkerd/tiny", rank=8, seed=3
    ).result()
    embedded = service_client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=3)
    a, b = train(clustered, 4), train(embedded, 4)
    assert a[-1] < a[0]
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_models_spread_over_workers_and_train_concurrently(cluster: Cluster, client) -> None:
    first = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=1).result()
    second = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=1).result()
    placed = list(rdb(cluster).hgetall(PLACEMENT).values())
    counts = [placed.count(name) for name in cluster.workers]
    assert max(counts) - min(counts) <= 1, counts  # placed by load: evenly
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda tc: train(tc, 3), [first, second])
    np.testing.assert_allclose(a, b, rtol=1e-5)  # same seed, same data, different workers

    def registered_with_their_models() -> bool:  # at the workers' next heartbeat
        held = {n: set(info["models"]) for n, info in cluster.registered_workers().items()}
        return all(tc.model_id in held[owner(cluster, tc.model_id)] for tc in (first, second))

    wait_until(registered_with_their_models, 10, "the workers to report their models")
    for info in cluster.registered_workers().values():
        assert {"host", "device", "memory_total", "memory_free", "queue_depth"} <= set(info)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/{path}", json=body, timeout=30)


def result(url: str, request_id: str) -> dict:
    """A settled future: JSON, or forward_backward's protobuf as a dict."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = post(url, "retrieve_future", {"request_id": request_id})
        assert r.status_code == 200, r.text
        if r.headers["content-type"] == "application/x-protobuf":
            return {"metrics": deserialize_forward_backward_output(r.content).metrics}
        if r.json().get("type") != "try_again":
            return r.json()
    raise AssertionError(f"{request_id} never settled")


def forward_json(model_id: str, seq_id: int) -> dict:
    return {
        "model_id": model_id,
        "seq_id": seq_id,
        "forward_backward_input": {
            "data": [
                {
                    "model_input": {"chunks": [{"type": "encoded_text", "tokens": TOKENS[:-1]}]},
                    "loss_fn_inputs": {
                        "target_tokens": {"data": TOKENS[1:], "dtype": "int64"},
                        "weights": {"data": [1.0] * (len(TOKENS) - 1), "dtype": "float32"},
                    },
                }
            ],
            "loss_fn": "cross_entropy",
        },
    }


def test_order_and_retries_hold_across_api_processes(cluster: Cluster, client) -> None:
    """Requests of one model sent to two API processes, out of order: they run in seq order,
    and a retry through the other process answers the first request's future."""
    other = APIProcess(
        ["--api-workers", "1", *cluster.common_args()],
        cluster.work_dir / "api-2.log",
        env=cluster.env,
    ).wait_ready()
    try:
        tc = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=5).result()
        model_id, a, b = tc.model_id, cluster.url, other.url
        adam = {"model_id": model_id, "adam_params": {"learning_rate": 1e-2}}
        # seq 1 (the creation was 0): forward; 2: optim step; 3: forward. Sent 3, 2, 1.
        third = post(a, "forward_backward", forward_json(model_id, 3)).json()["request_id"]
        second = post(b, "optim_step", {**adam, "seq_id": 2}).json()["request_id"]
        first = post(a, "forward_backward", forward_json(model_id, 1)).json()["request_id"]
        retried = post(b, "forward_backward", forward_json(model_id, 1)).json()["request_id"]
        assert retried == first
        clash = post(b, "forward_backward", {**forward_json(model_id, 3), "seq_id": 2})
        assert clash.status_code == 400 and "already used" in clash.json()["error"]
        loss_1 = result(b, first)["metrics"]["loss:sum"]
        assert "metrics" in result(a, second)
        loss_3 = result(b, third)["metrics"]["loss:sum"]
        assert loss_3 < loss_1  # the step ran between them
    finally:
        other.stop()


def test_a_thousand_concurrent_long_polls(cluster: Cluster, client) -> None:
    """Each waiting retrieve_future is a greenlet in the API, not a thread or a connection to
    Redis: 1,000 at once are held for the whole long-poll and all answered."""
    tc = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8).result()
    # seq 2 waits for seq 1, which is not sent until the polls are over: it stays pending
    pending = post(cluster.url, "forward_backward", forward_json(tc.model_id, 2))
    request_id = pending.json()["request_id"]

    async def poll_all(n: int) -> list[int | str]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:

            async def poll() -> int | str:
                try:
                    r = await http.post(
                        f"{cluster.url}/api/v1/retrieve_future", json={"request_id": request_id}
                    )
                    return r.status_code if r.json().get("type") == "try_again" else r.text
                except httpx.HTTPError as e:
                    return repr(e)

            return await asyncio.gather(*(poll() for _ in range(n)))

    started = time.monotonic()
    answers = asyncio.run(poll_all(1000))
    assert answers == [200] * 1000, {str(a) for a in answers if a != 200}
    assert time.monotonic() - started < 40  # held together, not one after another (5 s each)
    post(cluster.url, "forward_backward", forward_json(tc.model_id, 1))
    assert "metrics" in result(cluster.url, request_id)


def test_requests_gunicorn_refuses_itself_answer_json(cluster: Cluster) -> None:
    """A request line or header over gunicorn's limits, or a malformed request, never reaches
    Flask: its answer is still tinkerd's JSON error body."""
    host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
    long_line = httpx.get(f"{cluster.url}/api/v1/training_runs/{'x' * 10_000}", timeout=10)
    huge_header = httpx.get(f"{cluster.url}/api/v1/healthz", headers={"X-Big": "y" * 20_000})
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"NOT A REQUEST\r\n\r\n")
        reply = raw.recv(65536).decode("latin1")
    head, _, body = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400") and "application/json" in head
    assert json.loads(body)["category"] == "user"
    for response, status in ((long_line, 414), (huge_header, 431)):
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert response.json()["category"] == "user" and response.json()["error"]
    assert httpx.get(f"{cluster.url}/api/v1/healthz", timeout=10).status_code == 200


def test_sampling_from_base_snapshot_and_checkpoint(cluster: Cluster, client) -> None:
    tc = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=2).result()
    train(tc, 2)
    prompt = types.ModelInput.from_ints(TOKENS[:4])
    params = types.SamplingParams(max_tokens=6, seed=11, temperature=1.0)
    path = tc.save_weights_for_sampler("s").result().path
    samplers = [
        client.create_sampling_client(base_model="tinkerd/tiny"),
        tc.save_weights_and_get_sampling_client(),  # in memory, on the model's worker
        client.create_sampling_client(model_path=path),  # from the shared data dir, any worker
    ]
    outs = [s.sample(prompt, 2, params).result() for s in samplers]
    for out in outs:
        assert len(out.sequences) == 2
        assert all(len(s.tokens) == 6 for s in out.sequences)
    # the snapshot and the checkpoint hold the same weights: same seed, same tokens
    assert [s.tokens for s in outs[1].sequences] == [s.tokens for s in outs[2].sequences]


def settled(future) -> bool:
    try:
        future.result(timeout=0.01)
    except (TimeoutError, concurrent.futures.TimeoutError):
        return False
    return True


def test_a_fast_model_is_not_stuck_behind_a_slow_one_on_another_worker(
    cluster: Cluster, client
) -> None:
    slow = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=1).result()
    for _ in range(4):  # placement is by load: a next model soon lands on the other worker
        fast = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8).result()
        if owner(cluster, fast.model_id) != owner(cluster, slow.model_id):
            break
    assert owner(cluster, fast.model_id) != owner(cluster, slow.model_id)
    big = [datum(TOKENS * 12) for _ in range(8)]
    backlog = [slow.forward_backward(big, "cross_entropy") for _ in range(40)]
    time.sleep(0.5)  # the backlog is queued at the slow model's worker
    fast.forward([datum()], "cross_entropy").result(timeout=60)
    assert not all(settled(f) for f in backlog)  # the fast one did not wait its turn
    for f in backlog:
        f.result(timeout=120)
    run = httpx.get(f"{cluster.url}/api/v1/training_runs/{fast.model_id}", timeout=10).json()
    assert run["status"] == "active" and run["worker"] == owner(cluster, fast.model_id)


def test_expired_checkpoints_are_swept(cluster: Cluster, client) -> None:
    tc = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8).result()
    future = tc.save_weights_for_sampler("short-lived", ttl_seconds=1)
    path = future.result().path
    directory = cluster.data_dir / "runs" / tc.model_id / "sampler_weights" / "short-lived"
    assert path.endswith("short-lived")
    wait_until(lambda: not directory.exists(), 20, f"{directory} to be swept")


# -- faults ----------------------------------------------------------------------------------


def test_a_killed_worker_fails_its_requests_and_its_model_is_restored_elsewhere(
    cluster: Cluster, client
) -> None:
    tc = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=7).result()
    train(tc, 2)
    checkpoint = tc.save_state("before-crash").result().path
    expected = tc.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    victim = owner(cluster, tc.model_id)
    big = [datum(TOKENS * 12) for _ in range(8)]
    futures = [tc.forward_backward(big, "cross_entropy") for _ in range(30)]
    time.sleep(0.3)
    cluster.workers[victim].kill()
    killed_at = time.monotonic()
    try:
        failures = []
        for future in futures:
            try:
                future.result(timeout=60)
            except tinker.RequestFailedError as e:
                failures.append(e)
        assert time.monotonic() - killed_at < 60
        assert failures, "every request finished before the kill: nothing was tested"
        for e in failures:
            assert victim in str(e) and "lost" in str(e)
        assert tc.model_id in rdb(cluster).hgetall(LOST)
        run = httpx.get(f"{cluster.url}/api/v1/training_runs/{tc.model_id}", timeout=10).json()
        assert run["status"] == "lost" and victim in run["lost_reason"]
        events = httpx.get(
            f"{cluster.url}/api/v1/training_runs/{tc.model_id}/events?type=lost", timeout=10
        ).json()["events"]
        assert [e["worker"] for e in events] == [victim] and "restore it" in events[0]["error"]
        with pytest.raises(tinker.RequestFailedError, match="lost"):
            tc.forward([datum()], "cross_entropy").result(timeout=30)

        restored = client.create_training_client_from_state(checkpoint).result()
        assert owner(cluster, restored.model_id) not in (None, victim)
        loss = restored.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
        assert loss == pytest.approx(expected, rel=1e-5)
        train(restored, 1)
    finally:
        cluster.add_worker()  # back to two workers for the tests that follow


def test_a_worker_stopped_with_sigterm_hands_its_models_over(cluster: Cluster, client) -> None:
    """SIGTERM mid-training: the running step finishes, then the model (weights, AdamW state,
    accumulated gradients) and the requests queued for it move to the other worker. Nothing
    fails and nothing is lost or repeated: every loss equals an uninterrupted twin's."""
    adam = types.AdamParams(learning_rate=0.01)
    tc = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=8).result()
    twin = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=8).result()
    stopping = owner(cluster, tc.model_id)
    big = [datum(TOKENS * 12) for _ in range(8)]

    def steps(training_client, n: int) -> list:
        return [
            (
                training_client.forward_backward(big, "cross_entropy"),
                training_client.optim_step(adam),
            )
            for _ in range(n)
        ]

    expected = steps(twin, 8)
    futures = steps(tc, 8)
    saved = tc.save_state("at-shutdown")
    unstepped = tc.forward_backward(big, "cross_entropy")  # gradients waiting for a step
    time.sleep(0.5)  # some ran, the rest queued at the worker or still in its Celery queue
    cluster.workers[stopping].proc.terminate()  # SIGTERM: Celery's warm shutdown, then drain
    try:
        for (fb, opt), (twin_fb, twin_opt) in zip(futures, expected, strict=True):
            loss = fb.result(timeout=120).metrics["loss:sum"]
            assert loss == pytest.approx(twin_fb.result(timeout=120).metrics["loss:sum"], rel=1e-5)
            opt.result(timeout=120)
            twin_opt.result(timeout=120)
        path = saved.result(timeout=120).path
        unstepped.result(timeout=120)
        twin.forward_backward(big, "cross_entropy").result(timeout=120)
        assert cluster.workers[stopping].proc.wait(60) == 0
        new_owner = owner(cluster, tc.model_id)
        assert new_owner not in (None, stopping)
        assert tc.model_id not in rdb(cluster).hgetall(LOST)
        run = httpx.get(f"{cluster.url}/api/v1/training_runs/{tc.model_id}", timeout=10).json()
        assert run["status"] == "active" and run.get("worker") == new_owner
        created = httpx.get(
            f"{cluster.url}/api/v1/training_runs/{tc.model_id}/events?type=created", timeout=10
        ).json()["events"]
        assert "handoff-" in (created[-1].get("from_checkpoint") or "")  # it moved mid-run
        # the same client trains on, mid-step gradients included: still the twin's numbers
        for training_client in (tc, twin):
            training_client.optim_step(adam).result(timeout=60)
        after = train(tc, 2)
        assert after == pytest.approx(train(twin, 2), rel=1e-5)
        restored = client.create_training_client_from_state(path).result()  # the save is whole
        assert np.isfinite(train(restored, 1)[0])
    finally:
        cluster.add_worker()  # back to two workers for the tests that follow


def test_redis_restart_answers_503_then_recovers(cluster: Cluster, client) -> None:
    tc = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=9).result()
    before = train(tc, 1)
    port, directory = cluster.redis.port, cluster.redis.directory
    cluster.redis.stop()
    try:
        r = post(cluster.url, "create_session", {"tags": [], "user_metadata": {}})
        assert r.status_code == 503
        assert r.json()["category"] == "server" and "Redis" in r.json()["error"]
        health = httpx.get(f"{cluster.url}/api/v1/healthz", timeout=10)
        assert health.status_code == 503
        # the SDK retries 5xx: a step submitted during the outage completes after it
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(train, tc, 1)
            time.sleep(2)
            assert not pending.done()
            cluster.redis.start()
            after = pending.result(timeout=120)
    finally:
        if cluster.redis.process is None or not cluster.redis.process.alive():
            cluster.redis.start()
    assert (cluster.redis.port, cluster.redis.directory) == (port, directory)
    assert after[0] < before[0]
    wait_until(lambda: httpx.get(f"{cluster.url}/api/v1/healthz").status_code == 200, 30, "API")
    assert set(cluster.registered_workers()) == {n for n, w in cluster.workers.items() if w.alive()}


def test_an_api_restart_keeps_futures(cluster: Cluster, client) -> None:
    tc = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=4).result()
    futures = [tc.forward_backward([datum(TOKENS * 12)] * 8, "cross_entropy") for _ in range(10)]
    assert cluster.api is not None
    port = cluster.api.port
    cluster.api.kill()
    cluster.start_api(port=port)
    losses = [f.result(timeout=120).metrics["loss:sum"] for f in futures]
    assert len(losses) == 10 and all(np.isfinite(losses))
    train(tc, 1)  # and the model keeps training through the new process


def test_the_simple_json_api_on_the_cluster(cluster: Cluster) -> None:
    """The simple JSON API scaled out: an adapter placed on a worker trains on chat data and
    samples there, and removing it frees it on that worker and drops its placement."""
    url, name = cluster.url, f"simple-{time.monotonic_ns()}"

    def call(path: str, body: dict) -> dict:
        r = httpx.post(f"{url}{path}", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def settled(request_id: str) -> dict:
        while (out := call("/retrieve_future", {"request_id": request_id})).get("type"):
            assert out["type"] == "try_again", out
        return out

    run_id = call("/add_lora", {"model_id": name, "rank": 8})["training_run_id"]
    worker = owner(cluster, run_id)
    chat = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]]
    losses = []
    for _ in range(3):
        fwd = call("/fwdbwd", {"model_id": name, "data": chat})
        opt = call("/optim_step", {"model_id": name, "learning_rate": 1e-2})
        out = settled(fwd["request_id"])
        assert "grad_norm" in settled(opt["request_id"])["metrics"]
        losses.append(out["loss"])
    assert losses[-1] < losses[0] and out["metrics"]["num_weighted_tokens"] > 0
    sampled = call("/sample", {"model_id": name, "messages": chat[0][:1], "max_tokens": 4})
    assert 1 <= len(sampled["samples"][0]["tokens"]) <= 4
    snapshot = f"{run_id}:sample:latest"
    assert owner(cluster, snapshot) == worker  # sampled on the adapter's worker

    def held() -> list[str]:
        return cluster.registered_workers()[worker]["models"]

    wait_until(lambda: run_id in held(), 10, "the worker to report the adapter")
    assert call("/remove_lora", {"model_id": name})["freed"] is True
    assert owner(cluster, run_id) is None and owner(cluster, snapshot) is None
    wait_until(lambda: run_id not in held(), 10, "the worker to free the adapter")
    assert name not in [a["model_id"] for a in httpx.get(f"{url}/adapters").json()["adapters"]]
    assert httpx.post(f"{url}/optim_step", json={"model_id": name}).status_code == 404


def test_a_cookbook_recipe_runs_unmodified_on_the_cluster(
    cluster: Cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """tinker-cookbook's chat_sl, as its README runs it, with the cluster's API as base_url."""
    from test_cookbook import arithmetic_chats, checkpoints, metrics, run_recipe

    log_path = tmp_path / "run"
    args = [
        "-m",
        "tinker_cookbook.recipes.chat_sl.train",
        f"base_url={cluster.url}",
        f"model_name={tiny_model_dir}",
        "renderer_name=role_colon",
        f"dataset={arithmetic_chats(tmp_path / 'chats.jsonl', 48)}",
        f"log_path={log_path}",
        "batch_size=8",
        "learning_rate=5e-3",
        "lr_schedule=constant",
        "lora_rank=8",
        "max_length=128",
        "save_every=3",
        "eval_every=0",
        "num_epochs=1",
    ]
    run_recipe(args, tmp_path / "recipe.log")
    rows = metrics(log_path)
    assert sorted(rows) == list(range(6))
    assert rows[5]["train_mean_nll"] < rows[0]["train_mean_nll"]
    assert checkpoints(log_path), "the recipe saved no checkpoint"


def test_monitoring_is_cluster_wide(cluster: Cluster, client) -> None:
    """/metrics adds up every API process's requests and every worker's steps and tokens;
    system status lists both workers with their memory; a run's events come from its worker."""
    from tinkerd.metrics import parse

    def scrape() -> dict:
        r = httpx.get(f"{cluster.url}/metrics", timeout=30)
        assert r.status_code == 200
        return parse(r.text)

    def total(samples: dict, name: str, **labels) -> float:
        want = {(k, str(v)) for k, v in labels.items()}
        return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)

    before = scrape()
    tc = client.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=5).result()
    losses = train(tc, 3)
    path = tc.save_state("monitored").result().path
    worker = owner(cluster, tc.model_id)
    sampler = tc.save_weights_and_get_sampling_client().result()
    sampler.sample(
        types.ModelInput.from_ints(TOKENS[:4]), 1, types.SamplingParams(max_tokens=3, seed=0)
    ).result()

    def counted() -> bool:  # API processes and workers send their counts every half second
        after = scrape()
        return (
            total(after, "tinkerd_optim_steps_total", worker=worker)
            - total(before, "tinkerd_optim_steps_total", worker=worker)
            == 3
            and total(after, "tinkerd_sampled_tokens_total")
            > total(before, "tinkerd_sampled_tokens_total")
            and total(after, "tinkerd_http_requests_total", route="/api/v1/optim_step")
            - total(before, "tinkerd_http_requests_total", route="/api/v1/optim_step")
            == 3
        )

    wait_until(counted, 15, "the cluster's counters")
    after = scrape()
    tokens = total(after, "tinkerd_forward_backward_tokens_total", worker=worker) - total(
        before, "tinkerd_forward_backward_tokens_total", worker=worker
    )
    assert tokens == 3 * (len(TOKENS) - 1)
    live = set(cluster.registered_workers())  # an earlier test replaced a killed worker
    assert total(after, "tinkerd_workers") == len(live) == 2
    for name in live:
        assert ("tinkerd_worker_queue_depth", frozenset({("worker", name)})) in after
        assert total(after, "tinkerd_worker_memory_total_bytes", worker=name) > 0
    assert ("tinkerd_queue_depth", frozenset()) in after

    status = httpx.get(f"{cluster.url}/api/v1/system/status", timeout=30).json()
    assert status["mode"] == "cluster"
    assert {w["name"] for w in status["workers"]} == live
    for w in status["workers"]:
        assert w["memory_total"] >= w["memory_free"] > 0 and isinstance(w["queue_depth"], int)
    assert status["host"]["cpu_count"] >= 1

    def events() -> list[dict]:
        r = httpx.get(f"{cluster.url}/api/v1/training_runs/{tc.model_id}/events", timeout=30)
        assert r.status_code == 200
        return r.json()["events"]

    wait_until(lambda: any(e["type"] == "save_weights" for e in events()), 15, "the events")
    kinds = [e["type"] for e in events()]
    assert kinds[:8] == ["created"] + ["forward_backward", "optim_step"] * 3 + ["save_weights"]
    steps = [e for e in events() if e["type"] == "forward_backward"]
    np.testing.assert_allclose([e["loss"] for e in steps], losses, rtol=1e-6)
    assert [e for e in events() if e["type"] == "save_weights"][0]["path"] == path
    r = httpx.get(f"{cluster.url}/api/v1/training_runs/nope/events", timeout=30)
    assert r.status_code == 404 and r.json()["category"] == "user"


def test_api_keys_on_the_cluster(cluster: Cluster, client) -> None:
    """Keys made in the cluster's Redis apply to every API process at once: 401 without one,
    each key sees only its own runs, and max_queued is counted across processes (429)."""
    from tinkerd.keys import RedisKeys, create_key

    keys = RedisKeys(rdb(cluster))
    secrets = {name: create_key(keys, name, max_queued=2)[0] for name in ("cluster-a", "cluster-b")}
    try:
        time.sleep(1.2)  # each API process re-reads the keys once a second
        refused = httpx.get(f"{cluster.url}/api/v1/training_runs", timeout=10)
        assert refused.status_code == 401 and refused.json()["category"] == "user"

        a = tinker.ServiceClient(base_url=cluster.url, api_key=secrets["cluster-a"])
        tc = a.create_lora_training_client(base_model="tinkerd/tiny", rank=4, seed=1).result()
        assert np.isfinite(train(tc, 1)[0])

        def runs(name: str) -> set[str]:
            r = httpx.get(
                f"{cluster.url}/api/v1/training_runs?limit=1000",
                headers={"X-API-Key": secrets[name]},
                timeout=10,
            )
            return {run["training_run_id"] for run in r.json()["training_runs"]}

        for _ in range(4):  # whichever API process answers
            assert runs("cluster-a") == {tc.model_id} and runs("cluster-b") == set()
            r = httpx.post(
                f"{cluster.url}/api/v1/get_info",
                json={"model_id": tc.model_id},
                headers={"X-API-Key": secrets["cluster-b"]},
                timeout=10,
            )
            assert r.status_code == 404

        # two requests held by a seq_id gap fill cluster-a's queue quota, on any process
        body = {
            "model_id": tc.model_id,
            "forward_only": True,
            "forward_backward_input": {
                "loss_fn": "cross_entropy",
                "data": [
                    {
                        "model_input": {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]},
                        "loss_fn_inputs": {"target_tokens": TOKENS, "weights": [1.0] * len(TOKENS)},
                    }
                ],
            },
        }
        headers = {"X-API-Key": secrets["cluster-a"]}
        statuses = [
            httpx.post(
                f"{cluster.url}/api/v1/forward_backward",
                json={**body, "seq_id": seq},
                headers=headers,
                timeout=10,
            )
            for seq in (1000, 1001, 1002)
        ]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        assert float(statuses[2].headers["Retry-After"]) >= 1
    finally:
        for name in secrets:
            keys.revoke(name)
        keys.set_open()  # a server that had keys stays keyed until it is opened explicitly
        time.sleep(1.2)  # open again for whatever runs next


def test_published_checkpoints_audit_and_sessions_on_the_cluster(cluster: Cluster) -> None:
    """The same code path as `tinkerd serve`: another key reads a checkpoint only while it is
    published, whichever API process answers; the audit log (saves written by the worker) and
    sessions, in Redis, are each key's own."""
    from tinkerd.keys import RedisKeys, create_key

    keys = RedisKeys(rdb(cluster))
    secrets = {name: create_key(keys, name)[0] for name in ("pub-a", "pub-b")}
    clients: list[tinker.ServiceClient] = []
    try:
        time.sleep(1.2)  # each API process re-reads the keys once a second

        def sdk(name: str) -> tinker.ServiceClient:
            clients.append(tinker.ServiceClient(base_url=cluster.url, api_key=secrets[name]))
            return clients[-1]

        def call(method: str, path: str, name: str) -> httpx.Response:
            headers = {"X-API-Key": secrets[name]}
            return httpx.request(
                method, f"{cluster.url}/api/v1/{path}", headers=headers, timeout=30
            )

        a, b = sdk("pub-a"), sdk("pub-b")
        tc = a.create_lora_training_client(base_model="tinkerd/tiny", rank=4, seed=1).result()
        train(tc, 1)
        path = tc.save_weights_for_sampler("shared").result(timeout=60).path
        checkpoint = f"training_runs/{tc.model_id}/checkpoints/sampler_weights/shared"
        params = types.SamplingParams(max_tokens=3, seed=1, temperature=0.0)
        prompt = types.ModelInput.from_ints(TOKENS)
        with pytest.raises(tinker.NotFoundError):
            b.create_sampling_client(model_path=path).result(timeout=60)
        assert call("POST", f"{checkpoint}/publish", "pub-a").status_code == 200
        theirs = b.create_sampling_client(model_path=path).result(timeout=60)
        mine = a.create_sampling_client(model_path=path).result(timeout=60)
        for _ in range(2):  # whichever API process answers
            assert (
                theirs.sample(prompt, 1, params).result(timeout=60).sequences[0].tokens
                == mine.sample(prompt, 1, params).result(timeout=60).sequences[0].tokens
            )
        assert call("DELETE", f"{checkpoint}/publish", "pub-a").status_code == 200
        for _ in range(2):
            with pytest.raises(tinker.NotFoundError):
                b.create_sampling_client(model_path=path).result(timeout=60)

        def events(name: str) -> list[tuple[str, str | None]]:
            entries = call("GET", "audit", name).json()["entries"]
            assert {e["event_details"]["key"] for e in entries} == {name}
            return [(e["event"], e["tinker_path"]) for e in entries]

        # a signed URL one API process made, any other serves (the key is in the data directory)
        external = tc.save_weights_external("shared").result(timeout=60).path
        run = external.removeprefix("tinker://").split("/")[0]
        urls = call("GET", f"training_runs/{run}/checkpoints/external_weights/shared/"
                    "external_weights_urls", "pub-a").json()["urls"]  # fmt: skip
        for _ in range(4):
            assert httpx.get(urls["adapter_config.json"], timeout=30).json()["r"] == 4

        assert {("checkpoint_save", path), ("checkpoint_publish", path)} <= set(events("pub-a"))
        assert ("checkpoint_read", path) in events("pub-b")
        session = tc.model_id.split(":")[0]
        for _ in range(2):
            assert session in call("GET", "sessions", "pub-a").json()["sessions"]
            assert session not in call("GET", "sessions", "pub-b").json()["sessions"]
            assert call("GET", f"sessions/{session}", "pub-b").status_code == 404
    finally:
        for client in clients:
            client.close("success").result()
        for name in secrets:
            keys.revoke(name)
        keys.set_open()
        time.sleep(1.2)  # open again for whatever runs next
