"""Checkpoint files: atomic writes, name validation, TTL, listing, run records."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tinkerd.storage import CheckpointMeta, CheckpointPath, CheckpointStore, check_name
from tinkerd.types import NotFound, ServerError, UserError

MODEL = "sess:train:0"


def meta(path: CheckpointPath, ttl: float | None = None) -> CheckpointMeta:
    expires = time.time() + ttl if ttl is not None else None
    return CheckpointMeta(
        str(path), path.kind, path.model_id, "base", {"rank": 4}, expires_at=expires
    )


def write_files(directory: Path) -> None:
    (directory / "adapter_config.json").write_text("{}")
    (directory / "adapter_model.safetensors").write_bytes(b"x" * 100)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "runs")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "-x", "a" * 200, "x\\y"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(UserError):
        check_name(name)


@pytest.mark.parametrize(
    "path",
    [
        "weights/x",
        "tinker://m/weights",
        "tinker://m/other/x",
        "tinker://m/weights/../x",
        "tinker://m/weights/a/b",
        "tinker:///weights/x",
        7,
    ],
)
def test_bad_paths_are_refused(path) -> None:
    with pytest.raises(UserError):
        CheckpointPath.parse(path)


def test_path_round_trip() -> None:
    path = CheckpointPath.parse("tinker://s:train:3/sampler_weights/step-10")
    assert (path.model_id, path.kind, path.name) == ("s:train:3", "sampler_weights", "step-10")
    assert str(path) == "tinker://s:train:3/sampler_weights/step-10"


def test_write_list_delete(store: CheckpointStore) -> None:
    path = CheckpointPath(MODEL, "weights", "first")
    written = store.write(path, meta(path), write_files)
    assert written.size_bytes >= 100
    assert store.meta(path).tinker_path == str(path)
    assert [m.tinker_path for m in store.list(MODEL)] == [str(path)]
    with pytest.raises(UserError, match="already exists"):
        store.write(path, meta(path), write_files)
    store.write(path, meta(path), write_files, overwrite=True)
    store.delete(path)
    with pytest.raises(NotFound):
        store.meta(path)
    with pytest.raises(NotFound):
        store.delete(path)
    assert store.list(MODEL) == []


def test_failed_write_leaves_nothing_that_loads(store: CheckpointStore) -> None:
    path = CheckpointPath(MODEL, "weights", "broken")

    def fail(directory: Path) -> None:
        write_files(directory)
        raise OSError(28, "No space left on device")

    with pytest.raises(ServerError, match=r"^no space left on device \(.*/weights/broken\)$"):
        store.write(path, meta(path), fail)
    with pytest.raises(NotFound):
        store.meta(path)
    assert not any(store.run_dir(MODEL).rglob("*.safetensors"))
    assert not list(store.run_dir(MODEL).rglob(".*"))  # no temporary left either


def test_failed_overwrite_keeps_the_old_checkpoint(store: CheckpointStore) -> None:
    path = CheckpointPath(MODEL, "weights", "keep")
    store.write(path, meta(path), write_files)

    def fail(directory: Path) -> None:
        raise OSError(5, "I/O error")

    with pytest.raises(ServerError):
        store.write(path, meta(path), fail, overwrite=True)
    assert (store.directory(path) / "adapter_model.safetensors").read_bytes() == b"x" * 100


def test_ttl_expiry(store: CheckpointStore) -> None:
    short = CheckpointPath(MODEL, "sampler_weights", "short")
    long = CheckpointPath(MODEL, "weights", "long")
    store.write(short, meta(short, ttl=0.2), write_files)
    store.write(long, meta(long, ttl=3600), write_files)
    assert store.meta(short).expires_at is not None
    time.sleep(0.3)
    assert store.expire() == [str(short)]
    assert not store.directory(short).exists()
    with pytest.raises(NotFound, match="not found|expired"):
        store.meta(short)
    assert [m.tinker_path for m in store.list(MODEL)] == [str(long)]


def test_runs_survive_a_new_store(store: CheckpointStore, tmp_path: Path) -> None:
    store.save_run(MODEL, {"model_id": MODEL, "base_model": "b"})
    (store.run_dir("other")).mkdir()
    (store.run_dir("other") / "run.json").write_text("{not json")
    again = CheckpointStore(tmp_path / "runs")
    assert again.load_runs() == [{"model_id": MODEL, "base_model": "b"}]
