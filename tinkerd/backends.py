"""Backends by name, and the record each one publishes about itself.

`tinkerd serve|worker --backend NAME` picks the engine under the worker: "hf" (transformers +
PEFT, `hf_backend.HFBackend`) is the default; another engine registers a factory under its own
name (`register_backend`), or is named as `package.module:factory` and imported on start. Nothing
here imports torch: the API and the cluster's placement read `BackendInfo` from a worker's
registration.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinkerd.storage import CheckpointStore
    from tinkerd.types import Backend

DEFAULT_BACKEND = "hf"


@dataclass(frozen=True)
class BackendInfo:
    """What a backend says about itself: published in its worker's registration (under
    "backend") and read by placement.

    Attributes:
        name: the registry name it was started under ("hf").
        device: where its models live ("cpu", "cuda:0").
        dtype: the base models' dtype ("float32", "bfloat16").
        base_models: the base models it holds now (loaded on first use).
        memory_total, memory_free: the device's memory in bytes (host RAM on CPU).
        max_batch_tokens: the most tokens one forward/backward batch may carry, None if no
            set limit.
    """

    name: str
    device: str
    dtype: str
    base_models: tuple[str, ...] = ()
    memory_total: int = 0
    memory_free: int = 0
    max_batch_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["base_models"] = list(self.base_models)
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any] | None) -> BackendInfo:
        """The record from a registration's "backend"; an absent one (a worker that has not
        published it) reads as an unknown backend with no memory and no base model."""
        body = body or {}
        limit = body.get("max_batch_tokens")
        return cls(
            name=str(body.get("name", "")),
            device=str(body.get("device", "")),
            dtype=str(body.get("dtype", "")),
            base_models=tuple(str(b) for b in body.get("base_models", ())),
            memory_total=int(body.get("memory_total", 0)),
            memory_free=int(body.get("memory_free", 0)),
            max_batch_tokens=None if limit is None else int(limit),
        )


def registered_info(registration: dict[str, Any]) -> BackendInfo:
    """The backend record of a worker's registration (`cluster.state.live_workers`)."""
    return BackendInfo.from_json(registration.get("backend"))


@dataclass(frozen=True)
class BackendOptions:
    """What every backend is built from: the worker's settings that concern its engine."""

    data_dir: Path
    device: str | None = None
    store: CheckpointStore | None = None
    activation_checkpointing: bool = False
    dtype: str | None = None  # the base models' ("float32", "bfloat16"); None: by device
    tp: int = 1  # tensor-parallel ranks (the Megatron backend)
    pp: int = 1  # pipeline stages (the Megatron backend)
    sampler: str = "tinkerd"  # the sampling engine: "tinkerd" or "vllm" (the hf backend)
    vllm_engine_args: str = "{}"  # JSON: vLLM EngineArgs over tinkerd's defaults


BackendFactory = Callable[[BackendOptions], "Backend"]
_FACTORIES: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `factory` the backend started by `--backend name`."""
    _FACTORIES[name] = factory


def backend_names() -> list[str]:
    return sorted(_FACTORIES)


def backend_factory(name: str) -> BackendFactory:
    """The factory registered as `name`, or the one `package.module:attr` names.

    Raises:
        ValueError: no backend of that name (the message lists the known ones).
    """
    factory = _FACTORIES.get(name)
    if factory is None and ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"backend {name!r} could not be imported: {e}") from None
    if factory is None:
        known = ", ".join(backend_names())
        raise ValueError(f"unknown backend {name!r} (known: {known}, or package.module:factory)")
    return factory


def make_backend(name: str, options: BackendOptions) -> Backend:
    """A new backend of the engine registered as `name` (see `backend_factory`)."""
    backend = backend_factory(name)(options)
    backend.info()  # a backend that cannot describe itself fails at start, not at placement
    _MADE.append(backend)
    return backend


def _hf(options: BackendOptions) -> Backend:
    from tinkerd.hf_backend import HFBackend

    return HFBackend(
        options.data_dir,
        options.device,
        store=options.store,
        activation_checkpointing=options.activation_checkpointing,
        dtype=options.dtype,
        sampler=options.sampler,
        vllm_engine_args=json.loads(options.vllm_engine_args or "{}"),
    )


register_backend("hf", _hf)


def _megatron(options: BackendOptions) -> Backend:
    from tinkerd.megatron.backend import MegatronBackend

    return MegatronBackend(options)


register_backend("megatron", _megatron)
_MADE: list[Any] = []


def close_backends() -> None:
    """Let each backend this process made release what outlives it (the Megatron backend's
    other ranks wait for a last word): called as a serve or worker process ends."""
    while _MADE:
        close = getattr(_MADE.pop(), "close", None)
        if close is not None:
            close()
