"""Plain data shared by the API, the scheduler and the worker.

Nothing here imports torch: the API validates and queues these objects, and only the worker turns
them into tensors. Arrays are numpy, shaped per datum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

    from tinkerd.backends import BackendInfo


class TinkerdError(Exception):
    """An error that is reported to the client as `error_body(error)`."""

    category = "server"
    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    @staticmethod
    def from_json(body: dict[str, Any], default: str = "the request failed") -> TinkerdError:
        """The error an error body carries (`error_body`'s inverse), to raise again."""
        message = str(body.get("error", default))
        return UserError(message) if body.get("category") == "user" else ServerError(message)


class UserError(TinkerdError):
    """The request is wrong; nothing was changed and the server keeps serving."""

    category = "user"
    status = 400


class NotFound(UserError):
    status = 404


class Unauthorized(UserError):
    """No API key, or one the server does not know (or has revoked)."""

    status = 401


class Forbidden(UserError):
    """A signed download URL that is not valid, or no longer (`tinkerd.downloads`)."""

    status = 403


class TooManyRequests(UserError):
    """A key's limit is reached; nothing was queued. The SDK waits `retry_after` seconds (the
    Retry-After header) and sends the same request again."""

    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIError(UserError):
    """A request to the OpenAI routes refused, with the parameter at fault and OpenAI's error
    code (`error_body(error, openai=True)`)."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, status)
        self.param, self.code = param, code


class ServerError(TinkerdError):
    """The request was fine but the server could not carry it out."""


class Unavailable(TinkerdError):
    """The cluster cannot take the request now (no worker, Redis down): 503, try again."""

    status = 503


class DiskFull(ServerError):
    """The data directory's filesystem has no room left: nothing of the write was kept."""

    status = 507

    def __init__(self, where: Path | str) -> None:
        super().__init__(f"no space left on device ({where})")


def status_error(message: str, status: int) -> TinkerdError:
    """An error answered with `status` that tinkerd did not raise itself (Flask's, the HTTP
    server's): the user's below 500, else the server's."""
    return UserError(message, status) if status < 500 else ServerError(message, status)


def error_body(error: TinkerdError, *, openai: bool = False) -> dict[str, Any]:
    """The JSON body of every error tinkerd answers: `{"error": message, "category": "user" or
    "server"}`, also what a settled future holds when its request failed; under /v1 (`openai`)
    OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`."""
    if openai:
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        param, code = getattr(error, "param", None), getattr(error, "code", None)
        return {"error": {"message": error.message, "type": kind, "param": param, "code": code}}
    return {"error": error.message, "category": error.category}


@dataclass(frozen=True)
class LoraConfig:
    """What `create_model` asks for. alpha is fixed, so the learning rate need not follow rank."""

    rank: int = 32
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    alpha: float = 32.0


@dataclass(frozen=True)
class AdamParams:
    """Tinker's AdamParams: decoupled weight decay; grad_clip_norm 0 means no clipping."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class Datum:
    """One sequence: input tokens (T,) and its loss inputs, each (T,) or (T, K)."""

    tokens: np.ndarray
    loss_fn_inputs: dict[str, np.ndarray]


@dataclass
class CreateModel:
    """A new LoRA model; from a checkpoint (weights, maybe optimizer state) when one is given."""

    base_model: str
    lora: LoraConfig
    from_checkpoint: str | None = None
    with_optimizer: bool = False
    # A hand-off from a worker that shut down: also the gradients accumulated since its last step.
    with_gradients: bool = False


@dataclass
class ForwardBackward:
    datums: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float] = field(default_factory=dict)
    forward_only: bool = False


@dataclass
class OptimStep:
    adam: AdamParams


@dataclass
class SaveWeights:
    """Save a model's adapter to `path` (a tinker:// path), or, for an unnamed sampler save, keep
    a snapshot in memory under `snapshot_id`."""

    path: str | None
    kind: str = "weights"  # "weights" (adapter + optimizer) | "sampler_weights" (adapter)
    ttl_seconds: float | None = None
    overwrite: bool = False
    user_metadata: dict[str, Any] = field(default_factory=dict)
    snapshot_id: str | None = None
    with_gradients: bool = False  # a worker's hand-off: the model exactly as it is, mid-step


@dataclass
class LoadWeights:
    path: str
    with_optimizer: bool = False


@dataclass
class RemoveModel:
    """Free a model on its worker (adapter, optimizer, in-memory sampler snapshots): the last
    request of its sequence; the scheduler forgets the model once it is taken."""


@dataclass
class Rejected:
    """A request the API refused: it still takes its seq_id so the model's later work can run."""

    error: dict[str, str]


@dataclass(frozen=True)
class SamplingParams:
    """Tinker's SamplingParams. stop_tokens None keeps the implicit EOS; [] disables it too."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SamplerWeights:
    """What a sampler samples from: the base alone, a checkpoint, or an in-memory snapshot."""

    base_model: str
    model_path: str | None = None
    snapshot_id: str | None = None

    @property
    def key(self) -> str:
        return self.snapshot_id or self.model_path or f"base:{self.base_model}"


@dataclass
class Sample:
    """One asample: `num_samples` continuations of `prompt` from a sampler's weights."""

    weights: SamplerWeights
    prompt: np.ndarray
    num_samples: int
    params: SamplingParams
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


@dataclass
class SampledSequence:
    tokens: np.ndarray  # (N,) int
    logprobs: np.ndarray  # (N,) float32: log softmax(logits / temperature) of each token
    stop_reason: str  # "stop" | "length"


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: np.ndarray | None = None  # (P,) float32, NaN for the first token
    topk_prompt_logprobs: tuple[np.ndarray, np.ndarray] | None = None  # ids, logprobs: (P, K)


Payload = (
    CreateModel
    | ForwardBackward
    | OptimStep
    | SaveWeights
    | LoadWeights
    | Sample
    | RemoveModel
    | Rejected
)


@dataclass
class ForwardBackwardResult:
    """Per datum outputs (each field shaped like target_tokens) and `name:reduction` metrics."""

    loss_fn_outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


def every_result(results: list[Any]) -> list[Any]:
    """A batch call's results once every slot is filled; an empty slot is a server error in
    that request's place (a bug in the backend, never a missing answer)."""
    return [
        ServerError("the backend gave this request no result") if r is None else r for r in results
    ]


class Backend(Protocol):
    """What a worker needs from a model backend. Token ids in, arrays out; no HTTP, no queues.

    Batch methods take several requests (possibly of several models) so that a backend may run
    them in one pass; each request fails alone by returning its error in place of a result, and
    nothing of a failed request is applied. Backends are picked by name (`tinkerd.backends`).
    """

    def create_model(self, model_id: str, request: CreateModel) -> dict[str, Any]: ...

    def forward_backward(
        self, requests: list[tuple[str, ForwardBackward]]
    ) -> list[ForwardBackwardResult | TinkerdError]:
        """One worker cycle's batch: the ready passes of every model on this worker, each
        model's up to its next barrier (optim_step, load, save, create, remove), in turn order
        (highest priority first) and each model's in seq_id order. One result or error per
        request, in order."""
        ...

    def optim_step(self, model_id: str, request: OptimStep) -> dict[str, float]: ...

    def optim_steps(
        self, requests: list[tuple[str, OptimStep]]
    ) -> list[dict[str, float] | TinkerdError]:
        """The optimizer steps of several models (one each) that are due together; a backend
        may fuse them into one call, each model ending exactly as if stepped alone. This
        default steps each model in turn."""
        results: list[dict[str, float] | TinkerdError] = []
        for model_id, request in requests:
            try:
                results.append(self.optim_step(model_id, request))
            except TinkerdError as e:
                results.append(e)
        return results

    def save_weights(self, model_id: str, request: SaveWeights) -> dict[str, Any]: ...

    def load_weights(self, model_id: str, request: LoadWeights) -> dict[str, Any]: ...

    def sample(self, requests: list[Sample]) -> list[SampleResult | TinkerdError]: ...

    def remove_model(self, model_id: str) -> None: ...

    def creation(self, model_id: str) -> CreateModel:
        """What re-creates a held model elsewhere (base and LoRA config), for a hand-over."""
        ...

    def held(self) -> dict[str, Any]:
        """What this backend holds, for the worker's registration: its device, its memory
        (total and free bytes), base models and models."""
        ...

    def info(self) -> BackendInfo:
        """The backend's record (name, device, dtype, base models, memory): published in its
        worker's registration, read by placement."""
        ...
