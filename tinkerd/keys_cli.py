"""`tinkerd keys create|list|revoke|open`: manage the API keys of a server's state directly (its
data directory, or the Redis of a cluster), so they work while the server runs or not. Each
command ends by saying what the server does with requests from then on."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tinkerd import audit
from tinkerd.config import Settings
from tinkerd.keys import (
    CACHE_SECONDS,
    DEFAULT_PRIORITY,
    MAX_PRIORITY,
    KeyStore,
    create_key,
    describe,
    key_store,
)
from tinkerd.storage import iso_time


def _store(args: argparse.Namespace) -> KeyStore:
    settings = Settings.load(data_dir=args.data_dir, redis_url=args.redis)
    return key_store(settings.data_dir, settings.redis_url)


def _audit(args: argparse.Namespace, event: str, **details: Any) -> None:
    """Record a key change in the server's audit log, as done by this operator (an admin key
    reads it with `get_audit_log`)."""
    settings = Settings.load(data_dir=args.data_dir, redis_url=args.redis)
    actor = f"operator:{os.environ.get('USER') or os.getuid()}"
    audit.record(audit.audit_store(settings.data_dir, settings.redis_url), actor, event, **details)


def _tell_mode(store: KeyStore, file: Any = None) -> None:
    """What a running server does from now on (within CACHE_SECONDS); on stderr by default."""
    print(describe(store.mode(), store.all()), file=file or sys.stderr)


def _create(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        secret, key = create_key(
            store, args.name, args.priority, args.max_models, args.max_queued, args.admin
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _audit(args, "api_key_create", name=key.name, admin=key.admin, priority=key.priority)
    print(secret)
    print(
        f"created key {key.name!r} (priority {key.priority}); it is shown only now: "
        "keep it, the server stores only its hash",
        file=sys.stderr,
    )
    _tell_mode(store)
    return 0


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    keys = sorted(store.all(), key=lambda k: k.created_at)
    if args.json:
        print(json.dumps([k.public() for k in keys], indent=2))
        _tell_mode(store)
        return 0
    if not keys:
        print("no keys")
        _tell_mode(store, sys.stdout)
        return 0
    rows = [["NAME", "PRIORITY", "MAX MODELS", "MAX QUEUED", "ADMIN", "CREATED (UTC)"]]
    for k in keys:
        created = iso_time(k.created_at)[:16].replace("T", " ")  # any stored value renders
        rows.append(
            [
                k.name,
                str(k.priority),
                _limit(k.max_models),
                _limit(k.max_queued),
                "yes" if k.admin else "",
                created,
            ]  # fmt: skip
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    _tell_mode(store, sys.stdout)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    store = _store(args)
    if not store.revoke(args.name):
        print(f"error: no key named {args.name!r}", file=sys.stderr)
        _tell_mode(store)
        return 1
    _audit(args, "api_key_revoke", name=args.name)
    print(
        f"revoked key {args.name!r}; requests with it answer 401 within {CACHE_SECONDS:g} s",
        file=sys.stderr,
    )
    _tell_mode(store)
    return 0


def _open(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        store.set_open()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        _tell_mode(store)
        return 2
    _audit(args, "api_keys_open")
    _tell_mode(store)
    return 0


def add_key_commands(commands: Any) -> None:
    """`tinkerd keys ...`; each subcommand sets `client_command(args) -> exit status`."""
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--data-dir",
        default=None,
        help="the server's data directory (default $TINKERD_DATA_DIR, else "
        "~/.local/share/tinkerd); keys live in its keys.json",
    )
    state.add_argument(
        "--redis",
        default=os.environ.get("TINKERD_REDIS_URL"),
        help="a cluster's Redis URL: its keys live there (default $TINKERD_REDIS_URL)",
    )
    keys = commands.add_parser(
        "keys",
        help="create, list and revoke API keys; open a server",
        description="API keys: once a key was created, every request needs a valid one "
        "(X-API-Key), even after the last is revoked, until `keys open`; each key sees only "
        "its own sessions, models, samplers and checkpoints.",
    )
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create",
        help="make a key and print it (once)",
        description="Make a key and print it; only its hash is stored.",
        parents=[state],
    )
    create.add_argument("name", help="the key's name: it owns what is made with the key")
    create.add_argument(
        "--priority",
        type=int,
        default=DEFAULT_PRIORITY,
        help=f"0-{MAX_PRIORITY}, higher runs first on busy workers (default {DEFAULT_PRIORITY})",
    )
    create.add_argument("--max-models", type=int, help="live models at once (default no limit)")
    create.add_argument(
        "--max-queued", type=int, help="requests queued or running at once (default no limit)"
    )
    create.add_argument(
        "--admin", action="store_true", help="sees every key's work (for operators)"
    )
    create.set_defaults(client_command=_create)

    listing = actions.add_parser("list", help="list the keys (never the secrets)", parents=[state])
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(client_command=_list)

    revoke = actions.add_parser(
        "revoke",
        help="remove a key: its requests answer 401 (the server stays keyed)",
        parents=[state],
    )
    revoke.add_argument("name")
    revoke.set_defaults(client_command=_revoke)

    opening = actions.add_parser(
        "open",
        help="run the server open: no key needed, every caller sees everything",
        description="Run the server open: every request is served without a key, as one "
        "all-seeing tenant. Refused while any key is active (revoke them first). A server "
        "that had keys never opens otherwise: revoking its last key makes it refuse every "
        "request. `keys create` makes it require keys again.",
        parents=[state],
    )
    opening.set_defaults(client_command=_open)
