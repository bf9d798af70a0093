"""Checkpoints and run metadata on disk, behind `tinker://` paths.

Layout under the data directory:

    runs/<model_id>/run.json                          the run's metadata (base model, LoRA config)
    runs/<model_id>/weights/<name>/                   training state: a PEFT adapter directory
        adapter_config.json, adapter_model.safetensors,   + optimizer.pt + tinkerd.json
    runs/<model_id>/sampler_weights/<name>/           a PEFT adapter directory + tinkerd.json
    runs/<model_id>/external_weights/<name>/          the same, for download (save_weights_external)

A checkpoint is written into a temporary directory beside its final place, flushed to disk, and
renamed into place, so a crash or a full disk never leaves a half-written checkpoint that loads.
A full disk is reported as `DiskFull` ("no space left on device (<path>)"), whatever library hit
it. A new store (a restart), and `sweep_temporary` every sweep after, clear what a crash left
behind (a writer holds a lock on its temporary directory, so a live save is never swept), and put
back a checkpoint that an interrupted overwrite had moved aside.
`tinkerd.json` holds its metadata (times, TTL, base model, LoRA config). No torch here: the API
lists and resolves checkpoints; the worker writes their contents through `write`.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tinkerd.types import DiskFull, NotFound, SaveWeights, ServerError, UserError

KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
META_FILE = "tinkerd.json"
# A temporary entry younger than this may be a write in progress, not a crash's leftover; older
# ones are swept unless their writer still holds their lock (Settings.temp_stale_seconds).
STALE_SECONDS = 300.0
LOCK_FILE = ".lock"  # in a temporary checkpoint directory, flock'ed by its writer
# Below this many free bytes, a failed write is taken for a full disk: libraries that write
# through their own code report a short write in their own words (torch: "unexpected pos").
NEARLY_FULL_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
# The longest TTL a checkpoint takes (the SDK documents 1 hour to 10 years): its expiry then
# stays a time that every client can parse and show.
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
# The times a record renders: 1970 to the end of year 9999 (what datetime and ISO 8601 hold).
_LAST_TIME = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


def out_of_space(e: BaseException, where: Path) -> bool:
    """Whether `e`, raised while writing under `where`, means the disk is full: ENOSPC or EDQUOT
    however it is wrapped (safetensors: "os error 28"), or any failed write while the
    filesystem has (almost) no room left (torch's short write, "unexpected pos 43520 vs 43412").
    Ask before removing what was written: that frees the room."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(e, OSError | RuntimeError) and type(e).__name__ != "SafetensorError":
        return False
    if "no space left on device" in str(e).lower() or "os error 28" in str(e):
        return True
    return free_bytes(where) < NEARLY_FULL_BYTES


def free_bytes(where: Path) -> float:
    """Free bytes (for an unprivileged writer) on the filesystem of `where` or its nearest
    existing parent; infinite when that cannot be told."""
    for path in (where, *where.parents):
        try:
            stat = os.statvfs(path)
        except OSError:
            continue
        return float(stat.f_bavail * stat.f_frsize)
    return math.inf


def check_name(name: object, what: str = "checkpoint name") -> str:
    """A name that is one safe path component: no '/', no '..', no hidden files."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise UserError(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-', without '/' or '..'"
        )
    return name


@dataclass(frozen=True)
class CheckpointPath:
    model_id: str
    kind: str  # "weights" | "sampler_weights"
    name: str

    @classmethod
    def parse(cls, path: object) -> CheckpointPath:
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise UserError(
                f"checkpoint path must look like tinker://<model_id>/weights/<name>, got {path!r}"
            )
        parts = path[len("tinker://") :].split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise UserError(
                f"invalid checkpoint path {path!r}: expected "
                "tinker://<model_id>/{weights|sampler_weights|external_weights}/<name>"
            )
        model_id, kind, name = parts
        check_name(name)
        if not model_id or model_id in (".", "..") or "\\" in model_id:
            raise UserError(f"invalid model id in checkpoint path {path!r}")
        return cls(model_id, kind, name)

    def __str__(self) -> str:
        return f"tinker://{self.model_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass
class CheckpointMeta:
    tinker_path: str
    kind: str
    model_id: str
    base_model: str
    lora: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    expires_at: float | None = None
    user_metadata: dict[str, Any] = field(default_factory=dict)
    has_optimizer: bool = False
    size_bytes: int = 0
    public: bool = False  # published: other keys may read it (never list, change or delete it)

    @classmethod
    def saved(
        cls, path: CheckpointPath, model_id: str, base_model: str, lora: Any, request: SaveWeights
    ) -> CheckpointMeta:
        """The record of a checkpoint a backend writes now for `request` (a weights checkpoint
        keeps the optimizer state, a sampler checkpoint does not)."""
        now = time.time()
        return cls(
            str(path),
            path.kind,
            model_id,
            base_model,
            asdict(lora),
            created_at=now,
            expires_at=now + request.ttl_seconds if request.ttl_seconds else None,
            user_metadata=request.user_metadata,
            has_optimizer=path.kind == "weights",
        )

    def expired(self, now: float | None = None) -> bool:
        """Past its expiry; a stored expiry that is no number (NaN included) never expires."""
        expires = self.expires_at
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            return False
        return expires <= (now or time.time())  # NaN compares False

    def to_api(self) -> dict[str, Any]:
        """The SDK's Checkpoint shape, for any stored values: an expiry past what a time can
        hold renders as none (it never comes), an unreadable creation time as 1970."""
        path = CheckpointPath.parse(self.tinker_path)
        metadata = self.user_metadata if isinstance(self.user_metadata, dict) else {}
        size = self.size_bytes
        return {
            "checkpoint_id": path.checkpoint_id,
            "checkpoint_type": KINDS[self.kind],
            "time": iso_time(self.created_at),
            "tinker_path": self.tinker_path,
            "size_bytes": size if type(size) is int and 0 <= size < 2**63 else None,
            "public": self.public is True,
            "user_metadata": {k: str(v) for k, v in metadata.items()} or None,
            "expires_at": iso_time_or_none(self.expires_at),
        }


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0  # gone already: someone else finished with it


def timestamp(value: object) -> float | None:
    """`value` as a POSIX time between 1970 and year 9999, or None: a stored record may hold
    anything (an older version wrote times from whatever TTL it was sent, or a hand edit)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not (math.isfinite(value) and 0 <= value <= _LAST_TIME):
        return None
    return float(value)


def iso_time_or_none(t: object) -> str | None:
    """An ISO 8601 UTC time, or None when `t` is not a time a record can hold."""
    checked = timestamp(t)
    return None if checked is None else datetime.fromtimestamp(checked, UTC).isoformat()


def iso_time(t: object) -> str:
    """An ISO 8601 UTC time for a field that must have one: 1970-01-01 when `t` is not a time
    (so one damaged record never fails a listing)."""
    return iso_time_or_none(t) or datetime.fromtimestamp(0, UTC).isoformat()


def sort_time(t: object) -> float:
    """A sort key for stored times that any stored value yields (unreadable ones sort first)."""
    return timestamp(t) or 0.0


def _locked(directory: Path) -> bool:
    """Whether a live writer holds the lock of a temporary checkpoint directory (flock: held
    per open file, so this process's own saves count too; released when its writer dies)."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False  # no lock file: never locked, or its contents are complete
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _how_to_replace(kind: str) -> str:
    """The advice for a name in use, in each client's terms: the message reaches the SDK, the
    command line and REST alike (the SDK's sampler save has no overwrite)."""
    if kind == "weights":
        return (
            "to replace it, save with overwrite (overwrite=True in the SDK, "
            "--overwrite with tinkerd save)"
        )
    return "delete it first, or replace it with tinkerd save --sampler --overwrite"


def _umask() -> int:
    """This process's umask, read without changing it where Linux reports it (setting it to
    read it back would race other threads' file creation)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(root: Path) -> None:
    """Give `root` and everything in it the modes a plain open() or mkdir() gives (0o666 and
    0o777 less the umask). safetensors writes its files 0o600 and mkdtemp makes 0o700: left so,
    a model directory or checkpoint is unreadable to anyone but the user who wrote it."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync_tree(directory: Path) -> int:
    """Flush every file in `directory` and the directory itself; returns the total size."""
    size = 0
    for f in directory.iterdir():
        if f.is_file():
            size += f.stat().st_size
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


class CheckpointStore:
    """The checkpoints and run records under `root` (the data directory's runs/)."""

    def __init__(
        self, root: Path, shared: bool = False, stale_seconds: float = STALE_SECONDS
    ) -> None:
        """`shared`: other processes (a cluster's API and workers) write to the same directory,
        so start-up recovery leaves alone what may be their writes in progress: temporary
        entries younger than `stale_seconds`, or locked by their writer."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.stale_seconds = stale_seconds
        self._recover(stale_seconds if shared else 0.0)

    def sweep_temporary(self) -> None:
        """What `_recover` does at start, again (every TTL sweep): a killed save's temporary
        directory goes once it is `stale_seconds` old and no writer holds its lock."""
        self._recover(self.stale_seconds)

    def _recover(self, min_age: float) -> None:
        """Finish what a crash interrupted: put back a checkpoint that an overwrite had moved
        aside but not yet replaced, and remove half-written or half-deleted directories (those
        older than `min_age` seconds whose writer does not hold their lock)."""
        now = time.time()
        for entry in self.root.glob("*/*/.*"):
            if entry.parent.name not in KINDS or not entry.is_dir():
                continue
            if min_age and _age(entry, now) < min_age or _locked(entry):
                continue
            kind, _, rest = entry.name[1:].partition("-")
            name = rest[:-33]  # <name>-<uuid4 hex>
            final = entry.parent / name
            try:
                if kind == "old" and _NAME.match(name) and not final.exists():
                    os.rename(entry, final)
                elif kind in ("tmp", "old", "del"):
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue  # left for the next start; never stops this one
        for tmp in self.root.glob("*/.run.json.*"):
            if not min_age or _age(tmp, now) >= min_age:
                tmp.unlink(missing_ok=True)

    def run_dir(self, model_id: str) -> Path:
        if "/" in model_id or model_id in ("", ".", ".."):
            raise UserError(f"invalid model id {model_id!r}")
        return self.root / model_id

    def directory(self, path: CheckpointPath) -> Path:
        return self.run_dir(path.model_id) / path.kind / path.name

    # -- runs --------------------------------------------------------------------------------

    def save_run(self, model_id: str, record: dict[str, Any]) -> None:
        """Write run.json atomically and durably (a temporary file, flushed, renamed): a
        failure (DiskFull on a full disk) leaves the earlier run.json, or no run directory."""
        run_dir = self.run_dir(model_id)
        made = not run_dir.exists()
        tmp = run_dir / f".run.json.{uuid.uuid4().hex}"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(json.dumps(record))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, run_dir / "run.json")
        except OSError as e:
            full = out_of_space(e, run_dir)
            tmp.unlink(missing_ok=True)
            if made:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            where = run_dir / "run.json"
            if full:
                raise DiskFull(where) from None
            raise ServerError(f"could not write {where}: {e}") from None

    def remove_run(self, model_id: str) -> None:
        """Forget a run that never came to be (its creation failed): its run.json, and its
        directory unless something else is in it."""
        run_dir = self.run_dir(model_id)
        (run_dir / "run.json").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()

    def load_runs(self) -> list[dict[str, Any]]:
        runs = []
        for f in sorted(self.root.glob("*/run.json")):
            try:
                runs.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue  # a damaged record hides one run, never the server
        return runs

    # -- checkpoints -------------------------------------------------------------------------

    def write(
        self,
        path: CheckpointPath,
        meta: CheckpointMeta,
        write_contents: Callable[[Path], None],
        overwrite: bool = False,
    ) -> CheckpointMeta:
        """Write a checkpoint atomically: contents, then metadata, flushed, renamed in place."""
        final = self.directory(path)
        if final.exists() and not overwrite and not self._expired_dir(final):
            raise UserError(f"checkpoint {path} already exists; {_how_to_replace(path.kind)}")
        tmp = final.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"
        lock = -1
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            lock = os.open(tmp / LOCK_FILE, os.O_CREAT | os.O_WRONLY, 0o644)
            fcntl.flock(lock, fcntl.LOCK_EX)  # a sweep leaves this directory alone
            write_contents(tmp)
            umask_modes(tmp)  # a checkpoint is readable as any file its owner writes
            (tmp / META_FILE).write_text(json.dumps(asdict(meta)))
            (tmp / LOCK_FILE).unlink()  # not part of the checkpoint; the lock stays held
            meta.size_bytes = _fsync_tree(tmp)
            (tmp / META_FILE).write_text(json.dumps(asdict(meta)))
            with self._lock:
                if final.exists():
                    trash = final.parent / f".old-{path.name}-{uuid.uuid4().hex}"
                    os.rename(final, trash)
                    try:
                        os.rename(tmp, final)
                    except BaseException:
                        os.rename(trash, final)  # the old checkpoint stays
                        raise
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    os.rename(tmp, final)
        except BaseException as e:
            full = out_of_space(e, final.parent)  # asked first: removing the temporary frees room
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise DiskFull(final) from None
            if isinstance(e, OSError):
                raise ServerError(f"could not write checkpoint {path}: {e}") from None
            raise
        finally:
            if lock >= 0:
                os.close(lock)
        return meta

    def meta(self, path: CheckpointPath) -> CheckpointMeta:
        """The checkpoint's metadata; NotFound if it does not exist, was deleted or expired."""
        directory = self.directory(path)
        try:
            meta = CheckpointMeta(**json.loads((directory / META_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            raise NotFound(f"checkpoint {path} not found") from None
        if meta.expired():
            self._remove(directory)
            raise NotFound(f"checkpoint {path} has expired")
        return meta

    def list(self, model_id: str) -> list[CheckpointMeta]:
        metas = []
        for kind in KINDS:
            for directory in sorted((self.run_dir(model_id) / kind).glob("[!.]*")):
                try:
                    metas.append(self.meta(CheckpointPath(model_id, kind, directory.name)))
                except NotFound:
                    continue
        return sorted(metas, key=lambda m: sort_time(m.created_at))

    def delete(self, path: CheckpointPath) -> None:
        self.meta(path)  # NotFound if absent
        self._remove(self.directory(path))

    def copy(self, source: CheckpointPath, meta: CheckpointMeta) -> CheckpointMeta:
        """Copy checkpoint `source` to `meta.tinker_path` (a new one, with `meta`'s record):
        its files are hard-linked where the filesystem allows, so no bytes are duplicated (a
        checkpoint's files are never rewritten in place: an overwrite renames a new directory
        over it), and copied where it does not."""
        origin = self.directory(source)

        def link_files(directory: Path) -> None:
            for f in sorted(origin.iterdir()):
                if f.name.startswith(".") or f.name == META_FILE or not f.is_file():
                    continue
                try:
                    os.link(f, directory / f.name)
                except OSError:
                    shutil.copy2(f, directory / f.name)

        self.meta(source)  # NotFound if it is gone
        return self.write(CheckpointPath.parse(meta.tinker_path), meta, link_files)

    def update(self, path: CheckpointPath, **changes: Any) -> CheckpointMeta:
        """Change fields of a checkpoint's metadata (`public`, `expires_at`): its tinkerd.json
        is rewritten through a flushed temporary file and a rename, so a reader sees the old
        record or the new one. NotFound if the checkpoint does not exist or has expired."""
        meta = self.meta(path)
        for key, value in changes.items():
            setattr(meta, key, value)
        directory = self.directory(path)
        tmp = directory / f".{META_FILE}.{uuid.uuid4().hex}"
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(asdict(meta)))
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                if not directory.is_dir():  # deleted meanwhile
                    raise NotFound(f"checkpoint {path} not found")
                os.replace(tmp, directory / META_FILE)
        except OSError as e:
            full = out_of_space(e, directory)
            tmp.unlink(missing_ok=True)
            if full:
                raise DiskFull(directory / META_FILE) from None
            raise ServerError(f"could not update checkpoint {path}: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return meta

    def expire(self) -> builtins.list[str]:  # `list` here is the method above
        """Remove every checkpoint past its TTL; returns their paths."""
        removed = []
        for meta_file in self.root.glob(f"*/*/*/{META_FILE}"):
            try:
                meta = CheckpointMeta(**json.loads(meta_file.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if meta.expired():
                self._remove(meta_file.parent)
                removed.append(meta.tinker_path)
        return removed

    def _expired_dir(self, directory: Path) -> bool:
        try:
            return CheckpointMeta(**json.loads((directory / META_FILE).read_text())).expired()
        except (OSError, ValueError, TypeError):
            return True  # no readable metadata: not a checkpoint anyone can load

    def _remove(self, directory: Path) -> None:
        with self._lock:
            if directory.exists():
                trash = directory.parent / f".del-{directory.name}-{uuid.uuid4().hex}"
                os.rename(directory, trash)
                shutil.rmtree(trash, ignore_errors=True)
