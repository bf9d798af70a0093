"""Settings: defaults <- TINKERD_* environment <- command-line flags. The only home of knobs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def default_data_dir() -> Path:
    return Path(os.environ.get("TINKERD_DATA_DIR") or Path.home() / ".local" / "share" / "tinkerd")


@dataclass(frozen=True)
class InputLimits:
    """How much one request may carry (`Settings.max_*`), checked while it is decoded."""

    max_datums: int = 4096
    max_sequence_tokens: int = 131_072
    max_request_tokens: int = 4 * 1024 * 1024


@dataclass
class Settings:
    """What a tinkerd process needs to know.

    Attributes:
        host, port: where the API listens.
        data_dir: the home of the built-in model, checkpoints and run metadata.
        base_model: the base model of the simple JSON API's adapters when a request names none
            (`tinkerd/tiny`, a local model directory or a hub name).
        device: "cuda", "cuda:1", "cpu", or None to pick the GPU when there is one.
        backend: the engine under the worker, by its name in `tinkerd.backends` ("hf":
            transformers + PEFT), or a `package.module:factory` that builds one.
        tp, pp: the Megatron backend's tensor-parallel ranks and pipeline stages (one process
            per rank, tp x pp in all, started by torchrun).
        activation_checkpointing: the worker's base models recompute each decoder layer's
            activations in backward instead of keeping them: memory for long sequences, at
            about a third more compute per forward/backward.
        sampler: the worker's sampling engine: "tinkerd" (its own, `tinkerd.sampling`) or
            "vllm" (`tinkerd.vllm_sampler`, GPU workers, `pip install 'tinkerd[vllm]'`).
        vllm_engine_args: JSON object of vLLM EngineArgs over tinkerd's defaults
            (`vllm_sampler.DEFAULT_ENGINE_ARGS`), e.g. {"gpu_memory_utilization": 0.5}.
        long_poll_seconds: how long retrieve_future holds a request before `try_again`; the SDK
            gives up on a poll after 45 s, so stay well under that.
        threads: HTTP threads; each waiting long-poll holds one.
        connection_limit: open HTTP connections one API process accepts at once (gunicorn's
            worker_connections per API process, waitress's connection_limit), and its listen
            backlog. The SDK opens one per request in flight (up to 1000 per pool: an RL step
            samples every rollout concurrently, each with a long-poll), and many clients wait
            at once: the default holds 10,000 waiting long-polls even if one API process takes
            them all. Each is a file descriptor: `tinkerd serve` raises its soft open-file limit
            to the hard one at start (see docs/serving.md, "Deployment limits").
        future_ttl_seconds: how long a settled result stays retrievable.
        checkpoint_sweep_seconds: how often checkpoints past their TTL are removed (they are
            refused as soon as they expire, swept or not), and killed saves' temporary files.
        temp_stale_seconds: a killed save's temporary directory is swept once this old (a live
            save's never is: its writer holds a lock on it).
        redis_url: scaled out: the Redis that carries tasks (Celery's broker), futures,
            sequencing and the registry. None runs API and worker in one process.
        api_workers: API processes gunicorn runs (scaled-out mode).
        worker_name: a worker's name in the cluster (default host-pid-device).
        heartbeat_seconds: how often a worker renews its registration.
        worker_ttl_seconds: a worker silent this long is lost: its queued and running requests
            fail with a server error and its models are reported lost.
        max_request_bytes: the largest request body accepted (413 with a JSON body above it).
        max_datums_per_request: datums in one forward/backward request. The SDK splits a batch
            into requests of at most 1024 datums (and about 5 MB), so the default never refuses
            one of its requests.
        max_sequence_tokens: tokens in one datum or prompt (the SDK never splits a sequence).
        max_tokens_per_request: tokens over all datums of one forward/backward request.
        drain_seconds: on SIGTERM, how long the worker may take to finish its running and
            queued work before what is left fails with a server error.
        seq_gap_seconds: a model's next seq_id that never arrives while later ones wait is
            skipped (logged, and answered with an error should it come after all) once they
            have waited this long, so a lost request cannot stall its model for good.
        send_retry_seconds: scaled out, a request recorded in Redis that could not be handed
            to its worker (Redis went away in between) is sent again as soon as Redis is back;
            past this age it fails instead, with that reason.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=default_data_dir)
    base_model: str = "tinkerd/tiny"
    device: str | None = None
    backend: str = "hf"
    activation_checkpointing: bool = False
    sampler: str = "tinkerd"
    vllm_engine_args: str = "{}"
    tp: int = 1
    pp: int = 1
    long_poll_seconds: float = 25.0
    threads: int = 128
    connection_limit: int = 10_000
    future_ttl_seconds: float = 3600.0
    checkpoint_sweep_seconds: float = 60.0
    temp_stale_seconds: float = 300.0
    redis_url: str | None = None
    api_workers: int = 2
    worker_name: str | None = None
    heartbeat_seconds: float = 2.0
    worker_ttl_seconds: float = 15.0
    max_request_bytes: int = 256 * 1024 * 1024
    max_datums_per_request: int = 4096
    max_sequence_tokens: int = 131_072
    max_tokens_per_request: int = 4 * 1024 * 1024
    drain_seconds: float = 300.0
    seq_gap_seconds: float = 30.0
    send_retry_seconds: float = 120.0

    @property
    def input_limits(self) -> InputLimits:
        return InputLimits(
            self.max_datums_per_request, self.max_sequence_tokens, self.max_tokens_per_request
        )

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Defaults, then TINKERD_<NAME> variables, then the given overrides (None = not given)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"TINKERD_{f.name.upper()}")
            if raw is not None:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        settings = cls(**values)
        settings.port = int(settings.port)
        settings.tp, settings.pp = int(settings.tp), int(settings.pp)
        settings.activation_checkpointing = _flag(settings.activation_checkpointing)
        settings.threads = int(settings.threads)
        settings.connection_limit = int(settings.connection_limit)
        settings.long_poll_seconds = float(settings.long_poll_seconds)
        settings.future_ttl_seconds = float(settings.future_ttl_seconds)
        settings.checkpoint_sweep_seconds = float(settings.checkpoint_sweep_seconds)
        settings.temp_stale_seconds = float(settings.temp_stale_seconds)
        settings.api_workers = int(settings.api_workers)
        settings.heartbeat_seconds = float(settings.heartbeat_seconds)
        settings.worker_ttl_seconds = float(settings.worker_ttl_seconds)
        settings.max_request_bytes = int(settings.max_request_bytes)
        settings.max_datums_per_request = int(settings.max_datums_per_request)
        settings.max_sequence_tokens = int(settings.max_sequence_tokens)
        settings.max_tokens_per_request = int(settings.max_tokens_per_request)
        settings.drain_seconds = float(settings.drain_seconds)
        settings.seq_gap_seconds = float(settings.seq_gap_seconds)
        settings.send_retry_seconds = float(settings.send_retry_seconds)
        settings.data_dir = Path(settings.data_dir).expanduser().resolve()
        return settings


def _flag(value: Any) -> bool:
    """A boolean setting from a flag or a TINKERD_* variable ("1", "true", "yes", "on")."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r} (use 1 or 0)")
