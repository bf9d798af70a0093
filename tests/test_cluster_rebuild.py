"""A Redis that comes back empty (restarted without persistence, or flushed) is rebuilt from the
owners of the state: real redis-server without persistence, a real `tinkerd worker` process, the
cluster API and the official SDK.

The worker still holds its models and writes them back (records, placement, next seq_id), the
registry re-creates sessions on use and reads runs and checkpoints from the data directory, so
the same SDK clients go on as if nothing happened; only a request that had not reached a worker
is lost, and its poll says why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tinker
from test_cluster import forward_json as forward  # a sibling test module
from test_cluster import post, rdb, train

from tinkerd.cluster.keys import PLACEMENT
from tinkerd.cluster.state import RedisFutures, connect
from tinkerd.local_cluster import Cluster, RedisServer, wait_until
from tinkerd.results import Kind, Result

pytestmark = pytest.mark.timeout(300)

WORKER_TTL = 8.0
ENV = {
    "TINKERD_WORKER_TTL_SECONDS": str(WORKER_TTL),
    "TINKERD_LONG_POLL_SECONDS": "5",
    "TINKERD_SEQ_GAP_SECONDS": "20",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One worker and one API process over a Redis that keeps nothing across a restart."""
    work_dir = tmp_path_factory.mktemp("rebuild")
    c = Cluster(work_dir, workers=1, api_workers=1, env=ENV)
    c.redis = RedisServer(work_dir / "redis", persist=False)
    with c.running():
        yield c


def empty_redis(cluster: Cluster, how: str) -> None:
    """Redis loses everything: restarted without persistence, or flushed while running."""
    rdb(cluster).set("test:marker", 1)
    if how == "restart":
        cluster.redis.stop()
        cluster.redis.start()
    else:
        rdb(cluster).flushall()
    assert not rdb(cluster).exists("test:marker")


@pytest.mark.parametrize("how", ["restart", "flushall"])
def test_the_same_clients_go_on_after_redis_comes_back_empty(
    cluster: Cluster, service_client: tinker.ServiceClient, how: str
) -> None:
    sc = tinker.ServiceClient(base_url=cluster.url, api_key="tml-test")
    try:
        tc = sc.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=11).result()
        twin = service_client.create_lora_training_client(
            base_model="tinkerd/tiny", rank=8, seed=11
        ).result()  # on the embedded server, which never sees the outage
        before = train(tc, 3)
        path = tc.save_state(f"before-{how}").result().path

        empty_redis(cluster, how)
        after = train(tc, 3)  # the same TrainingClient, straight away

        expected = train(twin, 6)
        np.testing.assert_allclose(before + after, expected, rtol=1e-5)
        worker = next(iter(cluster.workers))
        assert rdb(cluster).hget(PLACEMENT, tc.model_id) == worker  # not orphaned
        # the same ServiceClient (its session re-created) makes another model, which trains
        other = sc.create_lora_training_client(base_model="tinkerd/tiny", rank=8).result()
        assert np.isfinite(train(other, 1)[0])
        # the checkpoint saved before is listed and loads: it resumes where it was saved
        rest = tinker.RestClient(base_url=cluster.url, api_key="tml-test")
        listed = rest.list_checkpoints(tc.model_id).result().checkpoints
        assert path in [c.tinker_path for c in listed]
        everything = rest.list_user_checkpoints().result().checkpoints
        assert path in [c.tinker_path for c in everything]
        run = rest.get_training_run(tc.model_id).result()
        assert run.training_run_id == tc.model_id
        resumed = sc.create_training_client_from_state_with_optimizer(path).result()
        assert train(resumed, 1)[0] == pytest.approx(expected[3], rel=1e-5)
    except BaseException:
        with contextlib.suppress(Exception):  # the failure above is the one to report
            sc.close("success").result()
        raise
    sc.close("success").result()  # its re-created session ends as any other


