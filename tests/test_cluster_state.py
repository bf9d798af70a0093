"""Unit tests of tinkerd.cluster.state against a real redis-server: futures in Redis (settle, wait,
expiry, surviving a Redis restart), the registry's records, and worker registrations."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from tinkerd.cluster.keys import WORKERS, inflight_key, request_key, result_key, worker_key
from tinkerd.cluster.state import RedisFutures, RedisRecords, connect, live_workers
from tinkerd.local_cluster import RedisServer, wait_until
from tinkerd.registry import ModelRecord, Registry, SamplerRecord
from tinkerd.results import Kind, Result
from tinkerd.types import (
    ForwardBackwardResult,
    LoraConfig,
    NotFound,
    SamplerWeights,
    ServerError,
)

pytestmark = pytest.mark.timeout(60)

MakeFutures = Callable[..., RedisFutures]
DONE = Result(Kind.REMOVE_MODEL, {})


@pytest.fixture
def make_futures(redis_url: str) -> Iterator[MakeFutures]:
    """RedisFutures over a client of its own, as in a separate process; closed after the test."""
    made: list[tuple[redis.Redis, RedisFutures]] = []

    def make(ttl: float = 60.0, worker: str | None = None, url: str = redis_url) -> RedisFutures:
        c = connect(url)
        futures = RedisFutures(c, ttl, worker=worker)
        made.append((c, futures))
        return futures

    yield make
    for _, futures in made:
        futures.close()
    for c, futures in made:
        if futures._listener is not None:  # let it leave its connection before closing it
            futures._listener.join(5)
        c.close()


def submitted(client: redis.Redis, request_id: str, worker: str = "w1") -> str:
    """Record a request as the submit scripts do: known, and in flight at `worker`."""
    client.set(request_key(request_id), worker, ex=3600)
    client.sadd(inflight_key(worker), request_id)
    return request_id


def register(client: redis.Redis, name: str, ttl_ms: int = 60_000, **fields: object) -> None:
    """A worker registration as cluster/worker.py's heartbeat writes it."""
    registration = {"name": name, "queue": f"tinkerd.worker.{name}", **fields}
    pipe = client.pipeline(transaction=True)
    pipe.set(worker_key(name), json.dumps(registration), px=ttl_ms)
    pipe.sadd(WORKERS, name)
    pipe.execute()


# -- futures ---------------------------------------------------------------------------------


def test_settle_then_get_and_wait(client: redis.Redis, make_futures: MakeFutures) -> None:
    futures = make_futures()
    rid = submitted(client, "r1")
    assert futures.get(rid) is None
    logprobs = np.array([-0.5, np.nan, -2.25], np.float32)
    result = Result(Kind.FORWARD_BACKWARD, ForwardBackwardResult([{"logprobs": logprobs}], {}))
    futures.settle(rid, result)

    def check(got: Result | None) -> None:
        assert got is not None and got.kind is Kind.FORWARD_BACKWARD
        [outputs] = got.forward_backward().loss_fn_outputs
        assert outputs["logprobs"].dtype == np.float32
        np.testing.assert_array_equal(outputs["logprobs"], logprobs)

    check(futures.get(rid))
    start = time.monotonic()
    check(futures.wait(rid, 10.0))
    check(futures.wait(rid, 10.0))  # the SDK may poll again
    assert time.monotonic() - start < 1.0
    assert futures.waiting() == 0


def test_wait_wakes_when_another_process_settles(
    client: redis.Redis, make_futures: MakeFutures
) -> None:
    api, worker = make_futures(), make_futures(worker="w1")
    rid = submitted(client, "r1")
    got: list[Result | None] = []
    waiters = [threading.Thread(target=lambda: got.append(api.wait(rid, 20.0))) for _ in range(3)]
    for t in waiters:
        t.start()
    wait_until(lambda: api.waiting() == 3, 5, "the waiters")
    start = time.monotonic()
    worker.settle(rid, Result(Kind.SAVE_WEIGHTS, {"ok": 1}))
    for t in waiters:
        t.join(15)
    assert got == [Result(Kind.SAVE_WEIGHTS, {"ok": 1})] * 3
    assert time.monotonic() - start < 5.0
    assert api.waiting() == 0


def test_waiter_is_not_woken_by_another_request(
    client: redis.Redis, make_futures: MakeFutures
) -> None:
    api, worker = make_futures(), make_futures(worker="w1")
    mine, other = submitted(client, "mine"), submitted(client, "other")
    timer = threading.Timer(0.1, worker.settle, (other, DONE))
    timer.start()
    try:
        assert api.wait(mine, 0.8) is None
    finally:
        timer.join()
    assert api.get(other) == DONE


