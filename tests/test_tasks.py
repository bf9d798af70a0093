"""Unit tests of tinkerd.tasks: per-model ordering, retry de-duplication, and futures."""

from __future__ import annotations

import threading
import time

import pytest

from tinkerd.tasks import MAX_SEQ_AHEAD, FutureStore, Result, Scheduler
from tinkerd.types import NotFound, UserError

pytestmark = pytest.mark.timeout(30)

MODEL = "s:train:0"


def payload(name: str) -> dict[str, str]:
    """Any object will do as a payload: the scheduler never looks inside."""
    return {"name": name}


def released(scheduler: Scheduler, timeout: float = 0.01) -> list[tuple[str, int, str]]:
    """Everything take_ready hands out now, flattened, as (model_id, seq_id, payload name)."""
    return [
        (t.model_id, t.seq_id, t.payload["name"])
        for tasks in scheduler.take_ready(timeout)
        for t in tasks
    ]


@pytest.fixture
def scheduler() -> Scheduler:
    s = Scheduler()
    s.open_model(MODEL)
    s.submit(MODEL, 0, payload("create"), "fp-create")
    assert released(s) == [(MODEL, 0, "create")]
    return s


# -- ordering --------------------------------------------------------------------------------


def test_out_of_order_tasks_are_released_in_seq_order(scheduler: Scheduler) -> None:
    ids = {2: scheduler.submit(MODEL, 2, payload("two"), "fp2")}
    ids[3] = scheduler.submit(MODEL, 3, payload("three"), "fp3")
    # 2 and 3 wait for 1, however long we ask
    assert released(scheduler) == []
    assert scheduler.queue_depth() == 2
    ids[1] = scheduler.submit(MODEL, 1, payload("one"), "fp1")
    batches = scheduler.take_ready(0.01)
    assert [[(t.seq_id, t.payload["name"], t.request_id) for t in b] for b in batches] == [
        [(1, "one", ids[1]), (2, "two", ids[2]), (3, "three", ids[3])]
    ]
    assert scheduler.queue_depth() == 0
    assert len(set(ids.values())) == 3


def test_submit_next_takes_the_next_seq_after_any_submitted(scheduler: Scheduler) -> None:
    scheduler.submit_next(MODEL, payload("one"))
    scheduler.submit(MODEL, 3, payload("three"), "fp3")
    scheduler.submit_next(MODEL, payload("four"))
    assert released(scheduler) == [(MODEL, 1, "one")]  # 2 was never sent: 3 and 4 wait
    scheduler.submit(MODEL, 2, payload("two"), "fp2")
    assert released(scheduler) == [(MODEL, 2, "two"), (MODEL, 3, "three"), (MODEL, 4, "four")]
    with pytest.raises(NotFound):
        scheduler.submit_next("nope:train:0", payload("x"))


def test_gap_holds_back_only_later_tasks(scheduler: Scheduler) -> None:
    scheduler.submit(MODEL, 1, payload("one"), "fp1")
    scheduler.submit(MODEL, 3, payload("three"), "fp3")
    assert released(scheduler) == [(MODEL, 1, "one")]
    assert released(scheduler) == []  # 3 waits for 2
    scheduler.submit(MODEL, 2, payload("two"), "fp2")
    assert released(scheduler) == [(MODEL, 2, "two"), (MODEL, 3, "three")]


def test_models_are_ordered_independently(scheduler: Scheduler) -> None:
    other = "s:train:1"
    scheduler.open_model(other)
    scheduler.submit(other, 1, payload("other-1"), "o1")  # waits for the other's seq 0
    scheduler.submit(MODEL, 1, payload("one"), "fp1")
    assert released(scheduler) == [(MODEL, 1, "one")]
    scheduler.submit(other, 0, payload("other-0"), "o0")
    assert released(scheduler) == [(other, 0, "other-0"), (other, 1, "other-1")]


def test_take_ready_wakes_up_on_submit_from_another_thread(scheduler: Scheduler) -> None:
    timer = threading.Timer(0.2, scheduler.submit, (MODEL, 1, payload("one"), "fp1"))
    start = time.monotonic()
    timer.start()
    try:
        got = released(scheduler, timeout=10.0)
    finally:
        timer.join()
    assert got == [(MODEL, 1, "one")]
    assert time.monotonic() - start < 5.0


def test_take_ready_times_out_with_nothing(scheduler: Scheduler) -> None:
    start = time.monotonic()
    assert scheduler.take_ready(0.2) == []
    assert time.monotonic() - start >= 0.15


# -- retries and clashes ---------------------------------------------------------------------


