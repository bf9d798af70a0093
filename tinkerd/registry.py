"""Sessions, training runs and samplers, as the API sees them.

The weights live with the worker; this is what the API answers from without asking it
(`get_info`, session checks, REST listings). Each training run's record is also written to the
checkpoint store, so runs and their checkpoints are listed after a restart. Plain data, no torch.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from tinkerd.storage import CheckpointStore
from tinkerd.types import LoraConfig, NotFound, SamplerWeights


@dataclass
class Session:
    session_id: str
    tags: list[str]
    user_metadata: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    finished: str | None = None

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
class SamplerRecord:
    sampler_id: str
    session_id: str
    weights: SamplerWeights

    def info(self) -> dict[str, Any]:
        """The body of `GET samplers/{id}`."""
        body: dict[str, Any] = {
            "sampler_id": self.sampler_id,
            "base_model": self.weights.base_model,
        }
        if self.weights.model_path:
            body["model_path"] = self.weights.model_path
        return body


class Registry:
    def __init__(self, store: CheckpointStore | None = None) -> None:
        self._lock = threading.Lock()
        self._store = store
        self._sessions: dict[str, Session] = {}
        self._models: dict[str, ModelRecord] = {}  # live in this server's lifetime
        self._runs: dict[str, ModelRecord] = {}  # every run, past ones included
        self._samplers: dict[str, SamplerRecord] = {}
        for raw in store.load_runs() if store else []:
            try:
                record = ModelRecord.from_json(raw)
            except (KeyError, TypeError):
                continue
            self._runs[record.model_id] = record

    def create_session(self, tags: list[str], user_metadata: dict[str, Any]) -> Session:
        session = Session(uuid.uuid4().hex[:16], tags, user_metadata)
        with self._lock:
            self._sessions[session.session_id] = session
        return session

    def session(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"unknown session_id {session_id!r}")
        return session

    def add_model(self, record: ModelRecord) -> ModelRecord:
        """Register `record`, or return the one already there (a retried create)."""
        with self._lock:
            existing = self._models.get(record.model_id)
            if existing is not None:
                return existing
            self._models[record.model_id] = self._runs[record.model_id] = record
        if self._store is not None:
            self._store.save_run(record.model_id, record.to_json())
        return record

    def model(self, model_id: str) -> ModelRecord:
        """A model that is live in this server (its weights are held by a worker)."""
        with self._lock:
            record = self._models.get(model_id)
        if record is None:
            raise NotFound(f"unknown model_id {model_id!r}")
        return record

    def models(self) -> list[ModelRecord]:
        with self._lock:
            return list(self._models.values())

    def run(self, model_id: str) -> ModelRecord:
        """A training run, live or from before a restart."""
        with self._lock:
            record = self._runs.get(model_id)
        if record is None:
            raise NotFound(f"unknown training run {model_id!r}")
        return record

    def runs(self) -> list[ModelRecord]:
        with self._lock:
            return sorted(self._runs.values(), key=lambda r: r.created_at)

    def add_sampler(self, record: SamplerRecord) -> SamplerRecord:
        with self._lock:
            return self._samplers.setdefault(record.sampler_id, record)

    def sampler(self, sampler_id: str) -> SamplerRecord:
        with self._lock:
            record = self._samplers.get(sampler_id)
        if record is None:
            raise NotFound(f"unknown sampling session {sampler_id!r}")
        return record