def test_wait_times_out_with_none(client: redis.Redis, make_futures: MakeFutures) -> None:
    futures = make_futures()
    rid = submitted(client, "r1")
    start = time.monotonic()
    assert futures.wait(rid, 0.3) is None
    assert 0.25 <= time.monotonic() - start < 3.0
    assert futures.waiting() == 0
    assert futures.wait(rid, 0.0) is None


def test_wait_for_unknown_request_is_not_found(make_futures: MakeFutures) -> None:
    with pytest.raises(NotFound, match="unknown request_id"):
        make_futures().wait("no-such-request", 0.1)


def test_settle_removes_the_request_from_its_workers_inflight(
    client: redis.Redis, make_futures: MakeFutures
) -> None:
    worker = make_futures(worker="w1")
    a, b = submitted(client, "a"), submitted(client, "b")
    c = submitted(client, "c", worker="w2")
    worker.settle(a, DONE)
    assert client.smembers(inflight_key("w1")) == {b.encode()}
    worker.settle(c, DONE, worker="w2")  # the reaper settles for another worker
    assert client.smembers(inflight_key("w2")) == set()
    worker.settle_error(b, ServerError("boom"), "w1")
    assert client.smembers(inflight_key("w1")) == set()
    body = worker.get(b)
    assert body is not None and body.value == {"error": "boom", "category": "server"}
    assert body.kind is Kind.ERROR


def test_results_expire_after_their_ttl(client: redis.Redis, make_futures: MakeFutures) -> None:
    futures = make_futures(ttl=1)
    rid = submitted(client, "r1")
    futures.settle(rid, DONE)
    assert futures.get(rid) == DONE
    assert 0 < client.pttl(result_key(rid)) <= 1000
    wait_until(lambda: futures.get(rid) is None, 5, "the result to expire")
    assert client.exists(request_key(rid))  # the request record outlives its result


def test_late_poll_after_expiry_is_not_found(
    client: redis.Redis, make_futures: MakeFutures
) -> None:
    """Like tasks.FutureStore, a poll for an expired result is told so (NotFound), instead of
    "still pending" until the 7-day request record expires."""
    futures = make_futures(ttl=1, worker="w1")
    rid = submitted(client, "r1")
    futures.settle(rid, DONE)
    wait_until(lambda: futures.get(rid) is None, 5, "the result to expire")
    try:
        got: object = futures.wait(rid, 0.2)
    except NotFound as e:
        got = e
    assert isinstance(got, NotFound), (
        "BUG state.RedisFutures.wait: a request whose result expired reads as pending "
        f"(returned {got!r}), so retrieve_future answers try_again for up to REQUEST_TTL"
    )


class RestartableRedis:
    """A redis-server of the test's own, that can be stopped and started again on the same
    port and directory (its append-only file brings the data back)."""

    def __init__(self, directory: Path) -> None:
        self.server = RedisServer(directory).start()
        self.url = self.server.url

    def stop(self) -> None:
        self.server.stop()

    def start_again(self) -> None:
        self.server = RedisServer(self.server.directory, port=self.server.port).start()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path / "redis")
    yield server
    server.stop()


def test_result_settled_while_redis_is_down_is_flushed_after_restart(
    own_redis: RestartableRedis, make_futures: MakeFutures
) -> None:
    client = connect(own_redis.url)
    worker = make_futures(worker="w1", url=own_redis.url)
    rid = submitted(client, "r1")
    client.close()
    own_redis.stop()
    result = Result(Kind.OPTIM_STEP, {"loss": 1.5})
    worker.settle(rid, result)  # kept, not raised
    assert worker.flush() == 1  # still down
    own_redis.start_again()
    assert worker.flush() == 0
    assert worker.get(rid) == result
    check = connect(own_redis.url)
    try:
        assert check.smembers(inflight_key("w1")) == set()
        assert check.ttl(result_key(rid)) > 0
    finally:
        check.close()


def test_waiter_gets_its_result_across_a_redis_restart(
    own_redis: RestartableRedis, make_futures: MakeFutures
) -> None:
    client = connect(own_redis.url)
    rid = submitted(client, "r1")
    client.close()
    api = make_futures(url=own_redis.url)
    got: list[Result | None] = []
    waiter = threading.Thread(target=lambda: got.append(api.wait(rid, 30.0)))
    waiter.start()
    wait_until(lambda: api.waiting() == 1, 5, "the waiter")
    own_redis.stop()
    time.sleep(1.5)  # the listener notices and keeps trying
    own_redis.start_again()
    assert api.get(rid) is None  # the request record came back from the append-only file
    start = time.monotonic()
    after = Result(Kind.SAVE_WEIGHTS, {"after": "restart"})
    make_futures(worker="w1", url=own_redis.url).settle(rid, after)
    waiter.join(20)
    assert got == [after]
    assert time.monotonic() - start < 10.0
    # and the listener is back on the channel for the next request too
    client = connect(own_redis.url)
    rid2 = submitted(client, "r2")
    client.close()
    timer = threading.Timer(0.2, api.settle, (rid2, DONE, "w1"))
    timer.start()
    try:
        start = time.monotonic()
        assert api.wait(rid2, 20.0) == DONE
        assert time.monotonic() - start < 5.0
    finally:
        timer.join()


