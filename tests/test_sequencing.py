"""The sequencing rules, as the embedded queue applies them (Python) and as Redis does (Lua):
the same answers for every state of a seq_id, and the same refusals end to end."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import redis
from test_cluster_scheduler import MODEL, open_and_create, optim, register

from tinkerd import sequencing
from tinkerd.cluster import scheduler as cluster_scheduler
from tinkerd.cluster.celery_app import make_celery
from tinkerd.cluster.scheduler import RedisScheduler
from tinkerd.cluster.state import RedisFutures, connect
from tinkerd.sequencing import LUA, MAX_SEQ_AHEAD, SKIPPED_FINGERPRINT, Status
from tinkerd.tasks import Scheduler, TaskQueue
from tinkerd.types import CreateModel, LoraConfig, UserError

pytestmark = pytest.mark.timeout(60)

# The Lua rules alone: KEYS: seen hash; ARGV: seq_id, fingerprint, next seq_id, max ahead
# (next '' for an unordered request)
ANSWER = (
    LUA
    + """
local seen = seen_answer(KEYS[1], ARGV[1], ARGV[2])
if seen then return seen end
if ARGV[3] == '' then return {NEW, ''} end
local refused = order_answer(tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4]))
if refused then return refused end
return {NEW, ''}
"""
)


def lua_answer(
    client: redis.Redis, seen: tuple[str, str] | None, fingerprint: str, seq_id: int, nxt: str
) -> tuple[Status, str]:
    client.delete("seen")
    if seen is not None:
        client.hset("seen", str(seq_id), sequencing.record(*seen))
    status, value = client.eval(ANSWER, 1, "seen", seq_id, fingerprint, nxt, MAX_SEQ_AHEAD)
    return Status(status), value.decode()


SEEN_STATES = [None, ("r1", "fp"), ("r1", "other"), ("r1", SKIPPED_FINGERPRINT)]


def test_python_and_lua_answer_every_state_of_a_seq_id_alike(client: redis.Redis) -> None:
    nxt = 7
    offsets = [-7, -1, 0, 1, MAX_SEQ_AHEAD, MAX_SEQ_AHEAD + 1]
    answers = set()
    for seen, offset in itertools.product(SEEN_STATES, offsets):
        seq_id = nxt + offset
        python = sequencing.ordered(seen, "fp", seq_id, nxt)
        assert lua_answer(client, seen, "fp", seq_id, str(nxt)) == python, (seen, offset)
        answers.add(python[0])
        python = sequencing.unordered(seen, "fp")
        assert lua_answer(client, seen, "fp", seq_id, "") == python, (seen, "unordered")
    assert answers == {Status.NEW, Status.DUPLICATE, Status.CLASH, Status.PAST, Status.AHEAD}
    assert sequencing.ordered(("r1", SKIPPED_FINGERPRINT), "fp", 3, 7) == (Status.DUPLICATE, "r1")
    assert sequencing.ordered(None, "fp", 6, 7) == (Status.PAST, "7")
    assert sequencing.parse_record(sequencing.record("r1", "a|b")) == ("r1", "a|b")


def test_lua_advance_moves_past_the_recorded_seq_ids_and_forgets_behind_the_window(
    client: redis.Redis,
) -> None:
    for seq_id in range(2, 8):
        client.hset("seen", str(seq_id), sequencing.record(f"r{seq_id}", "fp"))
    script = LUA + "return advance(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]))"
    assert client.eval(script, 2, "seen", "next", 5, 3) == 8
    assert client.get("next") == b"8"
    assert sorted(int(k) for k in client.hkeys("seen")) == [5, 6, 7]  # 2, 3, 4: 3 behind


def test_a_refusal_says_why(client: redis.Redis) -> None:
    with pytest.raises(UserError, match="seq_id 3 of m was already used by a different request"):
        sequencing.answer(Status.CLASH, "r1", "m", 3)
    with pytest.raises(UserError, match="seq_id 3 is in the past: m is already at seq_id 9"):
        sequencing.answer(Status.PAST, "9", "m", 3)
    with pytest.raises(UserError, match="seq_id 3 is too far ahead of 1"):
        sequencing.answer(Status.AHEAD, "1", "m", 3)
    assert sequencing.answer(Status.DUPLICATE, "r1", "m", 3) == "r1"
    with pytest.raises(ValueError):
        sequencing.refusal(Status.LOST, "m", 3, "")


@pytest.fixture
def redis_scheduler(redis_url: str) -> Iterator[RedisScheduler]:
    c = connect(redis_url)
    futures = RedisFutures(c, 60)
    app = make_celery(redis_url)
    yield RedisScheduler(c, app, futures)
    futures.close()
    app.close()
    c.close()


def outcome(queue: TaskQueue, seq_id: int, fingerprint: str, labels: dict[str, str]) -> str:
    """What submitting (seq_id, fingerprint) answers, comparable across queues: a refusal's
    message, or the label of the submit whose request id it returned (its own when new)."""
    try:
        request_id = queue.submit(MODEL, seq_id, optim(seq_id), fingerprint)
    except UserError as e:
        return e.message
    return labels.setdefault(request_id, f"{seq_id}/{fingerprint}")


def test_the_embedded_queue_and_redis_answer_a_model_s_seq_ids_alike(
    client: redis.Redis, redis_scheduler: RedisScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same submits to `tasks.Scheduler` (its steps taken as they come ready, as its worker
    does, so that its next seq_id is Redis's) and to the cluster's scheduler get the same
    answers: new, a retry's first request, or the same refusal."""
    monkeypatch.setattr("tinkerd.tasks.RETRY_WINDOW", 3)
    monkeypatch.setattr(cluster_scheduler, "RETRY_WINDOW", 3)
    register(client, "w1")
    open_and_create(redis_scheduler)
    embedded = Scheduler()
    embedded.open_model(MODEL)
    embedded.submit(MODEL, 0, CreateModel("base", LoraConfig(rank=8)), f"create-{MODEL}")
    queues: dict[str, TaskQueue] = {"embedded": embedded, "redis": redis_scheduler}

    plan = [(2, "fp2"), (2, "fp2"), (2, "other"), (1, "fp1"), (1, "fp1"), (0, "x")]
    plan += [(s, f"fp{s}") for s in range(3, 11)]
    plan += [(10, "fp10"), (10, "other"), (8, "fp8"), (0, "fp0"), (5, "fp5"), (4, "fp4")]
    plan += [(11 + MAX_SEQ_AHEAD, "edge"), (12 + MAX_SEQ_AHEAD, "far")]
    answers: dict[str, list[str]] = {name: [] for name in queues}
    labels: dict[str, dict[str, str]] = {name: {} for name in queues}
    for seq_id, fingerprint in plan:
        for name, queue in queues.items():
            answers[name].append(outcome(queue, seq_id, fingerprint, labels[name]))
        while embedded.take_ready(0.0):
            pass
    assert answers["embedded"] == answers["redis"]
    assert answers["redis"][:6] == [
        "2/fp2",
        "2/fp2",
        f"seq_id 2 of {MODEL} was already used by a different request",
        "1/fp1",
        "1/fp1",
        f"seq_id 0 of {MODEL} was already used by a different request",
    ]
    assert answers["redis"][-8:] == [
        "10/fp10",
        f"seq_id 10 of {MODEL} was already used by a different request",
        "8/fp8",
        f"seq_id 0 is in the past: {MODEL} is already at seq_id 11",
        f"seq_id 5 is in the past: {MODEL} is already at seq_id 11",
        f"seq_id 4 is in the past: {MODEL} is already at seq_id 11",
        f"{11 + MAX_SEQ_AHEAD}/edge",
        f"seq_id {12 + MAX_SEQ_AHEAD} is too far ahead of 11",
    ]
