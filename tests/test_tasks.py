"""Unit tests of tinkerd.tasks: per-model ordering, retry de-duplication, turns by priority, each
tenant's pending count, and futures."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tinkerd import tasks
from tinkerd.futures import FutureStore
from tinkerd.results import Kind, Result
from tinkerd.sequencing import MAX_SEQ_AHEAD
from tinkerd.tasks import Scheduler, Task, by_priority
from tinkerd.types import (
    AdamParams,
    ForwardBackwardResult,
    NotFound,
    OptimStep,
    ServerError,
    UserError,
)

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


def test_a_gap_that_never_fills_is_skipped_after_gap_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A seq_id the client never sent (or the server refused before recording it) holds the
    model's later requests only `gap_seconds`: then it is skipped, logged, and answered with
    an error should it come after all."""
    s = Scheduler(gap_seconds=0.3)
    s.open_model(MODEL)
    s.submit(MODEL, 0, payload("create"), "fp-create")
    assert released(s) == [(MODEL, 0, "create")]
    two = s.submit(MODEL, 2, payload("two"), "fp2")
    assert s.take_ready(0.1) == []  # 2 waits for 1 ...
    time.sleep(0.3)
    with caplog.at_level("WARNING", logger="tinkerd.tasks"):
        [step] = s.take_ready(0.1)  # ... until 1 has been missing for gap_seconds
    assert [(t.seq_id, type(t.payload).__name__) for t in step] == [(1, "Rejected"), (2, "dict")]
    assert step[1].request_id == two
    skipped = step[0]
    assert skipped.payload.error["category"] == "user"
    assert "seq_id 1 of s:train:0 never arrived" in skipped.payload.error["error"]
    assert f"model {MODEL}: seq_id 1 never arrived" in caplog.text
    # the scheduler's own records (an SDK session an earlier test left can log here too)
    assert [r.levelname for r in caplog.records if r.name == "tinkerd.tasks"] == ["WARNING"]
    # seq 1 arriving after all gets the skip's answer, not a run out of order
    assert s.submit(MODEL, 1, payload("one"), "fp1") == skipped.request_id
    assert released(s) == []
    s.submit(MODEL, 3, payload("three"), "fp3")
    assert released(s) == [(MODEL, 3, "three")]


def test_a_gap_filled_in_time_is_not_skipped() -> None:
    s = Scheduler(gap_seconds=0.5)
    s.open_model(MODEL)
    s.submit(MODEL, 0, payload("create"), "fp-create")
    s.submit(MODEL, 2, payload("two"), "fp2")
    assert released(s, 0.2) == [(MODEL, 0, "create")]
    s.submit(MODEL, 1, payload("one"), "fp1")
    time.sleep(0.5)
    assert released(s) == [(MODEL, 1, "one"), (MODEL, 2, "two")]


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
    scheduler.settle(task.request_id, Result(Kind.SAVE_WEIGHTS, {"ok": 1}))
    assert scheduler.futures.wait(request_id, 0.0) == Result(Kind.SAVE_WEIGHTS, {"ok": 1})


# -- turns: one step per model, by priority --------------------------------------------------


def step_end() -> OptimStep:
    return OptimStep(AdamParams())


def turns(scheduler: Scheduler) -> list[list[tuple[str, int]]]:
    """Each take_ready until nothing is left: the (model_id, seq_id) of each batch taken."""
    taken = []
    while batches := scheduler.take_ready(0.0):
        taken.append([(t.model_id, t.seq_id) for tasks in batches for t in tasks])
    return taken


def opened(scheduler: Scheduler, model_id: str, priority: int = 0, tenant: str = "t") -> None:
    scheduler.open_model(model_id)
    scheduler.submit(model_id, 0, payload("create"), "c", tenant=tenant, priority=priority)
    scheduler.take_ready(0.0)


def test_a_step_ends_at_its_optim_step(scheduler: Scheduler) -> None:
    for seq, item in enumerate([payload("fb"), payload("fb"), step_end(), payload("fb")], 1):
        scheduler.submit(MODEL, seq, item, f"fp{seq}")
    scheduler.submit(MODEL, 5, step_end(), "fp5")
    scheduler.submit(MODEL, 6, payload("save"), "fp6")
    assert turns(scheduler) == [
        [(MODEL, 1), (MODEL, 2), (MODEL, 3)],
        [(MODEL, 4), (MODEL, 5)],
        [(MODEL, 6)],  # no optim_step after it: what is ready goes
    ]


def test_the_higher_priority_model_takes_its_turns_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "AGING_SECONDS", 1000.0)
    s = Scheduler()
    opened(s, "low", priority=0, tenant="lo")
    opened(s, "high", priority=5, tenant="hi")
    for model_id, priority in (("low", 0), ("high", 5)):  # the low one queued first
        for seq in (1, 2, 3, 4):
            item = step_end() if seq % 2 == 0 else payload("fb")
            s.submit(model_id, seq, item, f"fp{seq}", tenant=model_id, priority=priority)
    assert turns(s) == [
        [("high", 1), ("high", 2)],
        [("high", 3), ("high", 4)],
        [("low", 1), ("low", 2)],
        [("low", 3), ("low", 4)],
    ]


def test_models_of_equal_priority_each_take_a_step_per_cycle() -> None:
    s = Scheduler()
    opened(s, "a")
    opened(s, "b")
    for model_id in ("a", "b"):
        for seq in (1, 2):
            s.submit(model_id, seq, step_end(), f"fp{seq}")
    assert sorted(map(sorted, turns(s))) == [[("a", 1), ("b", 1)], [("a", 2), ("b", 2)]]


