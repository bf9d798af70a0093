"""API keys: the two stores (a data directory, a cluster's Redis), the API's key ring, and the
`tinkerd keys` commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tinkerd import keys as keys_module
from tinkerd.cli import main
from tinkerd.keys import OPEN, FileKeys, KeyRing, RedisKeys, create_key, digest


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
    assert ring.open and ring.find(None) is OPEN  # no keys left: open again


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
