"""Unit tests of tinkerd.cluster.scheduler against a real redis-server: placement, sequencing and
de-duplication across API processes, dispatch to the owning worker's Celery queue, and the reaper
of lost workers.

No worker process runs: a worker is its registration in Redis (written here as its heartbeat
writes it), and what would be delivered to it is read off its Celery queue, a Redis list.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis

from tinkerd.backends import BackendInfo
from tinkerd.cluster import codec
from tinkerd.cluster import scheduler as cluster_scheduler
from tinkerd.cluster.celery_app import make_celery, queue_task, take_undelivered
from tinkerd.cluster.keys import (
    PLACEMENT,
    WORKERS,
    inflight_key,
    pending_key,
    worker_key,
    worker_queue,
)
from tinkerd.cluster.reaper import Reaper
from tinkerd.cluster.scheduler import RedisScheduler, Unavailable
from tinkerd.cluster.state import RedisFutures, connect, lost_models, skip_seq
from tinkerd.local_cluster import RedisServer, wait_until
from tinkerd.results import Kind, Result
from tinkerd.sequencing import MAX_SEQ_AHEAD
from tinkerd.tasks import Scheduler
from tinkerd.types import (
    AdamParams,
    CreateModel,
    LoraConfig,
    NotFound,
    OptimStep,
    Rejected,
    Sample,
    SampleResult,
    SamplerWeights,
    SamplingParams,
    SaveWeights,
    ServerError,
    UserError,
    error_body,
)

pytestmark = pytest.mark.timeout(60)

MODEL = "sess:train:0"
BASE = "Qwen/Qwen3-8B"


@pytest.fixture
def new_scheduler(redis_url: str) -> Iterator[Callable[[], RedisScheduler]]:
    """Makes the RedisScheduler of another API process: its own client, futures and Celery."""
    made: list[tuple[redis.Redis, RedisFutures, Any]] = []

    def make() -> RedisScheduler:
        c = connect(redis_url)
        futures = RedisFutures(c, 60)
        app = make_celery(redis_url)
        made.append((c, futures, app))
        return RedisScheduler(c, app, futures)

    yield make
    for _, futures, _ in made:
        futures.close()
    for c, futures, app in made:
        if futures._listener is not None:  # let it leave its connection before closing it
            futures._listener.join(5)
        app.close()
        c.close()


@pytest.fixture
def scheduler(new_scheduler: Callable[[], RedisScheduler]) -> RedisScheduler:
    return new_scheduler()


def register(
    client: redis.Redis,
    name: str,
    ttl_ms: int = 60_000,
    memory_free: int = 0,
    base_models: tuple[str, ...] | list[str] = (),
    **fields: Any,
) -> None:
    """A live worker, as cluster/worker.py's heartbeat registers it: placement reads its
    backend's record (memory, base models)."""
    info = BackendInfo("fake", "cpu", "float32", tuple(base_models), 1 << 30, memory_free)
    registration = {
        "name": name,
        "queue": worker_queue(name),
        "models": [],
        "backend": info.to_json(),
        **fields,
    }
    pipe = client.pipeline(transaction=True)
    pipe.set(worker_key(name), json.dumps(registration), px=ttl_ms)
    pipe.sadd(WORKERS, name)
    pipe.execute()


def stop_heartbeat(client: redis.Redis, name: str) -> None:
    """The worker died: its registration lapses (it stays in the workers set for the reaper)."""
    client.delete(worker_key(name))


Delivery = tuple[str, str, str, int, Any]  # kind, request_id, key, seq_id, payload


def delivered(client: redis.Redis, worker: str) -> list[Delivery]:
    """Takes the messages off `worker`'s Celery queue, oldest first, as the task's arguments
    (less the tenant and priority)."""
    return [
        (kind, request_id, key, seq_id, codec.decode(payload))
        for kind, request_id, key, seq_id, payload, *_ in take_undelivered(client, worker)
    ]


def optim(lr: float) -> OptimStep:
    return OptimStep(AdamParams(learning_rate=lr))


def sample(weights: SamplerWeights, n: int = 1) -> Sample:
    return Sample(weights, np.array([1, 2, 3], dtype=np.int64), n, SamplingParams(max_tokens=4))


def open_and_create(sched: RedisScheduler, model_id: str = MODEL) -> str:
    """A new model as the API makes one: placed, then its creation as seq 0."""
    sched.open_model(model_id)
    return sched.submit(model_id, 0, CreateModel(BASE, LoraConfig(rank=8)), f"create-{model_id}")


def error_of(result: Result | None) -> dict[str, str]:
    assert result is not None, "the future should be settled"
    assert result.kind is Kind.ERROR, result
    return result.value


# -- placement -------------------------------------------------------------------------------


