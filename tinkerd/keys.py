"""API keys: who may call the server, what each sees, how it is scheduled.

A key is `tml-` and 43 random characters (the SDK refuses keys without the prefix); only its
SHA-256 is stored, so a leaked key file or Redis dump grants nothing. Keys live with the
server's state: `<data-dir>/keys.json` for one box, a Redis hash for a cluster, so the
`tinkerd keys` commands and every API process see the same set.

The store also holds the server's mode. A store that never held a key runs open: every caller is
the same anonymous, all-seeing tenant (and the server says so at start). Adding a key makes it
keyed, and it stays keyed when its last key is revoked (then it refuses every request): only
`tinkerd keys open` (`KeyStore.set_open`, while no key is active) makes it open again.
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

from tinkerd.cluster.keys import API_KEY_DIGESTS, API_KEYS, API_KEYS_MODE

KEY_PREFIX = "tml-"
DEFAULT_PRIORITY = 5
MAX_PRIORITY = 10
# The server's mode, kept with its keys. None (no mode stored): it never held a key, so open.
KEYED = "keyed"
OPEN_MODE = "open"
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
        """Store `key` and make the server keyed; ValueError if its name is taken."""
        ...

    def revoke(self, name: str) -> bool:
        """Remove the key named `name` (the server stays keyed); False if there was none."""
        ...

    def all(self) -> list[ApiKey]: ...

    def mode(self) -> str | None:
        """KEYED, OPEN_MODE (set by `set_open`), or None when the store never held a key."""
        ...

    def set_open(self) -> None:
        """Run the server open from now on; ValueError while any key is active."""
        ...


def _refuse_open(keys: list[ApiKey]) -> None:
    if keys:
        names = ", ".join(sorted(k.name for k in keys))
        raise ValueError(
            f"{len(keys)} active key(s) ({names}): revoke them first, so that no key holder "
            "is surprised to find the server open"
        )


class FileKeys:
    """`keys.json` in the data directory, rewritten atomically under a lock file:
    {"mode": ..., "keys": [...]}. An older version's plain list of keys reads as keyed (the
    file was only ever written when a key was added)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "keys.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> tuple[str | None, list[ApiKey]]:
        """(mode, keys). An unreadable file raises: a server never opens on a damaged store."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None, []
        if isinstance(raw, list):  # written by an older version, which held a key once
            return KEYED, [ApiKey(**entry) for entry in raw]
        return raw["mode"], [ApiKey(**entry) for entry in raw["keys"]]

    def all(self) -> list[ApiKey]:
        return self._read()[1]

    def mode(self) -> str | None:
        return self._read()[0]

    def _write(self, mode: str, keys: list[ApiKey]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"mode": mode, "keys": [asdict(k) for k in keys]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def add(self, key: ApiKey) -> None:
        with self._locked():
            keys = self.all()
            if any(k.name == key.name for k in keys):
                raise ValueError(f"a key named {key.name!r} exists; revoke it first")
            self._write(KEYED, [*keys, key])

    def revoke(self, name: str) -> bool:
        with self._locked():
            mode, keys = self._read()
            kept = [k for k in keys if k.name != name]
            if len(kept) == len(keys):
                return False
            self._write(mode or KEYED, kept)
            return True

    def set_open(self) -> None:
        with self._locked():
            keys = self.all()
            _refuse_open(keys)
            self._write(OPEN_MODE, keys)


class RedisKeys:
    """The cluster's keys in Redis, shared by every API process."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def all(self) -> list[ApiKey]:
        return [ApiKey(**json.loads(v)) for v in self.redis.hvals(API_KEYS)]

    def mode(self) -> str | None:
        mode = self.redis.get(API_KEYS_MODE)
        if mode is None:  # an older version's cluster: keyed while it holds a key
            return KEYED if self.redis.hlen(API_KEYS) else None
        return mode.decode() if isinstance(mode, bytes) else mode

    def add(self, key: ApiKey) -> None:
        # Keyed first: no moment holds an active key in a store that says open.
        self.redis.set(API_KEYS_MODE, KEYED)
        if not self.redis.hsetnx(API_KEYS, key.name, json.dumps(asdict(key))):
            raise ValueError(f"a key named {key.name!r} exists; revoke it first")
        self.redis.hset(API_KEY_DIGESTS, key.digest, key.name)

    def set_open(self) -> None:
        with self.redis.pipeline() as pipe:
            pipe.watch(API_KEYS)  # a key added meanwhile fails the transaction (WatchError)
            _refuse_open([ApiKey(**json.loads(v)) for v in pipe.hvals(API_KEYS)])
            pipe.multi()
            pipe.set(API_KEYS_MODE, OPEN_MODE)
            pipe.execute()

    def revoke(self, name: str) -> bool:
        raw = self.redis.hget(API_KEYS, name)
        if raw is None:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(API_KEYS, name)
        pipe.hdel(API_KEY_DIGESTS, json.loads(raw)["digest"])
        pipe.set(API_KEYS_MODE, KEYED)  # an older version's cluster has none: its last key held it
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


