"""Sessions, training runs and samplers, as the API sees them.

The weights live with the worker; this is what the API answers from without asking it
(`get_info`, session checks, REST listings). Each training run's record is also written to the
checkpoint store, so runs and their checkpoints are listed after a restart. Plain data, no torch.

In a cluster the records live in Redis, which may come back empty (restarted without persistence,
or flushed). Nothing is lost for good: runs are read back from the data directory when Redis does
not have them, a session unknown to Redis is re-created for the key that uses it, and each worker
writes back the models it holds (`restore`).

Every record carries its owner, the name of the API key that made it; each request sees the
registry through `seen_by(key)`, in which another key's records do not exist (NotFound, as for
an unknown id), so no route can leak or touch them.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tinkerd.storage import CheckpointStore
from tinkerd.types import (
    LoraConfig,
    NotFound,
    SamplerWeights,
    ServerError,
    TinkerdError,
    UserError,
)

log = logging.getLogger(__name__)

# What a session id looks like (`create_session`): only such an id is re-created on use.
SESSION_ID = re.compile(r"^[0-9a-f]{16}$")
# The session of the simple JSON API's models (api/simple.py), which have no SDK session.
SIMPLE_SESSION = "simple"
# The session of copies made without one (api/checkpoints.py copy_weights): runs no worker holds.
COPY_SESSION = "copy"


@dataclass
class Session:
    session_id: str
    tags: list[str]
    user_metadata: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    finished: str | None = None
    owner: str = ""
    display_name: str | None = None
    project_id: str | None = None  # a label (`assign_session_project`); tinkerd has no projects

    def touch(self) -> None:
        self.last_heartbeat = time.time()


@dataclass
class ModelRecord:
    model_id: str
    session_id: str
    base_model: str  # the name the user gave
    tokenizer_id: str
    lora: LoraConfig
    user_metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    last_request_time: float = field(default_factory=time.time)
    owner: str = ""
    project_id: str | None = None  # a copy's project (`copy_weights`); else its session's

    def touch(self) -> None:
        self.last_request_time = time.time()

    def info(self) -> dict[str, Any]:
        """The body of `get_info`."""
        return {
            "model_id": self.model_id,
            "model_data": {
                "arch": "lora",
                "model_name": self.base_model,
                "tokenizer_id": self.tokenizer_id,
            },
            "is_lora": True,
            "lora_rank": self.lora.rank,
            "model_name": self.base_model,
            "optimizer_config": {"type": "adamw"},
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelRecord:
        return cls(**{**raw, "lora": LoraConfig(**raw["lora"])})


@dataclass
class ModelName:
    """A user's name for a live model: the simple JSON API names its adapters (`my-model`) and
    keeps the model id (`simple:my-model:<hex>`) to itself."""

    name: str
    model_id: str
    create_request_id: str  # the future of the model's creation
    owner: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SamplerRecord:
    sampler_id: str
    session_id: str
    weights: SamplerWeights
    owner: str = ""

    def info(self) -> dict[str, Any]:
        """The body of `GET samplers/{id}`."""
        body: dict[str, Any] = {
            "sampler_id": self.sampler_id,
            "base_model": self.weights.base_model,
        }
        if self.weights.model_path:
            body["model_path"] = self.weights.model_path
        return body

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SamplerRecord:
        return cls(**{**raw, "weights": SamplerWeights(**raw["weights"])})


class RecordStore(Protocol):
    """Where the registry keeps its records, as JSON objects by kind and id: this process's
    memory (`LocalRecords`), or Redis when several API processes share them
    (`cluster.RedisRecords`)."""

    # Whether the store may lose its records (a Redis that comes back empty) while the things
    # they describe live on: then the registry rebuilds them from their owners.
    forgets: bool

    def rebuilding(self) -> bool:
        """Whether the store lost its records so recently that their owners (the workers) may
        still be writing them back."""
        ...

    def get(self, kind: str, key: str) -> dict[str, Any] | None: ...

    def put(self, kind: str, key: str, value: dict[str, Any]) -> None: ...

    def add(self, kind: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
        """Store `value` unless `key` exists; returns what is stored."""
        ...

    def values(self, kind: str) -> list[dict[str, Any]]: ...

    def delete(self, kind: str, key: str) -> None: ...


class LocalRecords:
    forgets = False  # the records go with the process, and so does all they describe

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, dict[str, dict[str, Any]]] = {}

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._kinds.get(kind, {}).get(key)

    def put(self, kind: str, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._kinds.setdefault(kind, {})[key] = value

    def add(self, kind: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return self._kinds.setdefault(kind, {}).setdefault(key, value)

    def values(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._kinds.get(kind, {}).values())

    def delete(self, kind: str, key: str) -> None:
        with self._lock:
            self._kinds.get(kind, {}).pop(key, None)

    def rebuilding(self) -> bool:
        return False


class Registry:
    """Sessions, live models, every training run (past ones too) and samplers.

    Records are copied in and out of the record store as JSON, so a view that changes one
    (a heartbeat, a finished session) goes through a method here."""

    def __init__(self, store: CheckpointStore | None = None, records: RecordStore | None = None):
        self._store = store
        self._records = records or LocalRecords()
        self._owner = ""  # the key whose records this view makes and sees
        self._sees_all = True  # an admin key, or an open server: every owner's records
        self._load_runs()

    def _load_runs(self) -> None:
        """Cache every run of the data directory in the records (those already there stay),
        and mark them loaded: a store that comes back empty lacks the mark."""
        if self._store is None:
            return
        for raw in self._store.load_runs():
            try:
                record = ModelRecord.from_json(raw)
            except (KeyError, TypeError):
                continue
            self._records.add("run", record.model_id, record.to_json())
        self._records.put("loaded", "runs", {"at": time.time()})

    def _load_run(self, model_id: str) -> dict[str, Any] | None:
        """A run's record from the data directory (None if there is none, or it is damaged),
        cached in the records."""
        if self._store is None:
            return None
        try:
            raw = json.loads((self._store.run_dir(model_id) / "run.json").read_text())
            record = ModelRecord.from_json(raw)
        except (OSError, ValueError, KeyError, TypeError, UserError):
            return None
        return self._records.add("run", model_id, record.to_json())

    def seen_by(self, owner: str, sees_all: bool = False) -> Registry:
        """This registry as the key named `owner` sees it: what it adds is its own, and other
        keys' records are NotFound (unless `sees_all`). Shares the records; costs nothing."""
        view = copy.copy(self)
        view._owner, view._sees_all = owner, sees_all
        return view

    def _visible(self, raw: dict[str, Any] | None) -> dict[str, Any] | None:
        if raw is None or self._sees_all or raw.get("owner", "") == self._owner:
            return raw
        return None

    def _get(self, kind: str, key: str, what: str) -> dict[str, Any]:
        raw = self._visible(self._records.get(kind, key))
        if raw is None:
            raise NotFound(f"unknown {what} {key!r}")
        return raw

    def exists(self, kind: str, key: str) -> bool:
        """Whether any key has a record of `kind` under `key`."""
        return self._records.get(kind, key) is not None

    def _values(self, kind: str) -> list[dict[str, Any]]:
        return [raw for raw in self._records.values(kind) if self._visible(raw) is not None]

    def create_session(
        self,
        tags: list[str],
        user_metadata: dict[str, Any],
        display_name: str | None = None,
        project_id: str | None = None,
    ) -> Session:
        session = Session(
            uuid.uuid4().hex[:16],
            tags,
            user_metadata,
            owner=self._owner,
            display_name=display_name,
            project_id=project_id,
        )
        self._records.put("session", session.session_id, asdict(session))
        return session

    def sessions(self) -> list[Session]:
        """This key's sessions (every key's for an admin), oldest first."""
        sessions = [Session(**raw) for raw in self._values("session")]
        return sorted(sessions, key=lambda s: s.created_at)

    def set_project(self, session_id: str, project_id: str) -> Session:
        session = self.session(session_id)
        session.project_id = project_id
        self._records.put("session", session_id, asdict(session))
        return session

    def session(self, session_id: str) -> Session:
        """This key's session; one that a store which forgets (Redis came back empty) does not
        know is re-created for this key, so its client goes on (see `_revive_session`)."""
        raw = self._records.get("session", session_id)
        if raw is None and self._records.forgets and SESSION_ID.match(session_id):
            raw = self._revive_session(session_id)
        if raw is None or self._visible(raw) is None:
            raise NotFound(f"unknown session_id {session_id!r}")
        return Session(**raw)

    def _revive_session(self, session_id: str) -> dict[str, Any] | None:
        """Re-create a session the records lost, owned by this view's key, unless a run of the
        data directory shows it was another key's (then it stays unknown to this one)."""
        if self._store is not None:
            for run_file in self._store.root.glob(f"{session_id}:*/run.json"):
                try:
                    owner = json.loads(run_file.read_text()).get("owner", "")
                except (OSError, ValueError, AttributeError):
                    continue
                if owner != self._owner:
                    return None
        session = Session(session_id, [], {}, owner=self._owner)
        stored = self._records.add("session", session_id, asdict(session))
        if stored.get("created_at") == session.created_at:
            log.warning(
                "session %s was unknown to the records (Redis came back empty?): re-created "
                "for key %r",
                session_id,
                self._owner,
            )
        return stored

    def heartbeat(self, session_id: str) -> Session:
        session = self.session(session_id)
        if not session.finished:
            session.touch()
            self._records.put("session", session_id, asdict(session))
        return session

    def finish_session(self, session_id: str, reason: str) -> None:
        session = self.session(session_id)
        session.finished = reason
        self._records.put("session", session_id, asdict(session))

    def add_model(self, record: ModelRecord) -> ModelRecord:
        """Register `record` as this view's key's, or return the one already there (a retried
        create). Its run.json is written before the model is announced: a create that cannot
        write it (DiskFull) leaves nothing, so its retry starts afresh. The retry of a create
        whose creation failed (`forget_failed`) fails again with the same error."""
        record.owner = self._owner
        failed = self._records.get("failed", record.model_id)
        if failed is not None:
            raise TinkerdError.from_json(failed["error"])
        existing = self._records.get("model", record.model_id)
        if existing is not None:
            return ModelRecord.from_json(existing)
        if self._store is not None:
            self._store.save_run(record.model_id, record.to_json())
        stored = ModelRecord.from_json(
            self._records.add("model", record.model_id, record.to_json())
        )
        if stored == record:
            self._records.put("run", record.model_id, record.to_json())
            return record
        if self._store is not None:  # another request created it meanwhile: its record stands
            self._store.save_run(stored.model_id, stored.to_json())
        return stored

    def forget_failed(self, model_id: str, error: dict[str, Any]) -> None:
        """A model whose creation failed never came to be: no live model, run, run.json or
        adapter name is left of it (nothing lists or advertises it), and a retry of its
        create answers `error` (`types.error_body`) again. Called by the worker."""
        owner = (self._records.get("model", model_id) or {}).get("owner", "")
        self._records.put("failed", model_id, {"error": error, "owner": owner})
        for kind in ("model", "run", "created"):
            self._records.delete(kind, model_id)
        for raw in self._records.values("name"):
            if raw.get("model_id") == model_id:
                self._records.delete("name", self._name_key(raw["name"], raw.get("owner", "")))
        if self._store is not None:
            self._store.remove_run(model_id)

    def failed(self, model_id: str) -> dict[str, Any] | None:
        """Why this key's model `model_id` could not be created (`forget_failed`), or None."""
        raw = self._visible(self._records.get("failed", model_id))
        return None if raw is None else raw["error"]

    def model(self, model_id: str) -> ModelRecord:
        """A model that is live in this server (its weights are held by a worker). Moments after
        the records were lost (Redis came back empty), a model whose run is on disk may be
        live on a worker that has not written it back yet: 503, try again."""
        raw = self._visible(self._records.get("model", model_id))
        if raw is None:
            if self._records.rebuilding() and self._visible(self._load_run(model_id)):
                raise ServerError(
                    f"model {model_id!r} is not registered yet: Redis came back empty moments "
                    "ago and the workers are writing back the models they hold; try again",
                    503,
                )
            raise NotFound(f"unknown model_id {model_id!r}")
        return ModelRecord.from_json(raw)

    def touch_model(self, model_id: str) -> ModelRecord:
        record = self.model(model_id)
        record.touch()
        self._records.put("model", model_id, record.to_json())
        return record

    def models(self) -> list[ModelRecord]:
        return [ModelRecord.from_json(raw) for raw in self._values("model")]

    def remove_model(self, model_id: str) -> None:
        """Forget a live model (its worker is told separately); its run stays listed."""
        self.model(model_id)  # this key's
        self._records.delete("model", model_id)
        self._records.delete("created", model_id)

    def set_created(self, model_id: str, outcome: dict[str, Any]) -> None:
        """Keep what the worker answered to a model's creation (it never changes)."""
        self._records.add("created", model_id, outcome)

    def created(self, model_id: str) -> dict[str, Any] | None:
        return self._records.get("created", model_id)

    def records_of(self, model_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        """Every record that makes `model_id` a live model (it, its run, its session, its
        creation's outcome, its names) as (kind, key, value): a clean stop keeps them with the
        model's state, so that a start on a fresh record store answers it again."""
        found = [
            (kind, model_id, raw)
            for kind in ("model", "run", "created")
            if (raw := self._records.get(kind, model_id)) is not None
        ]
        model = self._records.get("model", model_id)
        if model is not None and (session := self._records.get("session", model["session_id"])):
            found.append(("session", model["session_id"], session))
        for raw in self._records.values("name"):
            if raw.get("model_id") == model_id:
                found.append(("name", self._name_key(raw["name"], raw.get("owner", "")), raw))
        return found

    def put_back(self, records: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Add `records_of`'s records where missing (a record store that kept them wins)."""
        for kind, key, value in records:
            self._records.add(kind, key, value)

    def _name_key(self, name: str, owner: str | None = None) -> str:
        """Each key names its adapters in its own namespace."""
        owner = self._owner if owner is None else owner
        return f"{owner}/{name}" if owner else name

    def add_name(self, entry: ModelName) -> ModelName:
        """Give `entry.model_id` its name, unless the name is taken: returns the stored entry."""
        entry.owner = self._owner
        key = self._name_key(entry.name)
        return ModelName(**self._records.add("name", key, entry.to_json()))

    def named(self, name: str) -> ModelName:
        """This key's adapter named `name`; 503 moments after the records were lost while an
        adapter of that name has a run on disk (its worker may not have written it back yet)."""
        raw = self._records.get("name", self._name_key(name))
        if raw is None or raw.get("owner", "") != self._owner:
            if raw is None and self._records.rebuilding() and self._simple_run_on_disk(name):
                raise ServerError(
                    f"adapter {name!r} is not registered yet: Redis came back empty moments "
                    "ago and the workers are writing back the models they hold; try again",
                    503,
                )
            raise NotFound(f"unknown model_id {name!r}")
        return ModelName(**raw)

    def _simple_run_on_disk(self, name: str) -> bool:
        """Whether this key has a simple-API run named `name` in the data directory."""
        if self._store is None or "/" in name or "*" in name or "[" in name or "?" in name:
            return False
        for run_file in self._store.root.glob(f"{SIMPLE_SESSION}:{name}:*/run.json"):
            try:
                if json.loads(run_file.read_text()).get("owner", "") == self._owner:
                    return True
            except (OSError, ValueError, AttributeError):
                continue
        return False

    def remove_name(self, name: str) -> None:
        self.named(name)
        self._records.delete("name", self._name_key(name))

    def names(self) -> list[ModelName]:
        """This key's named adapters (an admin's too: names are per key)."""
        raws = self._records.values("name")
        return [ModelName(**raw) for raw in raws if raw.get("owner", "") == self._owner]

    def run(self, model_id: str) -> ModelRecord:
        """A training run, live or from before a restart: from the data directory when the
        records do not have it (Redis came back empty)."""
        raw = self._records.get("run", model_id) or self._load_run(model_id)
        if raw is None or self._visible(raw) is None:
            raise NotFound(f"unknown training run {model_id!r}")
        return ModelRecord.from_json(raw)

    def runs(self) -> list[ModelRecord]:
        if self._records.get("loaded", "runs") is None:  # the records lost them: read again
            self._load_runs()
        runs = [ModelRecord.from_json(raw) for raw in self._values("run")]
        return sorted(runs, key=lambda r: r.created_at)

    def restore(self, record: ModelRecord) -> None:
        """Write back the records of a live model, owned by `record.owner`, that the store lost
        (Redis came back empty) while a worker still holds the model: the model and its run,
        and its SDK session, or its simple-API name. Records already there are kept."""
        raw = record.to_json()
        self._records.add("model", record.model_id, raw)
        self._records.add("run", record.model_id, raw)
        name = record.user_metadata.get("name")
        if record.session_id == SIMPLE_SESSION and isinstance(name, str):
            entry = ModelName(name, record.model_id, "", record.owner)
            self._records.add("name", self._name_key(name, record.owner), entry.to_json())
            self._records.add("created", record.model_id, {})  # created; its size unknown
        elif SESSION_ID.match(record.session_id):
            session = Session(record.session_id, [], {}, owner=record.owner)
            self._records.add("session", record.session_id, asdict(session))

    def add_sampler(self, record: SamplerRecord) -> SamplerRecord:
        record.owner = self._owner
        return SamplerRecord.from_json(
            self._records.add("sampler", record.sampler_id, record.to_json())
        )

    def sampler(self, sampler_id: str) -> SamplerRecord:
        return SamplerRecord.from_json(self._get("sampler", sampler_id, "sampling session"))

    def samplers(self) -> list[SamplerRecord]:
        return [SamplerRecord.from_json(raw) for raw in self._values("sampler")]

    def add_run(self, record: ModelRecord) -> ModelRecord:
        """Register a training run that no worker holds (a `copy_weights` copy, which cannot be
        trained on), as this view's key's: its run.json first, as `add_model` does."""
        record.owner = self._owner
        if self._store is not None:
            self._store.save_run(record.model_id, record.to_json())
        return ModelRecord.from_json(self._records.add("run", record.model_id, record.to_json()))