def test_a_long_wait_lifts_a_low_priority_model_above_fresh_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "AGING_SECONDS", 0.05)
    s = Scheduler()
    opened(s, "low", priority=0)
    opened(s, "high", priority=5)
    s.submit("low", 1, step_end(), "l1", priority=0)
    time.sleep(0.4)  # 8 levels of waiting: above the fresh priority-5 work
    s.submit("high", 1, step_end(), "h1", priority=5)
    assert turns(s) == [[("low", 1)], [("high", 1)]]


def test_a_backlog_gains_no_seniority_over_a_newcomer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model's wait for its turn starts again when it takes one: the requests a client queued
    long ago do not keep a model of the same priority out."""
    monkeypatch.setattr(tasks, "AGING_SECONDS", 0.05)
    s = Scheduler()
    opened(s, "backlog")
    opened(s, "newcomer")
    for seq in (1, 2, 3):
        s.submit("backlog", seq, step_end(), f"b{seq}")
    time.sleep(0.3)
    s.submit("newcomer", 1, step_end(), "n1")
    taken = s.take_ready(0.0)  # the backlog's first step had waited 6 levels, the newcomer none
    assert [[(t.model_id, t.seq_id) for t in b] for b in taken] == [[("backlog", 1)]]
    time.sleep(0.1)  # the backlog's next steps are as old, but its wait began with its turn
    assert [t.model_id for t in s.take_ready(0.0)[0]] == ["newcomer"]


def test_by_priority_orders_by_priority_then_by_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "AGING_SECONDS", 0.05)
    old_low = Task("r1", "k", 0, payload("old-low"), priority=0)
    time.sleep(0.3)  # 6 levels
    waiting = [
        old_low,
        Task("r2", "k", 1, payload("low"), priority=0),
        Task("r3", "k", 2, payload("high"), priority=5),
        Task("r4", "k", 3, payload("top"), priority=10),
    ]
    assert [t.payload["name"] for t in by_priority(waiting)] == ["top", "old-low", "high", "low"]


# -- pending per tenant ----------------------------------------------------------------------


def test_pending_counts_each_tenants_unsettled_requests(scheduler: Scheduler) -> None:
    assert scheduler.pending("a") == scheduler.pending("b") == 0
    ids = [scheduler.submit(MODEL, s, payload(f"{s}"), f"fp{s}", tenant="a") for s in (1, 3)]
    assert scheduler.submit(MODEL, 1, payload("1"), "fp1", tenant="a") == ids[0]  # a retry
    sampled = scheduler.submit_unordered("s:sample:0", 0, payload("sample"), "s", tenant="b")
    assert (scheduler.pending("a"), scheduler.pending("b"), scheduler.pending("c")) == (2, 1, 0)
    taken = [t for tasks in scheduler.take_ready(0.0) for t in tasks]
    assert [t.tenant for t in taken] == ["a", "b"]
    assert scheduler.pending("a") == 2  # taken is not settled: seq 1 is running
    scheduler.settle(ids[0], Result(Kind.SAVE_WEIGHTS, {}))
    scheduler.settle(sampled, Result(Kind.SAVE_WEIGHTS, {}))
    assert (scheduler.pending("a"), scheduler.pending("b")) == (1, 0)
    assert scheduler.fail_pending(Result.failed(ServerError("shut down"))) == [ids[1]]  # for 2
    assert scheduler.pending("a") == 0
    assert scheduler.futures.pending() == scheduler.pending("") == 1  # the fixture's create


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
    outputs = [{"logprobs": np.array([-1.0, -2.0], np.float32)}]
    result = Result(Kind.FORWARD_BACKWARD, ForwardBackwardResult(outputs, {"loss:sum": 3.0}))
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
    store.settle(request_id, Result(Kind.SAVE_WEIGHTS, {}))
    for t in threads:
        t.join(10)
    assert got == [Result(Kind.SAVE_WEIGHTS, {})] * 4


def test_request_ids_are_unique() -> None:
    store = FutureStore()
    assert len({store.create() for _ in range(1000)}) == 1000


def test_a_handed_over_model_starts_at_its_recreation_whatever_arrives_first() -> None:
    """A worker taking over a model gets its re-creation at the seq_id of the last request that
    ran elsewhere, and the queued requests after it; they may arrive in any order."""
    from tinkerd.types import CreateModel, LoraConfig

    def recreation(seq_id: int) -> Task:
        return Task("r", MODEL, seq_id, CreateModel("tinkerd/tiny", LoraConfig(rank=4)))

    def seqs(tasks: list[list[Task]]) -> list[int]:
        return [t.seq_id for batch in tasks for t in batch]

    first = Scheduler()
    first.enqueue(recreation(41))
    first.enqueue(Task("a", MODEL, 42, payload("fwd")))
    assert seqs(first.take_ready(0.01)) == [41, 42]

    late = Scheduler()  # the queued requests overtook the re-creation
    late.enqueue(Task("b", MODEL, 43, payload("fwd")))
    late.enqueue(Task("a", MODEL, 42, payload("fwd")))
    assert late.take_ready(0.01) == []
    late.enqueue(recreation(41))
    assert seqs(late.take_ready(0.01)) == [41, 42, 43]


def test_take_model_hands_back_its_queue_in_order(scheduler: Scheduler) -> None:
    for seq in (3, 1, 2):
        scheduler.submit(MODEL, seq, payload(f"p{seq}"), f"fp{seq}")
    released(scheduler)  # 1, 2, 3 taken
    scheduler.submit(MODEL, 5, payload("p5"), "fp5")
    scheduler.submit(MODEL, 4, payload("p4"), "fp4")
    next_seq, queued = scheduler.take_model(MODEL)
    assert next_seq == 4 and [t.seq_id for t in queued] == [4, 5]
    assert MODEL not in scheduler.models() and scheduler.take_model(MODEL) == (0, [])
    assert released(scheduler) == []
