"""A backend with no torch models, for worker and scheduler tests: deterministic arithmetic in
place of a model, and a record of every call it was given (`calls`), so a test can see how the
worker batched its requests.

Each model is one number, `weight`. A forward/backward of a datum gives every position the
logprob `-(weight + token / 1000)` and adds `tokens` to the model's gradient; an optim step moves
`weight` by `-learning_rate * grad`. A token at or above VOCAB_SIZE, or an unknown loss, is a bad
request: it fails alone, with nothing of it applied. Registered as `tests.fake_backend:make`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinkerd.backends import BackendInfo, BackendOptions
from tinkerd.types import (
    Backend,
    CreateModel,
    ForwardBackward,
    ForwardBackwardResult,
    LoadWeights,
    NotFound,
    OptimStep,
    Sample,
    SampledSequence,
    SampleResult,
    SaveWeights,
    TinkerdError,
    UserError,
)

VOCAB_SIZE = 1000
LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")


@dataclass
class FakeModel:
    creation: CreateModel
    weight: float
    grad: float = 0.0
    steps: int = 0
    snapshots: set[str] = field(default_factory=set)


class FakeBackend(Backend):
    """Implements tinkerd.types.Backend (the protocol's default `optim_steps`, step by step,
    behind a recording one)."""

    def __init__(self, options: BackendOptions | None = None) -> None:
        self.options = options
        self.models: dict[str, FakeModel] = {}
        self.saved: dict[str, tuple[float, float, int]] = {}  # path or snapshot -> state
        self.bases: set[str] = set()
        self.calls: list[tuple[str, list[str]]] = []  # (method, model id of each request)

    def batches(self, method: str = "forward_backward") -> list[list[str]]:
        """The model ids of each call of `method`, in call order."""
        return [ids for name, ids in self.calls if name == method]

    def _model(self, model_id: str) -> FakeModel:
        model = self.models.get(model_id)
        if model is None:
            raise NotFound(f"model {model_id!r} is not loaded on this worker")
        return model

    def create_model(self, model_id: str, request: CreateModel) -> dict[str, Any]:
        self.calls.append(("create_model", [model_id]))
        if request.base_model.startswith("bad/"):
            raise UserError(f"base model {request.base_model!r} could not be loaded")
        self.bases.add(request.base_model)
        seed = request.lora.seed or 0
        self.models.setdefault(model_id, FakeModel(request, weight=1.0 + seed / 100))
        return {"model_id": model_id}

    def forward_backward(
        self, requests: list[tuple[str, ForwardBackward]]
    ) -> list[ForwardBackwardResult | TinkerdError]:
        self.calls.append(("forward_backward", [model_id for model_id, _ in requests]))
        results: list[ForwardBackwardResult | TinkerdError] = []
        for model_id, request in requests:
            try:
                results.append(self._forward_backward(self._model(model_id), request))
            except TinkerdError as e:
                results.append(e)
        return results

    def _forward_backward(
        self, model: FakeModel, request: ForwardBackward
    ) -> ForwardBackwardResult:
        if request.loss_fn not in LOSSES:
            raise UserError(f"unknown loss function {request.loss_fn!r}")
        outputs, tokens = [], 0
        for i, datum in enumerate(request.datums):
            if datum.tokens.size and int(datum.tokens.max()) >= VOCAB_SIZE:
                raise UserError(f"datum {i}: token id {int(datum.tokens.max())} is outside the "
                                f"vocabulary (size {VOCAB_SIZE})")  # fmt: skip
            logprobs = -(model.weight + datum.tokens.astype(np.float32) / 1000)
            outputs.append({"logprobs": logprobs, "elementwise_loss": -logprobs})
            tokens += int(datum.tokens.size)
        if not request.forward_only:  # only once the whole request is good
            model.grad += tokens
        loss = float(sum(o["elementwise_loss"].sum() for o in outputs))
        return ForwardBackwardResult(outputs, {"loss:sum": loss, "num_tokens:sum": float(tokens)})

    def optim_step(self, model_id: str, request: OptimStep) -> dict[str, float]:
        model = self._model(model_id)
        grad_norm = abs(model.grad)
        model.weight -= request.adam.learning_rate * model.grad
        model.grad = 0.0
        model.steps += 1
        return {"grad_norm:mean": grad_norm, "learning_rate:mean": request.adam.learning_rate}

    def optim_steps(
        self, requests: list[tuple[str, OptimStep]]
    ) -> list[dict[str, float] | TinkerdError]:
        self.calls.append(("optim_steps", [model_id for model_id, _ in requests]))
        return super().optim_steps(requests)

    def save_weights(self, model_id: str, request: SaveWeights) -> dict[str, Any]:
        self.calls.append(("save_weights", [model_id]))
        model = self._model(model_id)
        state = (model.weight, model.grad if request.with_gradients else 0.0, model.steps)
        if request.snapshot_id is not None:
            self.saved[request.snapshot_id] = state
            model.snapshots.add(request.snapshot_id)
            return {"sampling_session_id": request.snapshot_id}
        assert request.path is not None
        self.saved[request.path] = state
        return {"path": request.path}

    def load_weights(self, model_id: str, request: LoadWeights) -> dict[str, Any]:
        self.calls.append(("load_weights", [model_id]))
        model = self._model(model_id)
        if request.path not in self.saved:
            raise NotFound(f"checkpoint {request.path} not found")
        model.weight, _, steps = self.saved[request.path]
        model.steps = steps if request.with_optimizer else 0
        return {"path": request.path, "model_id": model_id}

    def sample(self, requests: list[Sample]) -> list[SampleResult | TinkerdError]:
        self.calls.append(("sample", [r.weights.key for r in requests]))
        results: list[SampleResult | TinkerdError] = []
        for request in requests:
            n = request.params.max_tokens or 4
            tokens = (np.arange(n, dtype=np.int64) + int(request.prompt[-1])) % VOCAB_SIZE
            sequence = SampledSequence(tokens, np.full(n, -1.0, dtype=np.float32), "length")
            results.append(SampleResult([sequence] * request.num_samples))
        return results

    def remove_model(self, model_id: str) -> None:
        self.calls.append(("remove_model", [model_id]))
        model = self.models.pop(model_id, None)
        for key in model.snapshots if model is not None else ():
            self.saved.pop(key, None)

    def creation(self, model_id: str) -> CreateModel:
        return self._model(model_id).creation

    def held(self) -> dict[str, Any]:
        info = self.info()
        return {
            "device": info.device,
            "memory_total": info.memory_total,
            "memory_free": info.memory_free,
            "base_models": list(info.base_models),
            "models": sorted(self.models),
        }

    def info(self) -> BackendInfo:
        return BackendInfo(
            "fake", "cpu", "float32", tuple(sorted(self.bases)), 1 << 30, 1 << 29, 65_536
        )


def make(options: BackendOptions) -> FakeBackend:
    """The registry's factory: `make_backend("tests.fake_backend:make", options)`."""
    return FakeBackend(options)