def test_open_model_places_on_the_worker_with_fewest_models(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    register(client, "w1", memory_free=10)
    register(client, "w2", memory_free=1)
    for i in range(4):
        scheduler.open_model(f"m{i}")
    # the most free memory breaks the tie while the counts are even
    assert [scheduler.worker_of(f"m{i}") for i in range(4)] == ["w1", "w2", "w1", "w2"]
    register(client, "w3", memory_free=0)
    scheduler.open_model("m4")
    scheduler.open_model("m5")
    assert scheduler.worker_of("m4") == "w3"
    assert scheduler.worker_of("m5") == "w3"
    scheduler.open_model("m6")
    assert scheduler.worker_of("m6") == "w1"


def test_open_model_ignores_workers_whose_registration_lapsed(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    register(client, "w1", memory_free=100)
    register(client, "w2", memory_free=1, ttl_ms=100)
    scheduler.open_model("m0")
    assert scheduler.worker_of("m0") == "w1"
    time.sleep(0.25)
    scheduler.open_model("m1")  # w2 had fewer models, but is gone
    assert scheduler.worker_of("m1") == "w1"


def test_open_model_twice_keeps_the_first_placement(
    client: redis.Redis, new_scheduler: Callable[[], RedisScheduler]
) -> None:
    one, two = new_scheduler(), new_scheduler()
    register(client, "w1", memory_free=5)
    one.open_model(MODEL)
    register(client, "w2", memory_free=50)  # now the better choice
    two.open_model(MODEL)  # a retried create in another API process
    assert one.worker_of(MODEL) == two.worker_of(MODEL) == "w1"


def test_open_model_with_no_live_worker_is_unavailable(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    with pytest.raises(Unavailable, match="no tinkerd worker") as info:
        scheduler.open_model(MODEL)
    assert info.value.status == 503
    assert error_body(info.value)["category"] == "server"
    register(client, "w1", ttl_ms=100)
    time.sleep(0.25)
    with pytest.raises(Unavailable):
        scheduler.open_model(MODEL)
    assert not scheduler.has_model(MODEL)
    assert client.hlen(PLACEMENT) == 0


def test_unknown_model_is_not_found(client: redis.Redis, scheduler: RedisScheduler) -> None:
    register(client, "w1")
    with pytest.raises(NotFound, match="unknown model_id"):
        scheduler.submit("nope:train:0", 0, optim(1e-4), "fp")
    assert not scheduler.has_model("nope:train:0")
    scheduler.open_model("nope:train:0")
    assert scheduler.has_model("nope:train:0")
    assert delivered(client, "w1") == []


# -- ordered submits -------------------------------------------------------------------------


def test_in_order_submits_reach_the_owning_worker(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    register(client, "w1", memory_free=1)
    register(client, "w2", memory_free=9)
    create = open_and_create(scheduler)
    assert scheduler.worker_of(MODEL) == "w2"
    ids = [create] + [scheduler.submit(MODEL, s, optim(s), f"fp{s}") for s in (1, 2, 3)]
    assert len(set(ids)) == 4
    assert delivered(client, "w1") == []
    assert delivered(client, "w2") == [
        ("ordered", ids[0], MODEL, 0, CreateModel(BASE, LoraConfig(rank=8))),
        ("ordered", ids[1], MODEL, 1, optim(1)),
        ("ordered", ids[2], MODEL, 2, optim(2)),
        ("ordered", ids[3], MODEL, 3, optim(3)),
    ]
    assert client.smembers(inflight_key("w2")) == {i.encode() for i in ids}


def test_submit_next_takes_consecutive_seq_ids_across_api_processes(
    client: redis.Redis, new_scheduler: Callable[[], RedisScheduler]
) -> None:
    register(client, "w1")
    first, second = new_scheduler(), new_scheduler()
    open_and_create(first)
    ids = [s.submit_next(MODEL, optim(i)) for i, s in enumerate([first, second, first, second])]
    assert len(set(ids)) == 4
    seqs = [(seq, payload) for _, _, _, seq, payload in delivered(client, "w1")]
    assert seqs[1:] == [(1, optim(0)), (2, optim(1)), (3, optim(2)), (4, optim(3))]


def test_out_of_order_submits_are_sent_at_once_and_sequenced_when_the_gap_fills(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    """The worker orders what arrives; Redis only tracks the lowest seq_id not yet taken."""
    register(client, "w1")
    open_and_create(scheduler)
    three = scheduler.submit(MODEL, 3, optim(3), "fp3")
    two = scheduler.submit(MODEL, 2, optim(2), "fp2")
    with pytest.raises(UserError, match="already at seq_id 1"):
        scheduler.submit(MODEL, -1, optim(0), "fpn")
    one = scheduler.submit(MODEL, 1, optim(1), "fp1")
    with pytest.raises(UserError, match="already at seq_id 4"):
        scheduler.submit(MODEL, -1, optim(0), "fpn")
    got = delivered(client, "w1")
    assert [(d[0], d[1], d[3], d[4]) for d in got[1:]] == [
        ("ordered", three, 3, optim(3)),
        ("ordered", two, 2, optim(2)),
        ("ordered", one, 1, optim(1)),
    ]
    assert scheduler.queue_depth() == 4


def test_retry_with_same_fingerprint_returns_same_request_and_sends_once(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    register(client, "w1")
    open_and_create(scheduler)
    first = scheduler.submit(MODEL, 2, optim(2), "fp2")  # ahead of 1: waits at the worker
    assert scheduler.submit(MODEL, 2, optim(2), "fp2") == first
    one = scheduler.submit(MODEL, 1, optim(1), "fp1")
    assert scheduler.submit(MODEL, 2, optim(2), "fp2") == first  # also once it is in the past
    assert scheduler.submit(MODEL, 1, optim(1), "fp1") == one
    assert [(d[1], d[3]) for d in delivered(client, "w1")[1:]] == [(first, 2), (one, 1)]
    assert scheduler.queue_depth() == 3


def test_same_seq_with_different_fingerprint_is_a_user_error(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    register(client, "w1")
    open_and_create(scheduler)
    scheduler.submit(MODEL, 2, optim(2), "fp2")
    with pytest.raises(UserError, match="seq_id 2 of .* already used"):
        scheduler.submit(MODEL, 2, optim(9), "different")
    scheduler.submit(MODEL, 1, optim(1), "fp1")
    with pytest.raises(UserError, match="seq_id 1"):
        scheduler.submit(MODEL, 1, optim(9), "different")
    with pytest.raises(UserError, match="seq_id 0"):
        scheduler.submit(MODEL, 0, CreateModel("other", LoraConfig()), "another")
    assert len(delivered(client, "w1")) == 3


def test_seq_id_past_the_retry_window_is_a_user_error(
    client: redis.Redis, scheduler: RedisScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster_scheduler, "RETRY_WINDOW", 3)
    register(client, "w1")
    open_and_create(scheduler)
    ids = {s: scheduler.submit(MODEL, s, optim(s), f"fp{s}") for s in range(1, 7)}
    # the last RETRY_WINDOW seq_ids are still remembered ...
    for s in (4, 5, 6):
        assert scheduler.submit(MODEL, s, optim(s), f"fp{s}") == ids[s]
    # ... older ones are forgotten and refused as past, with or without the same fingerprint
    for s in (0, 1, 2, 3):
        with pytest.raises(UserError, match="in the past: .* already at seq_id 7"):
            scheduler.submit(MODEL, s, optim(s), f"fp{s}")
    assert len(delivered(client, "w1")) == 7


def test_seq_id_too_far_ahead_is_a_user_error(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    register(client, "w1")
    open_and_create(scheduler)
    with pytest.raises(UserError, match="too far ahead of 1"):
        scheduler.submit(MODEL, 1 + MAX_SEQ_AHEAD + 1, optim(1), "far")
    assert len(delivered(client, "w1")) == 1
    edge = scheduler.submit(MODEL, 1 + MAX_SEQ_AHEAD, optim(1), "edge")  # as tasks.Scheduler
    assert [d[1] for d in delivered(client, "w1")] == [edge]


def test_two_api_processes_share_sequencing_and_dedup(
    client: redis.Redis, new_scheduler: Callable[[], RedisScheduler]
) -> None:
    one, two = new_scheduler(), new_scheduler()
    register(client, "w1", memory_free=2)
    register(client, "w2", memory_free=1)
    other = "sess:train:1"
    c0 = open_and_create(one)  # on w1
    o0 = open_and_create(two, other)  # on w2
    ids = {0: c0}
    ids[2] = two.submit(MODEL, 2, optim(2), "fp2")
    ids[1] = one.submit(MODEL, 1, optim(1), "fp1")
    assert two.submit(MODEL, 1, optim(1), "fp1") == ids[1]  # the SDK retried on another API
    assert one.submit(MODEL, 2, optim(2), "fp2") == ids[2]
    with pytest.raises(UserError):
        two.submit(MODEL, 1, optim(5), "clash")
    ids[4] = one.submit(MODEL, 4, optim(4), "fp4")
    ids[3] = two.submit(MODEL, 3, optim(3), "fp3")
    o1 = one.submit(other, 1, optim(7), "o1")
    with pytest.raises(UserError, match="already at seq_id 5"):
        two.submit(MODEL, -1, optim(0), "past")

    assert delivered(client, "w1") == [
        ("ordered", c0, MODEL, 0, CreateModel(BASE, LoraConfig(rank=8))),
        ("ordered", ids[2], MODEL, 2, optim(2)),
        ("ordered", ids[1], MODEL, 1, optim(1)),
        ("ordered", ids[4], MODEL, 4, optim(4)),
        ("ordered", ids[3], MODEL, 3, optim(3)),
    ]
    assert delivered(client, "w2") == [
        ("ordered", o0, other, 0, CreateModel(BASE, LoraConfig(rank=8))),
        ("ordered", o1, other, 1, optim(7)),
    ]
    assert one.queue_depth() == two.queue_depth() == 7


def test_a_result_settled_by_the_worker_reaches_any_api_process(
    client: redis.Redis, new_scheduler: Callable[[], RedisScheduler], redis_url: str
) -> None:
    one, two = new_scheduler(), new_scheduler()
    register(client, "w1")
    open_and_create(one)
    request_id = one.submit(MODEL, 1, Rejected({"error": "bad", "category": "user"}), "fp1")
    assert two.wait(request_id, 0.1) is None
    assert one.queue_depth() == 2
    worker = RedisFutures(connect(redis_url), 60, worker="w1")
    ((_, rid, _, _, payload),) = delivered(client, "w1")[1:]
    assert rid == request_id and payload == Rejected({"error": "bad", "category": "user"})
    worker.settle(rid, Result.failed({"error": "bad", "category": "user"}))
    assert two.wait(request_id, 5.0) == Result.failed({"error": "bad", "category": "user"})
    assert one.queue_depth() == 1
    with pytest.raises(NotFound):
        one.wait("no-such-request", 0.1)


# -- unordered submits (sampling) ------------------------------------------------------------


def test_submit_unordered_dedups_per_key_and_seq(
    client: redis.Redis, new_scheduler: Callable[[], RedisScheduler]
) -> None:
    one, two = new_scheduler(), new_scheduler()
    register(client, "w1", base_models=[BASE])
    weights = SamplerWeights(BASE)
    first = one.submit_unordered("sess:sample:0", 0, sample(weights), "fp0")
    assert two.submit_unordered("sess:sample:0", 0, sample(weights), "fp0") == first
    with pytest.raises(UserError, match="seq_id 0 of sess:sample:0"):
        two.submit_unordered("sess:sample:0", 0, sample(weights, n=2), "other")
    later = one.submit_unordered("sess:sample:0", 1, sample(weights), "fp1")
    elsewhere = two.submit_unordered("sess:sample:1", 0, sample(weights), "fp0")
    assert len({first, later, elsewhere}) == 3
    got = delivered(client, "w1")
    assert [(d[0], d[1], d[2], d[3]) for d in got] == [
        ("unordered", first, "sess:sample:0", 0),
        ("unordered", later, "sess:sample:0", 1),
        ("unordered", elsewhere, "sess:sample:1", 0),
    ]
    payload = got[0][4]
    assert isinstance(payload, Sample) and payload.weights == weights
    assert payload.prompt.dtype == np.int64 and payload.prompt.tolist() == [1, 2, 3]
    assert payload.params == SamplingParams(max_tokens=4)
    assert one.queue_depth() == 3


def test_snapshot_sampler_goes_to_the_worker_of_its_model(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    register(client, "w1", memory_free=2, base_models=[BASE])
    register(client, "w2", memory_free=1)
    open_and_create(scheduler, "sess:train:0")  # w1
    open_and_create(scheduler, "sess:train:1")  # w2
    snapshot = "sess:sample:7"
    save = SaveWeights(path=None, kind="sampler_weights", snapshot_id=snapshot)
    saved = scheduler.submit("sess:train:1", 1, save, "save")
    assert scheduler.worker_of(snapshot) == "w2"
    weights = SamplerWeights(BASE, snapshot_id=snapshot)
    request_id = scheduler.submit_unordered(snapshot, 0, sample(weights), "fp")
    assert [d[2] for d in delivered(client, "w1")] == ["sess:train:0"]
    w2 = delivered(client, "w2")
    assert w2[1] == ("ordered", saved, "sess:train:1", 1, save)
    assert w2[2][:4] == ("unordered", request_id, snapshot, 0)
    assert w2[2][4].weights == weights


def test_base_model_sample_prefers_a_worker_holding_the_base_then_the_least_busy(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    register(client, "w1", base_models=["other/model"])
    register(client, "w2", base_models=[BASE, "other/model"])
    register(client, "w3", base_models=[BASE])
    client.sadd(inflight_key("w2"), "busy-1", "busy-2")
    client.sadd(inflight_key("w3"), "busy-3")
    a = scheduler.submit_unordered("s:sample:0", 0, sample(SamplerWeights(BASE)), "a")
    assert [d[1] for d in delivered(client, "w3")] == [a]  # holds the base, least busy
    # nobody holds this base: the least busy worker takes it
    b = scheduler.submit_unordered("s:sample:1", 0, sample(SamplerWeights("new/base")), "b")
    assert [d[1] for d in delivered(client, "w1")] == [b]
    assert delivered(client, "w2") == []


def test_sampling_needs_a_live_worker_and_a_sample(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    with pytest.raises(Unavailable):
        scheduler.submit_unordered("s:sample:0", 0, sample(SamplerWeights(BASE)), "a")
    register(client, "w1")
    with pytest.raises(ServerError, match="unordered OptimStep"):
        scheduler.submit_unordered("s:sample:0", 0, optim(1), "a")  # type: ignore[arg-type]
    with pytest.raises(ServerError, match="gone"):  # a snapshot nobody saved
        scheduler.submit_unordered(
            "s:sample:9", 0, sample(SamplerWeights(BASE, snapshot_id="s:sample:9")), "a"
        )
    assert delivered(client, "w1") == []
    assert scheduler.queue_depth() == 0


def test_queue_depth_counts_requests_in_flight_at_registered_workers(
    client: redis.Redis, scheduler: RedisScheduler, redis_url: str
) -> None:
    assert scheduler.queue_depth() == 0
    register(client, "w1", memory_free=2, base_models=[BASE])
    register(client, "w2", memory_free=1)
    open_and_create(scheduler, "m1")
    open_and_create(scheduler, "m2")
    sampled = scheduler.submit_unordered("s:sample:0", 0, sample(SamplerWeights(BASE)), "a")
    assert scheduler.queue_depth() == 3
    w1 = RedisFutures(connect(redis_url), 60, worker="w1")
    w1.settle(sampled, Result(Kind.SAMPLE, SampleResult([])))
    assert scheduler.queue_depth() == 2


# -- tenants: pending counts and priorities --------------------------------------------------


def test_pending_is_shared_by_api_processes_until_a_worker_settles(
    client: redis.Redis, new_scheduler: Callable[[], RedisScheduler], redis_url: str
) -> None:
    one, two = new_scheduler(), new_scheduler()
    register(client, "w1", base_models=[BASE])
    one.open_model(MODEL)
    create = one.submit(MODEL, 0, CreateModel(BASE, LoraConfig()), "c", tenant="a", priority=3)
    step = two.submit_next(MODEL, optim(1), tenant="a", priority=3)
    sampled = two.submit_unordered("s:sample:0", 0, sample(SamplerWeights(BASE)), "s", tenant="a")
    other = one.submit_unordered("s:sample:1", 0, sample(SamplerWeights(BASE)), "s", tenant="b")
    assert one.submit(MODEL, 0, CreateModel(BASE, LoraConfig()), "c", tenant="a") == create
    assert one.pending("a") == two.pending("a") == 3  # the retry is not counted again
    assert (one.pending("b"), one.pending("c"), one.pending("")) == (1, 0, 0)

    worker = RedisFutures(connect(redis_url), 60, worker="w1")
    worker.settle(create, Result(Kind.CREATE_MODEL, {}), tenant="a")
    worker.settle_error(step, ServerError("failed"), None, tenant="a")
    assert two.pending("a") == 1
    worker.settle(sampled, Result(Kind.SAMPLE, SampleResult([])), tenant="a")
    worker.settle(other, Result(Kind.SAMPLE, SampleResult([])), tenant="b")
    assert one.pending("a") == one.pending("b") == 0


def test_pending_drops_requests_never_sent_or_failed_by_the_reaper(
    client: redis.Redis, scheduler: RedisScheduler, reaper: Reaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(client, "w1")
    open_and_create(scheduler, "m1")
    with monkeypatch.context() as m:  # the broker refuses: the request fails at once
        m.setattr(scheduler.celery, "send_task", lambda *a, **k: 1 / 0)
        unsent = scheduler.submit("m1", 1, optim(1), "fp1", tenant="a")
    assert "could not queue" in error_of(scheduler.wait(unsent, 0))["error"]
    assert scheduler.pending("a") == 0
    queued = [scheduler.submit("m1", s, optim(s), f"fp{s}", tenant="a") for s in (2, 3)]
    assert scheduler.pending("a") == 2
    reap(reaper, client, "w1")
    assert all("lost" in error_of(scheduler.wait(r, 1.0))["error"] for r in queued)
    assert scheduler.pending("a") == 0
    register(client, "w2")
    lost = scheduler.submit("m1", 4, optim(4), "fp4", tenant="a")  # answered at once: lost
    assert "lost" in error_of(scheduler.wait(lost, 0))["error"]
    assert scheduler.pending("a") == 0


def test_pending_forgets_entries_older_than_the_future_ttl(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    """A request whose settle never came (its settler crashed) stops counting once it is older
    than the future TTL, and the next submit trims it; an idle tenant's set expires."""
    register(client, "w1")
    scheduler.open_model(MODEL)
    scheduler.submit(MODEL, 0, CreateModel(BASE, LoraConfig()), "c", tenant="a")
    client.zadd(pending_key("a"), {"crashed": time.time() - scheduler.futures.ttl - 1})
    assert scheduler.pending("a") == 1
    scheduler.submit(MODEL, 1, optim(1), "fp1", tenant="a")
    assert scheduler.pending("a") == client.zcard(pending_key("a")) == 2
    assert 0 < client.ttl(pending_key("a")) <= scheduler.futures.ttl


def test_tenant_and_priority_ride_with_the_celery_message(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    register(client, "w1", base_models=[BASE])
    create = open_and_create(scheduler)
    step = scheduler.submit(MODEL, 1, optim(1), "fp1", tenant="team-a", priority=7)
    sampled = scheduler.submit_unordered(
        "s:sample:0", 0, sample(SamplerWeights(BASE)), "s", tenant="team-b", priority=2
    )
    assert not client.exists(pending_key(""))  # a server without keys counts nothing
    messages = take_undelivered(client, "w1")
    assert [(m[1], m[5], m[6]) for m in messages] == [
        (create, "", 0),
        (step, "team-a", 7),
        (sampled, "team-b", 2),
    ]
    worker = Scheduler()
    for args in messages:
        queue_task(worker, *args)
    kind, request_id, key, seq_id, payload = messages[1][:5]
    queue_task(worker, kind, "old-style", key, 2, payload)  # from an API without tenants
    taken = [t for tasks in worker.take_ready(0.0) for t in tasks]
    assert [(t.request_id, t.tenant, t.priority) for t in taken] == [
        (create, "", 0),
        (step, "team-a", 7),
        (sampled, "team-b", 2),
    ]
    assert taken[1].payload == optim(1) and isinstance(taken[2].payload, Sample)
    assert [(t.request_id, t.tenant, t.priority) for b in worker.take_ready(0.0) for t in b] == [
        ("old-style", "", 0)
    ]


# -- gaps that never fill ----------------------------------------------------------------------


def test_a_seq_id_never_sent_is_skipped_in_redis_and_answered_if_it_comes_late(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    """What a worker does with a gap Redis does not know once it has waited `seq_gap_seconds`:
    the seq_id is recorded as skipped and the model's sequence moves on past it."""
    register(client, "w1")
    open_and_create(scheduler)
    two = scheduler.submit(MODEL, 2, optim(2), "fp2")
    delivered(client, "w1")
    assert client.get(f"tinkerd:next:{MODEL}") == b"1"  # stuck at the missing 1
    skipped = skip_seq(client, MODEL, 1, "w1")
    assert skipped is not None and skipped != two
    assert client.get(f"tinkerd:next:{MODEL}") == b"3"
    assert client.sismember(inflight_key("w1"), skipped)  # the worker settles it in its turn
    # seq 1 arriving after all gets the skip's request (and its error), and is not sent
    assert scheduler.submit(MODEL, 1, optim(1), "fp1") == skipped
    assert delivered(client, "w1") == []
    assert skip_seq(client, MODEL, 1, "w1") is None  # taken: nothing to skip
    assert skip_seq(client, MODEL, 2, "w1") is None  # recorded: on its way to the worker
    assert scheduler.submit_next(MODEL, optim(3)) and delivered(client, "w1")[0][3] == 3


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop and start again."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def scheduler_on(own_redis: RedisServer) -> Iterator[Callable[[float], RedisScheduler]]:
    """Makes an API process's RedisScheduler on `own_redis`, with this `send_retry_seconds`."""
    made: list[RedisScheduler] = []

    def make(send_retry_seconds: float) -> RedisScheduler:
        c = connect(own_redis.url)
        made.append(
            RedisScheduler(c, make_celery(own_redis.url), RedisFutures(c, 60), send_retry_seconds)
        )
        return made[-1]

    yield make
    for sched in made:
        sched.outbox.stop()
        sched.futures.close()
        sched.celery.close()


def stop_redis_before_sending(own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis stops after the submit script recorded the request and before Celery sends it."""
    real_send = cluster_scheduler.send

    def redis_stops_first(*args: Any) -> None:
        own_redis.stop()
        real_send(*args)

    monkeypatch.setattr(cluster_scheduler, "send", redis_stops_first)


def test_a_request_recorded_when_redis_stopped_is_sent_once_redis_is_back(
    own_redis: RedisServer, scheduler_on: Callable[[float], RedisScheduler], monkeypatch
) -> None:
    sched = scheduler_on(60)
    register(sched.redis, "w1")
    open_and_create(sched)
    delivered(sched.redis, "w1")
    stop_redis_before_sending(own_redis, monkeypatch)
    request_id = sched.submit(MODEL, 1, optim(1), "fp1")  # recorded: the client polls for it
    monkeypatch.undo()
    assert sched.outbox.held() == 1
    time.sleep(1.5)  # the outbox tries meanwhile, in vain
    own_redis.start()
    started = time.monotonic()
    wait_until(lambda: sched.outbox.held() == 0, 10, "the outbox to send the request")
    assert time.monotonic() - started < 5
    assert delivered(sched.redis, "w1") == [("ordered", request_id, MODEL, 1, optim(1))]
    assert sched.wait(request_id, 0.0) is None  # pending at its worker, not failed
    assert sched.submit(MODEL, 1, optim(1), "fp1") == request_id


@pytest.mark.parametrize("kind", ["ordered", "unordered"])
def test_a_request_held_past_send_retry_seconds_fails_with_the_true_reason(
    own_redis: RedisServer,
    scheduler_on: Callable[[float], RedisScheduler],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    sched = scheduler_on(0.5)
    register(sched.redis, "w1", base_models=[BASE])
    open_and_create(sched)
    delivered(sched.redis, "w1")
    stop_redis_before_sending(own_redis, monkeypatch)
    if kind == "ordered":
        request_id = sched.submit(MODEL, 1, optim(1), "fp1")
    else:
        request_id = sched.submit_unordered("k", 0, sample(SamplerWeights(BASE)), "s")
    monkeypatch.undo()
    time.sleep(1.5)
    own_redis.start()
    wait_until(lambda: sched.outbox.held() == 0, 10, "the outbox to fail the request")
    reason = "could not be sent to worker w1: Redis was unreachable for"
    if kind == "ordered":  # to its worker as a rejected request, settled in the model's order
        [(sent_kind, sent_id, key, seq_id, payload)] = delivered(sched.redis, "w1")
        assert (sent_kind, sent_id, key, seq_id) == ("ordered", request_id, MODEL, 1)
        assert isinstance(payload, Rejected) and payload.error["category"] == "server"
        assert reason in payload.error["error"]
    else:  # a sample has no order to keep: it fails at once
        assert reason in error_of(sched.wait(request_id, 1.0))["error"]
        assert not sched.redis.sismember(inflight_key("w1"), request_id)
        assert delivered(sched.redis, "w1") == []


# -- the reaper ------------------------------------------------------------------------------

INTERVAL = 0.2


def next_round() -> None:
    """Let a reaper round's interval (and its lock) pass."""
    time.sleep(INTERVAL * 1.3)


@pytest.fixture
def reaper(client: redis.Redis, scheduler: RedisScheduler) -> Reaper:
    return Reaper(client, scheduler.futures, INTERVAL)


def test_a_worker_is_reaped_only_after_missing_two_rounds(
    client: redis.Redis, reaper: Reaper
) -> None:
    register(client, "w1")
    register(client, "w2")
    assert reaper.reap_once() == []
    next_round()
    stop_heartbeat(client, "w1")
    assert reaper.reap_once() == []  # missing once: a suspect (Redis may have restarted)
    assert client.sismember(WORKERS, "w1")
    next_round()
    assert reaper.reap_once() == ["w1"]
    assert not client.sismember(WORKERS, "w1")
    next_round()
    assert reaper.reap_once() == []


def test_a_worker_back_between_rounds_is_not_reaped(client: redis.Redis, reaper: Reaper) -> None:
    register(client, "w1", ttl_ms=100)
    time.sleep(0.2)
    assert reaper.reap_once() == []
    register(client, "w1")  # its heartbeat came back
    next_round()
    assert reaper.reap_once() == []
    stop_heartbeat(client, "w1")
    next_round()
    assert reaper.reap_once() == []  # missing again: a suspect anew, not lost yet
    next_round()
    assert reaper.reap_once() == ["w1"]


def test_one_reaper_round_at_a_time_across_api_processes(
    client: redis.Redis, scheduler: RedisScheduler, redis_url: str
) -> None:
    other_client = connect(redis_url)
    try:
        one = Reaper(client, scheduler.futures, INTERVAL)
        two = Reaper(other_client, scheduler.futures, INTERVAL)
        register(client, "w1")
        stop_heartbeat(client, "w1")
        assert one.reap_once() == []
        assert two.reap_once() == []  # locked out of this round
        next_round()
        assert one.reap_once() == ["w1"]
        two.reap("w1")  # another process that also saw it missing: nothing left to do
        assert lost_models(client) == {}
    finally:
        other_client.close()


def reap(reaper: Reaper, client: redis.Redis, name: str) -> None:
    stop_heartbeat(client, name)
    reaper.reap_once()
    next_round()
    assert reaper.reap_once() == [name]


def test_reaped_worker_fails_its_requests_and_loses_its_models(
    client: redis.Redis, scheduler: RedisScheduler, reaper: Reaper
) -> None:
    register(client, "w1", memory_free=2, base_models=[BASE])
    register(client, "w2", memory_free=1)
    create = open_and_create(scheduler, "m1")  # w1
    open_and_create(scheduler, "m2")  # w2
    sampling = scheduler.submit_unordered("s:sample:9", 0, sample(SamplerWeights(BASE)), "s")
    running = scheduler.submit("m1", 1, optim(1), "fp1")
    waiting = scheduler.submit("m1", 3, optim(3), "fp3")
    snapshot = "s:sample:0"
    scheduler.submit("m1", 2, SaveWeights(None, "sampler_weights", snapshot_id=snapshot), "fp2")
    created = Result(Kind.CREATE_MODEL, {"created": True})
    scheduler.futures.settle(create, created, "w1")  # done before the loss

    reap(reaper, client, "w1")

    for request_id in (running, waiting, sampling):
        body = error_of(scheduler.wait(request_id, 1.0))
        assert body["category"] == "server"
        assert "w1" in body["error"] and "lost" in body["error"]
    assert scheduler.wait(create, 1.0) == created  # not overwritten
    assert client.scard(inflight_key("w1")) == 0
    lost = lost_models(client)
    assert set(lost) == {"m1", snapshot}
    assert "w1" in lost["m1"] and "checkpoint" in lost["m1"]
    assert scheduler.worker_of("m1") is None and scheduler.worker_of(snapshot) is None
    assert scheduler.has_model("m1")
    assert scheduler.worker_of("m2") == "w2"
    assert scheduler.queue_depth() == 1  # m2's creation; the reaped worker counts no more
    scheduler.open_model("m3")
    assert scheduler.worker_of("m3") == "w2"


def test_submit_to_a_lost_model_returns_an_already_failed_request(
    client: redis.Redis, scheduler: RedisScheduler, reaper: Reaper
) -> None:
    register(client, "w1")
    open_and_create(scheduler, "m1")
    before = scheduler.submit("m1", 1, optim(1), "fp1")
    reap(reaper, client, "w1")
    register(client, "w2")
    delivered(client, "w1")

    request_id = scheduler.submit("m1", 2, optim(2), "fp2")
    body = error_of(scheduler.wait(request_id, 0.0))
    assert body == {"error": lost_models(client)["m1"], "category": "server"}
    assert scheduler.submit("m1", 2, optim(2), "fp2") == request_id  # a retry: same answer
    assert scheduler.submit("m1", 1, optim(1), "fp1") == before  # failed by the reaper
    assert "w1" in error_of(scheduler.wait(before, 0.0))["error"]
    with pytest.raises(UserError):
        scheduler.submit("m1", 2, optim(9), "clash")
    assert delivered(client, "w1") == delivered(client, "w2") == []
    assert scheduler.queue_depth() == 0


def test_sampling_a_snapshot_of_a_lost_model_is_a_server_error(
    client: redis.Redis, scheduler: RedisScheduler, reaper: Reaper
) -> None:
    register(client, "w1")
    open_and_create(scheduler, "m1")
    snapshot = "s:sample:0"
    scheduler.submit("m1", 1, SaveWeights(None, "sampler_weights", snapshot_id=snapshot), "s")
    reap(reaper, client, "w1")
    register(client, "w2")
    with pytest.raises(ServerError, match="lost with worker w1"):
        scheduler.submit_unordered(
            snapshot, 0, sample(SamplerWeights(BASE, snapshot_id=snapshot)), "fp"
        )
    assert delivered(client, "w2") == []


def test_worker_reaped_while_a_submit_is_under_way(
    client: redis.Redis,
    scheduler: RedisScheduler,
    reaper: Reaper,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The placement was read, then the worker was reaped before the submit script ran: the
    script sees the worker gone and the request settles at once with the lost error."""
    register(client, "w1")
    open_and_create(scheduler, "m1")
    delivered(client, "w1")
    stop_heartbeat(client, "w1")
    reaper.reap_once()
    next_round()
    read_placement = scheduler.worker_of

    def placement_then_reap(model_id: str) -> str | None:
        owner = read_placement(model_id)
        assert reaper.reap_once() == ["w1"]  # another API process's reaper, just then
        return owner

    monkeypatch.setattr(scheduler, "worker_of", placement_then_reap)
    request_id = scheduler.submit("m1", 1, optim(1), "fp1")
    monkeypatch.undo()

    body = error_of(scheduler.wait(request_id, 0.0))
    assert body["category"] == "server"
    assert body["error"] == lost_models(client)["m1"]
    assert scheduler.submit("m1", 1, optim(1), "fp1") == request_id  # recorded, de-duplicated
    assert delivered(client, "w1") == []
    assert not client.sismember(inflight_key("w1"), request_id)


def test_submit_racing_the_reaper_before_it_marks_models_lost(
    client: redis.Redis, scheduler: RedisScheduler
) -> None:
    """The reaper has taken the worker out of the set but not yet written the lost models: the
    request still settles at once, with a generic lost error."""
    register(client, "w1")
    open_and_create(scheduler, "m1")
    delivered(client, "w1")
    client.srem(WORKERS, "w1")  # the reaper's first step
    request_id = scheduler.submit("m1", 1, optim(1), "fp1")
    body = error_of(scheduler.wait(request_id, 0.0))
    assert body == {"error": "its worker was lost", "category": "server"}
    assert delivered(client, "w1") == []
    assert not client.sismember(inflight_key("w1"), request_id)
