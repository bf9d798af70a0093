"""Every Redis key tinkerd reads or writes, in one place (all under `tinkerd:`).

    workers                     set of registered worker names
    worker:<name>               a worker's registration (JSON), expiring unless renewed
    inflight:<name>             request ids queued on or running at that worker
    incoming:<name>             how many hand-overs to that worker are in progress
    placement                   hash: model id (or snapshot sampler id) -> worker name
    lost                        hash: model id -> why it is gone
    stopped                     hash: model id -> a clean stop saved it; the next worker to
                                start restores it (`suspend`)
    seq:<model_id>, next:<id>   the model's seen seq_ids ("request_id|fingerprint") and the
                                lowest seq_id not yet submitted (`sequencing`)
    useen:<key>                 the same for unordered requests (sampling), by sampler key
    req:<request_id>            the worker a request went to (so a poll can tell "unknown")
    result:<request_id>         {result}: a settled future (`codec.dump_result`), expiring
    pending:<tenant>            sorted set: the tenant's unsettled request ids, by submit time
                                (Unix); an entry older than the future TTL no longer counts;
                                none for "" (no keys, no limits)
    records:<kind>              the registry: sessions, models, runs, samplers (JSON by id)
    epoch                       "<unix time> <token>": when this Redis's state began; set by the
                                first process that finds it missing, so a Redis that comes back
                                empty (restarted without persistence, or flushed) gets a new one
    reaper, sweeper, stop-lock  locks: one API process reaps (or sweeps expired checkpoints) per
                                round; stopping workers choose their hand-over targets in turn
    metrics:counters            hash: series (JSON [name, [[label, value], ...]]) -> total
    metrics:events:<run_id>     list: the run's events (JSON), oldest first, expiring
    audit:<YYYY-MM-DD>          list: the day's audit log entries (JSON)
    keys, key-digests           hashes: API key name -> ApiKey JSON; sha256 -> name
    keys-mode                   "keyed" or "open"; absent: the server never held a key
    channel `tinkerd:settled`   a notice per settled request id

Celery's queues are Redis lists too: `tinkerd.worker.<name>` (`worker_queue`), with kombu's
`unacked` hash and `unacked_index` sorted set of messages taken but not yet acknowledged.
"""

from __future__ import annotations

PREFIX = "tinkerd:"
WORKERS = PREFIX + "workers"
PLACEMENT = PREFIX + "placement"
LOST = PREFIX + "lost"
STOPPED = PREFIX + "stopped"
SETTLED = PREFIX + "settled"
EPOCH = PREFIX + "epoch"
REAPER_LOCK = PREFIX + "reaper"
SWEEPER_LOCK = PREFIX + "sweeper"
STOP_LOCK = PREFIX + "stop-lock"
PENDING = PREFIX + "pending:"
REQUEST = PREFIX + "req:"
RESULT = PREFIX + "result:"
METRICS_COUNTERS = PREFIX + "metrics:counters"
AUDIT = PREFIX + "audit:"
API_KEYS = PREFIX + "keys"
API_KEY_DIGESTS = PREFIX + "key-digests"
API_KEYS_MODE = PREFIX + "keys-mode"
# kombu's Redis transport keeps each message a consumer took but has not acked here, as JSON
# [message, exchange, routing key], and pushes it back onto its queue when the consumer's channel
# closes: that can be after a stopping worker looked at its queue.
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def inflight_key(name: str) -> str:
    return f"{PREFIX}inflight:{name}"


def incoming_key(name: str) -> str:
    return f"{PREFIX}incoming:{name}"


def request_key(request_id: str) -> str:
    return REQUEST + request_id


def result_key(request_id: str) -> str:
    return RESULT + request_id


def pending_key(tenant: str) -> str:
    return PENDING + tenant


def seen_key(model_id: str) -> str:
    """A model's remembered seq_ids."""
    return f"{PREFIX}seq:{model_id}"


def next_key(model_id: str) -> str:
    """A model's lowest seq_id not yet submitted."""
    return f"{PREFIX}next:{model_id}"


def unordered_seen_key(key: str) -> str:
    """A sampler key's remembered seq_ids."""
    return f"{PREFIX}useen:{key}"


def records_key(kind: str) -> str:
    return f"{PREFIX}records:{kind}"


def metrics_events_key(run_id: str) -> str:
    return f"{PREFIX}metrics:events:{run_id}"


def audit_key(day: str) -> str:
    return AUDIT + day


def worker_queue(name: str) -> str:
    """The Celery queue (a Redis list) of worker `name`."""
    return f"tinkerd.worker.{name}"