# -- records and the registry over them ------------------------------------------------------


def test_records_get_put_add_values(client: redis.Redis, redis_url: str) -> None:
    records = RedisRecords(client)
    assert records.get("model", "m1") is None
    assert records.values("model") == []
    records.put("model", "m1", {"a": 1, "nested": {"b": [1, 2]}})
    assert records.get("model", "m1") == {"a": 1, "nested": {"b": [1, 2]}}
    records.put("model", "m1", {"a": 2})  # put replaces
    assert records.get("model", "m1") == {"a": 2}
    assert records.add("model", "m1", {"a": 3}) == {"a": 2}  # add keeps what is there
    assert records.add("model", "m2", {"a": 4}) == {"a": 4}
    assert sorted(r["a"] for r in records.values("model")) == [2, 4]
    assert records.get("session", "m1") is None  # kinds are apart
    other = connect(redis_url)  # another API process
    try:
        assert RedisRecords(other).get("model", "m2") == {"a": 4}
    finally:
        other.close()


def model_record(model_id: str, session_id: str, **changes: object) -> ModelRecord:
    fields: dict[str, object] = {
        "model_id": model_id,
        "session_id": session_id,
        "base_model": "Qwen/Qwen3-8B",
        "tokenizer_id": "Qwen/Qwen3-8B",
        "lora": LoraConfig(rank=8, seed=3),
        "user_metadata": {"k": "v"},
        **changes,
    }
    return ModelRecord(**fields)  # type: ignore[arg-type]


def test_registry_is_shared_by_api_processes(redis_url: str) -> None:
    one = Registry(records=RedisRecords(connect(redis_url)))
    two = Registry(records=RedisRecords(connect(redis_url)))

    session = one.create_session(["tag"], {"user": "x"})
    seen = two.session(session.session_id)
    assert seen == session
    with pytest.raises(NotFound):
        two.session("nope")

    time.sleep(0.01)
    beat = two.heartbeat(session.session_id)
    assert beat.last_heartbeat > session.last_heartbeat
    assert one.session(session.session_id).last_heartbeat == beat.last_heartbeat
    one.finish_session(session.session_id, "success")
    assert two.session(session.session_id).finished == "success"
    after = two.heartbeat(session.session_id)  # a finished session is not touched again
    assert after.last_heartbeat == beat.last_heartbeat

    model_id = f"{session.session_id}:train:0"
    first = model_record(model_id, session.session_id)
    assert one.add_model(first) == first
    retry = model_record(model_id, session.session_id, created_at=first.created_at + 5)
    assert two.add_model(retry) == first  # a retried create gets the first record
    assert two.model(model_id) == first
    assert one.run(model_id) == first
    assert [m.model_id for m in two.models()] == [model_id]
    assert [r.model_id for r in one.runs()] == [model_id]
    touched = two.touch_model(model_id)
    assert one.model(model_id).last_request_time == touched.last_request_time

    sampler_id = f"{session.session_id}:sample:0"
    weights = SamplerWeights("Qwen/Qwen3-8B", snapshot_id=sampler_id)
    sampler = SamplerRecord(sampler_id, session.session_id, weights)
    assert one.add_sampler(sampler) == sampler
    other = SamplerRecord(sampler_id, session.session_id, SamplerWeights("other"))
    assert two.add_sampler(other) == sampler
    assert two.sampler(sampler_id).weights == weights


def test_live_workers_ignores_expired_registrations(client: redis.Redis) -> None:
    assert live_workers(client) == {}
    register(client, "w1", memory_free=5)
    register(client, "w2", ttl_ms=150)
    assert set(live_workers(client)) == {"w1", "w2"}
    time.sleep(0.3)
    assert live_workers(client) == {
        "w1": {"name": "w1", "queue": "tinkerd.worker.w1", "memory_free": 5}
    }
    assert client.sismember(WORKERS, "w2")  # still registered until the reaper takes it
    client.set(worker_key("stray"), "{}")  # a registration outside the set is not a worker
    assert set(live_workers(client)) == {"w1"}
