"""The sequencing rules: what a model's seq_id answers a request that claims it.

A model's requests run in seq_id order, and a retried (model_id, seq_id) must return the first
request's id rather than run twice. Each seq_id is in one of these states, and gives its answer:

    remembered, same fingerprint   DUPLICATE: the first request's id (a retry)
    remembered as skipped          DUPLICATE: the skip's request id, which settles to the skip's
                                   error (the request came too late to run in order)
    remembered, other fingerprint  CLASH: refused, 400
    below the model's next seq_id  PAST: refused, 400 (forgotten: older than RETRY_WINDOW)
    past next + MAX_SEQ_AHEAD      AHEAD: refused, 400
    otherwise                      NEW: recorded, a new request id (held until its turn)

A model's next seq_id that never comes, while later ones wait for it, is a gap: after a while
it is skipped (SKIPPED: taken as a rejected request, remembered as skipped), unless it was
recorded meanwhile (RECORDED: left to its request). Unordered requests (sampling) have no next
seq_id: only the first three rows apply. The Redis implementation adds LOST: the worker that
holds the model is gone.

Two implementations apply these rules: `tasks.Scheduler` in process (`ordered`, `unordered`),
and the Lua scripts of `cluster/` in Redis, atomic across API processes (`LUA`). Both answer a
`Status` and one value (the request id, or the model's next seq_id for PAST and AHEAD), and
`answer` turns that into the request id or the refusal, so both give the same messages.
tests/test_sequencing.py checks that the two agree.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from tinkerd.types import UserError

# How far ahead of a model's next seq_id a request may arrive (buffered until its turn).
MAX_SEQ_AHEAD = 100_000
# How many past seq_ids per model (and unordered requests) are remembered to de-duplicate retries.
RETRY_WINDOW = 10_000
# The fingerprint a skipped seq_id is remembered by: that request, arriving after all, gets the
# skip's answer (an error) rather than running out of order. Never a real fingerprint (hex).
SKIPPED_FINGERPRINT = "*skipped"


class Status(IntEnum):
    """A seq_id's answer to a submit (or a skip); the Lua scripts return these codes."""

    NEW = 1  # recorded now: a new request id
    DUPLICATE = 2  # remembered with the same fingerprint, or as skipped: the first request id
    CLASH = 3  # remembered with another fingerprint: refused
    PAST = 4  # below the model's next seq_id: refused
    AHEAD = 5  # too far past the model's next seq_id: refused
    LOST = 6  # (Redis) the model's worker is gone
    SKIPPED = 7  # (a skip) never came: taken now as skipped
    RECORDED = 8  # (a skip) came meanwhile: left to its request


# Another submit took the seq_id first: a server-chosen seq_id (`submit_next`) tries the next.
TAKEN = frozenset({Status.CLASH, Status.PAST})


class Gap(NamedTuple):
    """A model's missing next request; a model's requests all come from one tenant, so the
    ones waiting behind it tell whose it is."""

    model_id: str
    seq_id: int
    tenant: str
    priority: int


def record(request_id: str, fingerprint: str) -> str:
    """How Redis remembers a seq_id: its first request id and fingerprint (`parse_record`)."""
    return f"{request_id}|{fingerprint}"


def parse_record(raw: str) -> tuple[str, str]:
    """`record`'s inverse: (request id, fingerprint)."""
    request_id, _, fingerprint = raw.partition("|")
    return request_id, fingerprint


def unordered(seen: tuple[str, str] | None, fingerprint: str) -> tuple[Status, str]:
    """A seq_id's answer from what it remembers, `seen` (request id, fingerprint): NEW, or
    DUPLICATE or CLASH with the first request id."""
    if seen is None:
        return Status.NEW, ""
    request_id, first = seen
    if first in (fingerprint, SKIPPED_FINGERPRINT):
        return Status.DUPLICATE, request_id
    return Status.CLASH, request_id


def ordered(
    seen: tuple[str, str] | None, fingerprint: str, seq_id: int, next_seq: int
) -> tuple[Status, str]:
    """A model's seq_id's answer: as `unordered` if remembered, else PAST or AHEAD (with the
    model's `next_seq`) or NEW."""
    if seen is not None:
        return unordered(seen, fingerprint)
    if seq_id < next_seq:
        return Status.PAST, str(next_seq)
    if seq_id > next_seq + MAX_SEQ_AHEAD:
        return Status.AHEAD, str(next_seq)
    return Status.NEW, ""


def refusal(status: Status, key: str, seq_id: int, next_seq: str) -> UserError:
    """The error of a refused seq_id of `key` (a model id, or a sampler's key)."""
    if status is Status.CLASH:
        return UserError(f"seq_id {seq_id} of {key} was already used by a different request")
    if status is Status.PAST:
        return UserError(f"seq_id {seq_id} is in the past: {key} is already at seq_id {next_seq}")
    if status is Status.AHEAD:
        return UserError(f"seq_id {seq_id} is too far ahead of {next_seq}")
    raise ValueError(f"{status!r} is not a refusal")


def answer(status: Status, value: str, key: str, seq_id: int) -> str:
    """The request id that a submit's (status, value) answers (NEW, DUPLICATE); a refusal
    raises its error."""
    if status in (Status.NEW, Status.DUPLICATE):
        return value
    raise refusal(status, key, seq_id, value)


def skipped_message(gap: Gap, waited: float) -> str:
    """Why a gap's seq_id was skipped: what the request, if it comes after all, is told."""
    return (
        f"seq_id {gap.seq_id} of {gap.model_id} never arrived: the model's later requests "
        f"waited {waited:.0f} s for it, so it was skipped (the server refused it before "
        "recording it, or the client never sent it); nothing of it was applied"
    )


# The same rules in Lua, for the scripts of `cluster/` (each script starts with this): `record`
# and `seen_answer` are `record` and `unordered` over a seen hash, `order_answer` the rest of
# `ordered` (nil for NEW), and `advance` moves a model's next seq_id (in Redis, the lowest not yet
# recorded) past the seq_ids recorded from `nxt` on, forgetting those RETRY_WINDOW behind.
LUA = (
    f"local {', '.join(s.name for s in Status)} = {', '.join(str(s.value) for s in Status)}\n"
    + """
local function record(rid, fp) return rid .. '|' .. fp end

local function seen_answer(seen_key, seq, fp)
  local v = redis.call('HGET', seen_key, seq)
  if not v then return nil end
  local sep = string.find(v, '|', 1, true)
  local rid, first = string.sub(v, 1, sep - 1), string.sub(v, sep + 1)
  if first ~= fp and first ~= '@SKIPPED@' then return {CLASH, rid} end
  return {DUPLICATE, rid}
end

local function order_answer(seq, nxt, max_ahead)
  if seq < nxt then return {PAST, tostring(nxt)} end
  if seq > nxt + max_ahead then return {AHEAD, tostring(nxt)} end
  return nil
end

local function advance(seen_key, next_key, nxt, window)
  while redis.call('HEXISTS', seen_key, tostring(nxt)) == 1 do
    if nxt >= window then redis.call('HDEL', seen_key, tostring(nxt - window)) end
    nxt = nxt + 1
  end
  redis.call('SET', next_key, nxt)
  return nxt
end
""".replace("@SKIPPED@", SKIPPED_FINGERPRINT)
)
