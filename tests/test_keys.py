"""API keys: the two stores (a data directory, a cluster's Redis), the API's key ring, and the
`tinkerd keys` commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tinkerd import keys as keys_module
from tinkerd.cli import main
from tinkerd.cluster.keys import API_KEYS, API_KEYS_MODE
from tinkerd.keys import (
    KEYED,
    OPEN,
    OPEN_MODE,
    FileKeys,
    KeyRing,
    RedisKeys,
    create_key,
    digest,
)


@pytest.fixture(params=["file", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "file":
        return FileKeys(tmp_path)
    return RedisKeys(request.getfixturevalue("client"))


def test_a_created_key_is_found_by_its_secret_and_only_its_hash_is_stored(store, tmp_path) -> None:
    secret, record = create_key(store, "alice", priority=8, max_models=2, max_queued=10)
    assert secret.startswith("tml-") and len(secret) > 40
    assert record.digest == digest(secret) and record.priority == 8
    stored = store.all()
    assert [k.name for k in stored] == ["alice"] and stored[0] == record
    assert secret not in json.dumps([k.public() for k in stored])
    if isinstance(store, FileKeys):
        assert secret not in store.path.read_text()
        assert store.path.stat().st_mode & 0o077 == 0  # readable by the server's user only
    ring = KeyRing(store)
    assert not ring.open
    assert ring.find(secret) == record
    assert ring.find("tml-" + "x" * 43) is None and ring.find(None) is None


def test_names_are_unique_and_checked(store) -> None:
    create_key(store, "alice")
    with pytest.raises(ValueError, match="exists"):
        create_key(store, "alice")
    for bad in ("", "a b", "x" * 65, "a/b"):
        with pytest.raises(ValueError, match="key name"):
            create_key(store, bad)
    with pytest.raises(ValueError, match="priority"):
        create_key(store, "p", priority=11)
    with pytest.raises(ValueError, match="at least 1"):
        create_key(store, "m", max_models=0)
    assert [k.name for k in store.all()] == ["alice"]


def test_a_revoked_key_stops_working_within_the_cache_interval(
    store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys_module, "CACHE_SECONDS", 0.05)
    alice, _ = create_key(store, "alice")
    bob, _ = create_key(store, "bob")
    ring = KeyRing(store)
    assert ring.find(alice) is not None
    assert store.revoke("alice") and not store.revoke("alice")
    time.sleep(0.1)
    assert ring.find(alice) is None and ring.find(bob).name == "bob"
    store.revoke("bob")
    time.sleep(0.1)
    assert not ring.open and ring.find(None) is None  # no keys left: still keyed


def test_an_empty_store_is_an_open_server(store) -> None:
    ring = KeyRing(store)
    assert ring.open and ring.find(None) is OPEN and ring.find("tml-anything") is OPEN
    assert OPEN.admin and OPEN.name == ""


def test_keys_commands_on_a_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = ["--data-dir", str(tmp_path)]
    assert main(["keys", "create", "alice", "--priority", "9", "--max-models", "3", *data]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("tml-")
    assert main(["keys", "create", "ops", "--admin", *data]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--json", *data]) == 0
    listed = {k["name"]: k for k in json.loads(capsys.readouterr().out)}
    assert listed["alice"]["priority"] == 9 and listed["alice"]["max_models"] == 3
    assert listed["ops"]["admin"] is True and "digest" not in listed["alice"]
    assert main(["keys", "list", *data]) == 0
    table = capsys.readouterr().out
    assert "alice" in table and secret not in table
    assert main(["keys", "create", "alice", *data]) == 2  # taken
    assert "exists" in capsys.readouterr().err
    assert main(["keys", "revoke", "alice", *data]) == 0
    assert main(["keys", "revoke", "alice", *data]) == 1
    assert KeyRing(FileKeys(tmp_path)).find(secret) is None


def test_keys_commands_on_a_cluster_redis(redis_url: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["keys", "create", "carol", "--redis", redis_url]) == 0
    secret = capsys.readouterr().out.strip()
    import redis

    ring = KeyRing(RedisKeys(redis.Redis.from_url(redis_url)))
    assert ring.find(secret).name == "carol"
    assert main(["keys", "revoke", "carol", "--redis", redis_url]) == 0


def test_an_open_server_says_so_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tinkerd.app import create_app
    from tinkerd.config import Settings
    from tinkerd.tasks import Scheduler

    settings = Settings.load(data_dir=tmp_path)
    with caplog.at_level("WARNING", logger="tinkerd.app"):
        create_app(settings, Scheduler())
    assert "OPEN to anyone" in caplog.text
    caplog.clear()
    create_key(FileKeys(tmp_path), "alice")
    with caplog.at_level("WARNING", logger="tinkerd.app"):
        app = create_app(settings, Scheduler())
    assert "OPEN" not in caplog.text
    with app.test_client() as http:
        assert http.get("/api/v1/training_runs").status_code == 401
        assert http.get("/api/v1/healthz").status_code == 200


# -- the server's mode: once keyed, open only on request ---------------------------------------


def test_revoking_the_last_key_leaves_the_server_keyed_until_it_is_opened(
    store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys_module, "CACHE_SECONDS", 0.05)
    assert store.mode() is None  # never held a key: open
    alice, _ = create_key(store, "alice")
    ring = KeyRing(store)
    with pytest.raises(ValueError, match="revoke them first"):
        store.set_open()  # not while a key is active
    assert store.mode() == KEYED and not ring.open
    assert store.revoke("alice")
    time.sleep(0.1)
    for r in (ring, KeyRing(store)):  # a running server, and one started now
        assert not r.open and r.active == 0
        assert r.find(alice) is None and r.find(None) is None and r.find("tml-x" * 9) is None
    store.set_open()  # the explicit choice
    time.sleep(0.1)
    assert store.mode() == OPEN_MODE and ring.open and ring.find(None) is OPEN
    bob, _ = create_key(store, "bob")  # a key closes it again
    time.sleep(0.1)
    assert store.mode() == KEYED and not ring.open and ring.find(None) is None
    assert ring.find(bob).name == "bob"


def test_a_running_server_stays_keyed_when_its_redis_forgets_the_keys(
    client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis that restarts empty (no persistence) loses keys and mode: the API processes
    that saw keys keep refusing, rather than opening."""
    monkeypatch.setattr(keys_module, "CACHE_SECONDS", 0.05)
    store = RedisKeys(client)
    create_key(store, "alice")
    ring = KeyRing(store)
    client.flushdb()
    time.sleep(0.1)
    assert store.mode() is None and not ring.open and ring.find(None) is None