def server_mode(mode: str | None, keys: list[ApiKey]) -> str:
    """What a server with this store does: KEYED or OPEN_MODE. Any active key means keyed,
    whatever the stored mode says; open only when the store never held a key or was opened."""
    return KEYED if keys or mode == KEYED else OPEN_MODE


def describe(mode: str | None, keys: list[ApiKey]) -> str:
    """One sentence for the operator: what the server does with requests from now on."""
    if server_mode(mode, keys) == OPEN_MODE:
        how = "explicitly opened" if mode == OPEN_MODE else "no key was ever created"
        return (
            f"the server runs OPEN ({how}): anyone who can reach it is served and sees "
            "everything; `tinkerd keys create NAME` makes it require keys"
        )
    n = len(keys)
    if not n:
        return (
            "the server refuses every request (0 active keys; it stays keyed): "
            "`tinkerd keys create NAME` makes a key, `tinkerd keys open` runs it open"
        )
    return (
        "the server refuses every request without a valid key "
        f"({n} active key{'s' if n != 1 else ''})"
    )


class KeyRing:
    """The API's view of the key set: finds the tenant of a presented key. Re-reads the store
    at most every CACHE_SECONDS, so keys created or revoked by the CLI apply to a running
    server without a restart. Once keyed, it stays keyed until the store says OPEN_MODE: a
    store that lost its mode (a Redis that restarted empty) does not open the server."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._by_digest: dict[str, ApiKey] = {}
        self._mode = OPEN_MODE
        self._read_at = -float("inf")
        self._refresh()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._read_at < CACHE_SECONDS:
            return
        with self._lock:
            if now - self._read_at < CACHE_SECONDS:
                return
            keys, mode = self.store.all(), self.store.mode()
            if mode is None and self._mode == KEYED:
                mode = KEYED  # the store forgot it held keys; only `keys open` opens
            self._by_digest = {k.digest: k for k in keys}
            self._mode = server_mode(mode, keys)
            self._read_at = now

    @property
    def open(self) -> bool:
        """An open server (never keyed, or opened explicitly): every caller is OPEN."""
        self._refresh()
        return self._mode == OPEN_MODE

    @property
    def active(self) -> int:
        """How many keys are valid now."""
        self._refresh()
        return len(self._by_digest)

    def find(self, presented: str | None) -> ApiKey | None:
        """The key's tenant; OPEN on an open server; None when it is not valid (on a keyed
        server without active keys, none is)."""
        self._refresh()
        if self._mode == OPEN_MODE:
            return OPEN
        if not presented:
            return None
        return self._by_digest.get(digest(presented))


def key_store(data_dir: Path, redis_url: str | None) -> KeyStore:
    """Where this server's keys live: its Redis when scaled out, else its data directory."""
    if redis_url:
        return RedisKeys(redis.Redis.from_url(redis_url))
    return FileKeys(data_dir)
