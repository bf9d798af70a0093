"""Sessions and the metadata of training models, as the API sees them.

The weights live with the worker; this is what the API answers from without asking it
(`get_info`, session checks). Plain data, no torch.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tinkerd.types import LoraConfig, NotFound


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


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._models: dict[str, ModelRecord] = {}

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
            return self._models.setdefault(record.model_id, record)

    def model(self, model_id: str) -> ModelRecord:
        with self._lock:
            record = self._models.get(model_id)
        if record is None:
            raise NotFound(f"unknown model_id {model_id!r}")
        return record

    def models(self) -> list[ModelRecord]:
        with self._lock:
            return list(self._models.values())