def poll(url: str, request_id: str, timeout: float = 60) -> httpx.Response:
    """The first answer to a poll of `request_id` that is not try_again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = post(url, "retrieve_future", {"request_id": request_id})
        if r.headers["content-type"] != "application/json" or r.json().get("type") != "try_again":
            return r
    raise AssertionError(f"{request_id} never settled")


def ran(r: httpx.Response) -> bool:
    """A settled forward_backward that ran: its protobuf output, not an error."""
    return r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"


def new_model(url: str) -> str:
    """A model created over raw HTTP (seq_id 0 taken); its id."""
    session = post(url, "create_session", {"tags": [], "user_metadata": {}}).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": "tinkerd/tiny"}
    created = post(url, "create_model", {**body, "lora_config": {"rank": 8}}).json()
    assert "error" not in poll(url, created["request_id"]).json()
    return str(created["model_id"])


def test_a_request_lost_with_redis_before_reaching_its_worker_fails_clearly(
    cluster: Cluster,
) -> None:
    """A request still in the worker's Celery queue when Redis empties is lost with it: its poll
    answers why (not a bare unknown id), and the model's later requests still run."""
    url = cluster.url
    model_id = new_model(url)
    assert ran(poll(url, post(url, "forward_backward", forward(model_id, 1)).json()["request_id"]))

    worker = next(iter(cluster.workers.values()))
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(2)  # past Celery's blocking pop (1 s): the next message stays in its queue
        lost = post(url, "forward_backward", forward(model_id, 2)).json()["request_id"]
        empty_redis(cluster, "flushall")
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    answer = poll(url, lost, timeout=WORKER_TTL + 30)
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert "Redis came back empty" in error and "send it again" in error, error

    def known() -> bool:  # the worker wrote the model back
        return rdb(cluster).hget(PLACEMENT, model_id) is not None

    wait_until(known, 30, "the worker to write its model back")
    later = post(url, "forward_backward", forward(model_id, 3))
    assert later.status_code == 200, later.text
    assert ran(poll(url, later.json()["request_id"]))  # once seq_id 2 is skipped


def test_requests_held_by_the_worker_keep_their_futures(cluster: Cluster) -> None:
    """A request that reached its worker before Redis emptied keeps its future: polled after
    the workers have written everything back it is pending, not unknown; resent, it is the same
    request; and it runs in its turn."""
    url = cluster.url
    model_id = new_model(url)
    held = post(url, "forward_backward", forward(model_id, 2)).json()["request_id"]  # waits for 1

    def queued() -> bool:
        return next(iter(cluster.registered_workers().values()))["queue_depth"] >= 1

    wait_until(queued, 30, "the worker to hold the request")
    empty_redis(cluster, "flushall")
    time.sleep(WORKER_TTL + 1)  # past the time the workers have to write back what they hold
    r = post(url, "retrieve_future", {"request_id": held})
    assert r.status_code == 200 and r.json()["type"] == "try_again", r.text
    again = post(url, "forward_backward", forward(model_id, 2))
    assert again.json()["request_id"] == held  # a retry, not a second request
    first = post(url, "forward_backward", forward(model_id, 1)).json()["request_id"]
    assert ran(poll(url, first)) and ran(poll(url, held))


def test_a_simple_api_adapter_goes_on_under_its_name(cluster: Cluster) -> None:
    """The simple JSON API's adapters are written back with their names: the same calls go on
    (answered 503, try again, until the worker has written the adapter back)."""
    url, name = cluster.url, f"rebuilt-{time.monotonic_ns()}"

    def call(path: str, body: dict) -> dict:
        deadline = time.monotonic() + 30
        while (r := httpx.post(f"{url}{path}", json=body, timeout=60)).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(float(r.headers.get("Retry-After", 0.5)))
        assert r.status_code == 200, r.text
        return r.json()

    def step() -> float:
        fwd = call("/fwdbwd", {"model_id": name, "data": chat})
        call("/optim_step", {"model_id": name, "learning_rate": 1e-2})
        while (out := call("/retrieve_future", {"request_id": fwd["request_id"]})).get("type"):
            assert out["type"] == "try_again", out
        return out["loss"]

    chat = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]]
    run_id = call("/add_lora", {"model_id": name, "rank": 8})["training_run_id"]
    first = step()
    empty_redis(cluster, "flushall")
    second = step()
    assert second < first  # the same adapter, trained by the step before the outage
    listed = httpx.get(f"{url}/adapters", timeout=30).json()["adapters"]
    assert [a["training_run_id"] for a in listed if a["model_id"] == name] == [run_id]


def test_a_worker_stores_again_the_results_redis_lost(redis_url: str) -> None:
    """A result settled just before Redis emptied, not yet fetched, is stored again by its
    worker when it writes back what it holds."""
    client = connect(redis_url)
    worker = RedisFutures(client, 60, worker="w1")
    worker.settle("r1", Result(Kind.SAVE_WEIGHTS, {"ok": 1}))
    client.flushall()
    assert worker.get("r1") is None
    assert worker.rewrite_recent() == 1
    assert worker.get("r1") == Result(Kind.SAVE_WEIGHTS, {"ok": 1})
    assert worker.rewrite_recent() == 0  # already there: left alone
    client.close()
