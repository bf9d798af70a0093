"""API keys: who may call the server, what each sees, how it is scheduled.

A key is `tml-` and 43 random characters (the SDK refuses keys without the prefix); only its
SHA-256 is stored, so a leaked key file or Redis dump grants nothing. Keys live with the
server's state: `<data-dir>/keys.json` for one box, a Redis hash for a cluster, so the
`tinkerd keys` commands and every API process see the same set. A server with no keys runs
open: every caller is the same anonymous, all-seeing tenant (and the server says so at start).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis

KEY_PREFIX = "tml-"
DEFAULT_PRIORITY = 5
MAX_PRIORITY = 10
REDIS_KEYS = "tinkerd:keys"  # hash: name -> ApiKey JSON
REDIS_DIGESTS = "tinkerd:key-digests"  # hash: sha256 -> name
# A process re-reads the key set at most this often, so a `keys revoke` takes effect within it.
CACHE_SECONDS = 1.0


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    """A tenant: its name owns the sessions, models, samplers and checkpoints made with it.

    priority: 0-10, higher runs first when workers are contended (never starving the rest).
    max_models: live models at once (None: no limit); max_queued: requests submitted and not
    yet finished (None: no limit). Past either limit a request answers 429 with Retry-After.
    admin: sees every tenant's work (operators, the console of the whole cluster)."""

    name: str
    digest: str
    priority: int = DEFAULT_PRIORITY
    max_models: int | None = None
    max_queued: int | None = None
    admin: bool = False
    created_at: float = field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        """What `keys list` shows: everything but the digest."""
        return {k: v for k, v in asdict(self).items() if k != "digest"}


# The caller of an open server (no keys configured): one tenant that sees everything.
OPEN = ApiKey(name="", digest="", admin=True)


def check_name(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"a key name is 1-64 letters, digits, '-', '_' or '.', got {name!r}")
    return name


class KeyStore(Protocol):
    def add(self, key: ApiKey) -> None:
        """Store `key`; ValueError if its name is taken."""
        ...

    def revoke(self, name: str) -> bool:
        """Remove the key named `name`; False if there was none."""
        ...

    def all(self) -> list[ApiKey]: ...


class FileKeys:
    """`keys.json` in the data directory, rewritten atomically under a lock file."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "keys.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def all(self) -> list[ApiKey]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [ApiKey(**entry) for entry in raw]

    def _write(self, keys: list[ApiKey]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump([asdict(k) for k in keys], f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def add(self, key: ApiKey) -> None:
        with self._locked():
            keys = self.all()
            if any(k.name == key.name for k in keys):
                raise ValueError(f"a key named {key.name!r} exists; revoke it first")
            self._write([*keys, key])

    def revoke(self, name: str) -> bool:
        with self._locked():
            keys = self.all()
            kept = [k for k in keys if k.name != name]
            if len(kept) == len(keys):
                return False
            self._write(kept)
            return True


class RedisKeys:
    """The cluster's keys in Redis, shared by every API process."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def all(self) -> list[ApiKey]:
        return [ApiKey(**json.loads(v)) for v in self.redis.hvals(REDIS_KEYS)]

    def add(self, key: ApiKey) -> None:
        if not self.redis.hsetnx(REDIS_KEYS, key.name, json.dumps(asdict(key))):
            raise ValueError(f"a key named {key.name!r} exists; revoke it first")
        self.redis.hset(REDIS_DIGESTS, key.digest, key.name)

    def revoke(self, name: str) -> bool:
        raw = self.redis.hget(REDIS_KEYS, name)
        if raw is None:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(REDIS_KEYS, name)
        pipe.hdel(REDIS_DIGESTS, json.loads(raw)["digest"])
        pipe.execute()
        return True


def create_key(
    store: KeyStore,
    name: str,
    priority: int = DEFAULT_PRIORITY,
    max_models: int | None = None,
    max_queued: int | None = None,
    admin: bool = False,
) -> tuple[str, ApiKey]:
    """A new key: the secret (shown once) and its stored record."""
    if not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be 0-{MAX_PRIORITY}, got {priority}")
    for limit in (max_models, max_queued):
        if limit is not None and limit < 1:
            raise ValueError(f"limits must be at least 1, got {limit}")
    secret = new_key()
    record = ApiKey(check_name(name), digest(secret), priority, max_models, max_queued, admin)
    store.add(record)
    return secret, record


class KeyRing:
    """The API's view of the key set: finds the tenant of a presented key. Re-reads the store
    at most every CACHE_SECONDS, so keys created or revoked by the CLI apply to a running
    server without a restart."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._by_digest: dict[str, ApiKey] = {}
        self._read_at = -float("inf")
        self._refresh()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._read_at < CACHE_SECONDS:
            return
        with self._lock:
            if now - self._read_at < CACHE_SECONDS:
                return
            self._by_digest = {k.digest: k for k in self.store.all()}
            self._read_at = now

    @property
    def open(self) -> bool:
        """No keys configured: every caller is OPEN."""
        self._refresh()
        return not self._by_digest

    def find(self, presented: str | None) -> ApiKey | None:
        """The key's tenant; OPEN when the server has no keys; None when it is not valid."""
        self._refresh()
        if not self._by_digest:
            return OPEN
        if not presented:
            return None
        return self._by_digest.get(digest(presented))


def key_store(data_dir: Path, redis_url: str | None) -> KeyStore:
    """Where this server's keys live: its Redis when scaled out, else its data directory."""
    if redis_url:
        return RedisKeys(redis.Redis.from_url(redis_url))
    return FileKeys(data_dir)
