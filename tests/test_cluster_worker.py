"""`tinkerd worker`'s own duties, in process against a real Redis: its registration, the
requests an API process recorded but died before sending (they fail; the model goes on), and
each tenant's pending count as the worker settles."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tinkerd.cluster import worker as cluster_worker
from tinkerd.cluster.celery_app import make_celery, queue_task, take_undelivered
from tinkerd.cluster.scheduler import RedisScheduler
from tinkerd.cluster.state import RedisFutures, connect, live_workers
from tinkerd.cluster.worker import WorkerProcess
from tinkerd.config import Settings
from tinkerd.results import Kind
from tinkerd.types import CreateModel, Datum, ForwardBackward, LoraConfig
from tinkerd.wire.decode import make_forward_backward

MODEL = "s:train:0"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def worker(redis_url: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    settings = Settings.load(redis_url=redis_url, data_dir=tmp_path, device="cpu", worker_name="wg")
    process = WorkerProcess(settings)
    process.heartbeat()
    yield process
    process.celery.close()
    process.redis.close()


@pytest.fixture
def api(redis_url: str) -> Iterator[RedisScheduler]:
    client = connect(redis_url)
    futures = RedisFutures(client, 60)
    yield RedisScheduler(client, make_celery(redis_url), futures)
    futures.close()


def deliver(worker: WorkerProcess) -> None:
    """What Celery does: the worker's queued messages onto its local scheduler (newest first:
    the worker orders them)."""
    for args in reversed(take_undelivered(worker.redis, worker.name)):
        queue_task(worker.scheduler, *args)


def forward() -> ForwardBackward:
    tokens = np.array([5, 17, 42, 99], dtype=np.int64)
    inputs = {"target_tokens": np.array([17, 42, 99, 7], dtype=np.int64),
              "weights": np.ones(4, dtype=np.float32)}  # fmt: skip
    return make_forward_backward([Datum(tokens, inputs)], "cross_entropy", {}, False)


def test_registration_describes_the_worker(worker: WorkerProcess) -> None:
    registered = live_workers(worker.redis)["wg"]
    assert registered["device"] == "cpu" and registered["models"] == []
    assert registered["memory_total"] > 0 and registered["queue"] == "tinkerd.worker.wg"
    assert json.loads(worker.redis.get("tinkerd:worker:wg"))["pid"] == registered["pid"]


def test_a_request_recorded_but_never_sent_fails_and_the_model_goes_on(
    worker: WorkerProcess, api: RedisScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.open_model(MODEL)
    create = CreateModel("tinkerd/tiny", LoraConfig(rank=4, seed=0))
    created = api.submit(MODEL, 0, create, "c", tenant="a", priority=2)
    with monkeypatch.context() as m:  # the API process dies between recording and sending
        m.setattr(api, "_send", lambda *args: None)
        lost = api.submit(MODEL, 1, forward(), "f1", tenant="a", priority=2)
    after = api.submit(MODEL, 2, forward(), "f2", tenant="a", priority=2)
    deliver(worker)
    assert api.pending("a") == 3
    worker.worker.run_cycle(timeout=1)
    assert api.wait(created, 1) is not None and api.wait(after, 0.1) is None
    assert api.pending("a") == 2  # the creation settled; the other two wait for seq 1

    monkeypatch.setattr(cluster_worker, "GAP_SECONDS", 0.0)
    assert worker.fill_gaps() == [lost]
    worker.worker.run_cycle(timeout=1)
    error = api.wait(lost, 1).value
    assert error["category"] == "server" and "never reached worker wg" in error["error"]
    assert api.wait(after, 1).kind is Kind.FORWARD_BACKWARD  # it ran
    assert api.pending("a") == 0

    # a gap Redis does not know is a request not sent yet: it stays open
    later = api.submit(MODEL, 4, forward(), "f4")
    deliver(worker)
    assert worker.fill_gaps() == []
    worker.worker.run_cycle(timeout=0.1)
    assert api.wait(later, 0.1) is None


def test_a_seq_id_never_sent_is_skipped_after_seq_gap_seconds(
    worker: WorkerProcess, api: RedisScheduler, caplog: pytest.LogCaptureFixture
) -> None:
    """A seq_id Redis never recorded (the client never sent it, or the API refused it before
    recording it) holds the model's later requests `seq_gap_seconds`, counted from when the
    worker first sees the gap: then it is skipped in Redis and here, and logged."""
    api.open_model(MODEL)
    created = api.submit(MODEL, 0, CreateModel("tinkerd/tiny", LoraConfig(rank=4, seed=0)), "c")
    after = api.submit(MODEL, 2, forward(), "f2")
    deliver(worker)
    worker.worker.run_cycle(timeout=1)
    assert api.wait(created, 1) is not None
    worker.settings.seq_gap_seconds = 0.5
    assert worker.fill_gaps() == []  # first seen now
    time.sleep(0.6)
    with caplog.at_level("WARNING", logger="tinkerd.cluster.worker"):
        [skipped] = worker.fill_gaps()
    assert f"model {MODEL}: seq_id 1 never arrived" in caplog.text
    worker.worker.run_cycle(timeout=1)
    assert api.wait(after, 1).kind is Kind.FORWARD_BACKWARD  # it ran
    error = api.wait(skipped, 1).value
    assert error["category"] == "user" and f"seq_id 1 of {MODEL} never arrived" in error["error"]
    assert api.submit(MODEL, 1, forward(), "f1") == skipped  # late: the skip's answer
    assert take_undelivered(worker.redis, worker.name) == []


def test_a_restarted_worker_reports_its_earlier_models_lost(
    worker: WorkerProcess, api: RedisScheduler, redis_url: str, tmp_path: Path
) -> None:
    api.open_model(MODEL)
    created = api.submit(MODEL, 0, CreateModel("tinkerd/tiny", LoraConfig(rank=4, seed=0)), "c")
    settings = Settings.load(redis_url=redis_url, data_dir=tmp_path, device="cpu", worker_name="wg")
    again = WorkerProcess(settings)  # the same name, a new process: the old one's models are gone
    try:
        again.take_over_name()
        error = api.wait(created, 1).value
        assert error["category"] == "server" and "wg was lost" in error["error"]
        assert api.model_status(MODEL)["status"] == "lost"
        assert worker.redis.llen("tinkerd.worker.wg") == 0  # nothing left for the new process
        later = api.wait(api.submit(MODEL, 1, forward(), "f1"), 1).value
        assert "was lost with worker wg" in later["error"]
    finally:
        again.celery.close()
        again.redis.close()


def test_a_draining_worker_runs_what_celery_had_not_delivered(
    worker: WorkerProcess, api: RedisScheduler
) -> None:
    """After Celery's warm shutdown the queue may still hold requests for this worker's
    models, which live nowhere else: the drain runs them rather than leave them to the reaper."""
    api.open_model(MODEL)
    create = CreateModel("tinkerd/tiny", LoraConfig(rank=4, seed=0))
    created = api.submit(MODEL, 0, create, "c", tenant="a")
    steps = [api.submit(MODEL, i, forward(), f"f{i}", tenant="a") for i in range(1, 4)]
    waiting = api.submit(MODEL, 5, forward(), "f5", tenant="a")  # seq 4 never comes
    assert api.pending("a") == 5
    worker.worker.start()
    worker.drain()
    assert worker.redis.llen("tinkerd.worker.wg") == 0
    assert api.wait(created, 1) is not None
    for step in steps:
        assert api.wait(step, 1).kind is Kind.FORWARD_BACKWARD
    assert "shut down" in api.wait(waiting, 1).value["error"]
    assert api.pending("a") == 0
    assert "wg" not in live_workers(worker.redis)  # its registration went at the end


def test_messages_celery_took_ahead_but_never_ran_are_taken_too(
    worker: WorkerProcess, api: RedisScheduler
) -> None:
    """kombu keeps what a consumer took ahead in its `unacked` hash and puts it back on the
    queue only when its channel closes, which may be after the drain looked: the drain takes
    those of its own queue from the hash, and leaves other workers' alone."""
    from tinkerd.cluster.celery_app import take_undelivered
    from tinkerd.cluster.keys import KOMBU_UNACKED

    api.open_model(MODEL)
    api.submit(MODEL, 0, CreateModel("tinkerd/tiny", LoraConfig(rank=4, seed=0)), "c")
    api.submit(MODEL, 1, forward(), "f1")
    queued = [json.loads(raw) for raw in worker.redis.lrange("tinkerd.worker.wg", 0, -1)]
    worker.redis.delete("tinkerd.worker.wg")
    for tag, message in enumerate(queued):  # as kombu holds them once a consumer took them
        entry = [message, "tinkerd.worker.wg", "tinkerd.worker.wg"]
        worker.redis.hset(KOMBU_UNACKED, f"tag-{tag}", json.dumps(entry))
    other = [queued[0], "tinkerd.worker.other", "tinkerd.worker.other"]
    worker.redis.hset(KOMBU_UNACKED, "tag-other", json.dumps(other))

    taken = take_undelivered(worker.redis, "wg")
    assert sorted(args[3] for args in taken) == [0, 1]  # seq_ids
    assert worker.redis.hkeys(KOMBU_UNACKED) == [b"tag-other"]
    assert take_undelivered(worker.redis, "wg") == []
