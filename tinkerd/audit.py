"""The audit log: what each API key did (created, saved, deleted, published...), and key changes.

An entry is `{"timestamp", "event", "key", "event_details"}`; `event` is `<resource>_<action>`
as in Tinker's log (`checkpoint_save`, `training_run_create`, `api_key_revoke`), `key` the name
of the API key that did it ("" on a server without keys; `operator:<user>` for the `tinkerd keys`
commands). It lives with the server's other state, one day (UTC) per file or Redis list, so a
day's query reads that day alone:

    <data-dir>/audit/<YYYY-MM-DD>.jsonl     `tinkerd serve` (appended under a lock)
    `cluster.keys.audit_key(day)`           a cluster's Redis (a list, kept RETENTION_DAYS)

A key reads its own entries; an admin key reads everyone's. Recording never fails a request:
an entry that cannot be written is logged and dropped.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Protocol

from tinkerd.cluster.keys import audit_key
from tinkerd.storage import iso_time, sort_time

log = logging.getLogger(__name__)

RETENTION_DAYS = 400  # a cluster's days expire; the files of `tinkerd serve` stay until removed
# The SDK's `event_type` filter: which events each resource covers ("all": every one).
EVENT_TYPES = {
    "checkpoints": ("checkpoint_",),
    "projects": ("project_",),
    "teams": ("team_",),
    "organizations": ("api_key", "session_", "training_run_", "sampler_"),
}


def day_of(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).date().isoformat()


class AuditLog(Protocol):
    def append(self, entry: dict[str, Any]) -> None:
        """Store one entry (its `timestamp` decides its day)."""
        ...

    def day(self, day: str) -> list[dict[str, Any]]:
        """Every entry of `day` (YYYY-MM-DD, UTC), oldest first."""
        ...


class FileAudit:
    """One JSON line per entry in `<data-dir>/audit/<day>.jsonl`, appended under an exclusive
    lock so that concurrent writers (the API's threads, `tinkerd keys`) never interleave."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "audit"

    def append(self, entry: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry) + "\n").encode()
        path = self.root / f"{day_of(entry['timestamp'])}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
        finally:
            os.close(fd)

    def day(self, day: str) -> list[dict[str, Any]]:
        try:
            lines = (self.root / f"{day}.jsonl").read_text().splitlines()
        except OSError:
            return []
        return [entry for line in lines if (entry := _entry(line)) is not None]


class RedisAudit:
    """A list per day in the cluster's Redis, shared by every API process and `tinkerd keys`."""

    def __init__(self, client: Any) -> None:
        self.redis = client

    def append(self, entry: dict[str, Any]) -> None:
        key = audit_key(day_of(entry["timestamp"]))
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(key, json.dumps(entry))
        pipe.expire(key, RETENTION_DAYS * 86400)
        pipe.execute()

    def day(self, day: str) -> list[dict[str, Any]]:
        raws = self.redis.lrange(audit_key(day), 0, -1)
        return [entry for raw in raws if (entry := _entry(raw)) is not None]


def _entry(raw: str | bytes) -> dict[str, Any] | None:
    """A stored line as an entry; None for a damaged one (it hides itself, not the day)."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("timestamp"), int | float):
        return None
    return entry


def audit_store(data_dir: Path, redis_url: str | None) -> AuditLog:
    """Where this server's audit log lives: its Redis when scaled out, else its data directory
    (as `keys.key_store` picks for the keys)."""
    if redis_url:
        import redis

        return RedisAudit(redis.Redis.from_url(redis_url))
    return FileAudit(data_dir)


def record(store: AuditLog, key: str, event: str, **details: Any) -> None:
    """Add what `key` did to the log; never raises (the act itself has happened)."""
    entry = {"timestamp": time.time(), "event": event, "key": key, "event_details": details}
    try:
        store.append(entry)
    except Exception:  # noqa: BLE001 - an audit write must not fail what it records
        log.exception("could not record audit event %s of key %r", event, key)


def entries(store: AuditLog, day: date, event_type: str, key: str | None) -> list[dict[str, Any]]:
    """The SDK's AuditLogEntry list of `day` for `event_type`, of `key` alone (None: every
    key's, for an admin), oldest first."""
    prefixes = EVENT_TYPES.get(event_type)
    found = []
    for entry in sorted(store.day(day.isoformat()), key=lambda e: sort_time(e["timestamp"])):
        event = str(entry.get("event", ""))
        if key is not None and entry.get("key") != key:
            continue
        if prefixes is not None and not event.startswith(prefixes):
            continue
        details = entry.get("event_details")
        details = dict(details) if isinstance(details, dict) else {}
        details["key"] = entry.get("key", "")
        found.append(
            {
                "timestamp": iso_time(entry["timestamp"]),
                "event": event,
                "event_details": details,
                "model_id": details.get("model_id"),
                "tinker_path": details.get("tinker_path"),
                "purpose": details.get("purpose"),
            }
        )
    return found