def test_stores_written_by_an_older_version_are_keyed(client, tmp_path: Path) -> None:
    """keys.json as a plain list (even empty: it was only written once a key was added), and a
    cluster's key hash without a mode."""
    (tmp_path / "keys.json").write_text("[]")
    files = FileKeys(tmp_path)
    assert files.mode() == KEYED and not KeyRing(files).open
    secret, record = create_key(files, "alice")
    assert KeyRing(files).find(secret) == record

    redis_keys = RedisKeys(client)
    create_key(redis_keys, "old")
    client.delete(API_KEYS_MODE)  # as an older version wrote it
    assert redis_keys.mode() == KEYED and not KeyRing(redis_keys).open
    assert redis_keys.revoke("old") and client.hlen(API_KEYS) == 0
    assert redis_keys.mode() == KEYED and not KeyRing(redis_keys).open


def test_keys_commands_say_what_the_server_does_and_http_agrees(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported fault: create alice, revoke alice; the revoked key and no key at all must
    then answer 401, not 200, and see nothing. Each command says what the server does next."""
    from tinkerd.app import create_app
    from tinkerd.config import Settings
    from tinkerd.tasks import Scheduler

    monkeypatch.setattr(keys_module, "CACHE_SECONDS", 0.0)
    data = ["--data-dir", str(tmp_path)]
    http = create_app(Settings.load(data_dir=tmp_path), Scheduler()).test_client()

    def status(key: str | None) -> int:
        return http.get(
            "/api/v1/training_runs", headers={"X-API-Key": key} if key else {}
        ).status_code

    assert status(None) == 200  # a fresh server runs open
    assert main(["keys", "list", *data]) == 0
    assert "runs OPEN" in capsys.readouterr().out

    assert main(["keys", "create", "alice", *data]) == 0
    out = capsys.readouterr()
    secret = out.out.strip()
    assert "refuses every request without a valid key (1 active key)" in out.err
    assert (status(secret), status(None)) == (200, 401)

    assert main(["keys", "open", *data]) == 2  # refused while alice's key is active
    assert "revoke them first" in capsys.readouterr().err
    assert status(None) == 401

    assert main(["keys", "revoke", "alice", *data]) == 0
    err = capsys.readouterr().err
    assert "answer 401" in err and "refuses every request (0 active keys" in err
    assert (status(secret), status(None), status("tml-" + "y" * 43)) == (401, 401, 401)
    r = http.get("/api/v1/checkpoints", headers={"X-API-Key": secret})
    assert r.status_code == 401 and r.json["category"] == "user"
    assert http.get("/api/v1/healthz").status_code == 200  # liveness stays public
    assert main(["keys", "list", *data]) == 0
    assert "refuses every request (0 active keys" in capsys.readouterr().out

    assert main(["keys", "open", *data]) == 0  # the explicit choice
    assert "runs OPEN (explicitly opened)" in capsys.readouterr().err
    assert (status(None), status(secret)) == (200, 200)

    assert main(["keys", "create", "bob", *data]) == 0
    capsys.readouterr()
    assert status(None) == 401


def test_a_keyed_server_without_keys_says_so_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tinkerd.app import create_app
    from tinkerd.config import Settings
    from tinkerd.tasks import Scheduler

    create_key(FileKeys(tmp_path), "alice")
    FileKeys(tmp_path).revoke("alice")
    with caplog.at_level("WARNING", logger="tinkerd.app"):
        app = create_app(Settings.load(data_dir=tmp_path), Scheduler())
    assert "refuses every request" in caplog.text and "OPEN" not in caplog.text
    assert app.test_client().get("/api/v1/training_runs").status_code == 401