def test_retry_with_same_fingerprint_returns_same_request_and_queues_once(
    scheduler: Scheduler,
) -> None:
    first = scheduler.submit(MODEL, 2, payload("two"), "fp2")
    again = scheduler.submit(MODEL, 2, payload("two-retry"), "fp2")
    assert again == first
    assert scheduler.queue_depth() == 1
    scheduler.submit(MODEL, 1, payload("one"), "fp1")
    assert released(scheduler) == [(MODEL, 1, "one"), (MODEL, 2, "two")]
    # a retry that arrives after the task ran still maps to the first request, and is not re-run
    assert scheduler.submit(MODEL, 2, payload("two-late"), "fp2") == first
    assert scheduler.queue_depth() == 0
    assert released(scheduler) == []


def test_same_seq_with_different_fingerprint_is_a_user_error(scheduler: Scheduler) -> None:
    scheduler.submit(MODEL, 2, payload("two"), "fp2")
    with pytest.raises(UserError, match="seq_id 2"):
        scheduler.submit(MODEL, 2, payload("other"), "different")
    assert scheduler.queue_depth() == 1
    scheduler.submit(MODEL, 1, payload("one"), "fp1")
    assert released(scheduler) == [(MODEL, 1, "one"), (MODEL, 2, "two")]
    with pytest.raises(UserError):  # also once it has run
        scheduler.submit(MODEL, 1, payload("other"), "different")


def test_seq_id_from_the_past_is_a_user_error(scheduler: Scheduler) -> None:
    scheduler.submit(MODEL, 1, payload("one"), "fp1")
    assert released(scheduler) == [(MODEL, 1, "one")]
    with pytest.raises(UserError, match="past"):
        scheduler.submit(MODEL, -1, payload("negative"), "fpn")
    with pytest.raises(UserError):
        scheduler.submit(MODEL, 0, payload("create-again"), "another")
    assert scheduler.queue_depth() == 0
    assert released(scheduler) == []


def test_seq_id_too_far_ahead_is_a_user_error(scheduler: Scheduler) -> None:
    with pytest.raises(UserError, match="too far ahead"):
        scheduler.submit(MODEL, MAX_SEQ_AHEAD + 5, payload("far"), "fp")
    assert scheduler.queue_depth() == 0


def test_unknown_model_is_not_found() -> None:
    s = Scheduler()
    with pytest.raises(NotFound, match="unknown model_id"):
        s.submit("nope:train:0", 0, payload("x"), "fp")
    assert not s.has_model("nope:train:0")
    s.open_model("nope:train:0")
    assert s.has_model("nope:train:0")


def test_open_model_twice_keeps_the_sequence(scheduler: Scheduler) -> None:
    scheduler.submit(MODEL, 2, payload("two"), "fp2")
    scheduler.open_model(MODEL)  # a retried create_model must not reset the model's queue
    assert scheduler.queue_depth() == 1
    scheduler.submit(MODEL, 1, payload("one"), "fp1")
    assert released(scheduler) == [(MODEL, 1, "one"), (MODEL, 2, "two")]


def test_settle_reaches_the_request_future(scheduler: Scheduler) -> None:
    request_id = scheduler.submit(MODEL, 1, payload("one"), "fp1")
    (task,) = scheduler.take_ready(0.01)[0]
    scheduler.settle(task.request_id, Result(b'{"ok": 1}'))
    assert scheduler.futures.wait(request_id, 0.0) == Result(b'{"ok": 1}')


# -- FutureStore -----------------------------------------------------------------------------


def test_wait_returns_none_on_timeout() -> None:
    store = FutureStore()
    request_id = store.create()
    start = time.monotonic()
    assert store.wait(request_id, 0.2) is None
    assert time.monotonic() - start >= 0.15
    assert store.pending() == 1


def test_wait_returns_promptly_when_settled_from_another_thread() -> None:
    store = FutureStore()
    request_id = store.create()
    result = Result(b"\x01\x02", "application/x-protobuf")
    timer = threading.Timer(0.1, store.settle, (request_id, result))
    start = time.monotonic()
    timer.start()
    try:
        got = store.wait(request_id, 20.0)
    finally:
        timer.join()
    assert got == result
    assert time.monotonic() - start < 5.0
    assert store.pending() == 0
    # settled results stay retrievable (the SDK may poll again), without waiting
    start = time.monotonic()
    assert store.wait(request_id, 20.0) == result
    assert time.monotonic() - start < 1.0


def test_wait_for_unknown_request_is_not_found() -> None:
    store = FutureStore()
    with pytest.raises(NotFound, match="unknown request_id"):
        store.wait("no-such-request", 0.1)


def test_many_waiters_all_wake() -> None:
    store = FutureStore()
    request_id = store.create()
    got: list[Result | None] = []
    threads = [
        threading.Thread(target=lambda: got.append(store.wait(request_id, 20.0))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(0.05)
    store.settle(request_id, Result(b"{}"))
    for t in threads:
        t.join(10)
    assert got == [Result(b"{}")] * 4


def test_request_ids_are_unique() -> None:
    store = FutureStore()
    assert len({store.create() for _ in range(1000)}) == 1000
