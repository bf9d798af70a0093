"""The Megatron backend as tinkerd's worker sees it: rank 0 of a torchrun group.

`MegatronBackend` runs in rank 0, inside `tinkerd serve` or `tinkerd worker`: it checks each
request, does every file read and write (checkpoints are PEFT directories, as the HF backend
writes them), and sends each engine call to the other ranks (`_call`), which run it in lock step
(`follow`). Sampling runs on rank 0 through tinkerd's own sampling engine (`HFBackend.sample`) on
the model's adapter, gathered from the ranks: exact, for a model that fits rank 0's device.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tinkerd import checkpoint_io, passes
from tinkerd.backends import BackendInfo, BackendOptions
from tinkerd.base_models import resolve_base_model
from tinkerd.hf_models import lora_config_for
from tinkerd.loss_functions import get_loss
from tinkerd.megatron import lora as lora_mod
from tinkerd.megatron.engine import AdapterState, Engine
from tinkerd.megatron.model import Architecture, architecture, check_parallel
from tinkerd.storage import CheckpointMeta, CheckpointPath, CheckpointStore
from tinkerd.types import (
    AdamParams,
    CreateModel,
    ForwardBackward,
    ForwardBackwardResult,
    LoadWeights,
    LoraConfig,
    NotFound,
    OptimStep,
    Sample,
    SampleResult,
    SaveWeights,
    ServerError,
    TinkerdError,
    UserError,
    every_result,
)

log = logging.getLogger(__name__)

STOP = "stop"


@dataclass
class _Base:
    name: str  # as the first request named it
    location: str  # the model directory
    arch: Architecture


@dataclass
class _Model:
    base: _Base
    lora: LoraConfig
    projections: list[lora_mod.Projection]
    adam: AdamParams = field(default_factory=AdamParams)  # the last step's, kept in checkpoints
    snapshots: set[str] = field(default_factory=set)


def start_rank(options: BackendOptions) -> Engine:
    """Join this process's torchrun group (gloo on the CPU, nccl on GPUs), set up Megatron's
    tensor and pipeline groups, and build this rank's (empty) engine. Every rank calls it."""
    from megatron.core import parallel_state

    from tinkerd.megatron import cpu

    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    size = options.tp * options.pp
    if dist.get_world_size() != size:
        raise SystemExit(
            f"--tp {options.tp} --pp {options.pp} needs {size} ranks, not {dist.get_world_size()}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=options.tp, pipeline_model_parallel_size=options.pp
    )
    if device.type == "cuda":
        cpu.seed_cuda(0)
    else:
        cpu.use_cpu()
    from tinkerd.hf_models import base_dtype

    return Engine(device, base_dtype(device, options.dtype))


def follow(engine: Engine) -> None:
    """Ranks other than 0: run each call rank 0 sends, until it says stop. SIGTERM and SIGINT
    are left to rank 0 (torchrun and a terminal send them to every rank), which saves the
    models it holds through these ranks before it stops them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0)
        method, args = message[0]
        if method == STOP:
            return
        getattr(engine, method)(*args)


class MegatronBackend:
    """Implements tinkerd.types.Backend on megatron-core, from rank 0 of a torchrun group."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.data_dir = Path(options.data_dir)
        self.store = options.store or CheckpointStore(self.data_dir / "runs")
        self.engine = start_rank(options)
        if dist.get_rank() != 0:
            raise RuntimeError("MegatronBackend runs on rank 0; other ranks run follow()")
        self.device = self.engine.device
        self._bases: dict[str, _Base] = {}
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()  # one call at a time goes to the ranks, in order
        self._broken: str | None = None
        from tinkerd.hf_backend import HFBackend

        # tinkerd's sampling engine on rank 0's device, reading the same checkpoints; its base
        # model is loaded on the first sample.
        self._sampler = HFBackend(
            self.data_dir, str(self.device), store=self.store, dtype=options.dtype
        )

    # -- the ranks ---------------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> Any:
        """Run `engine.method(*args)` on every rank. An error inside leaves the ranks out of
        step: this backend then refuses everything, and the worker must be restarted (its
        models are lost, as a lost worker's are)."""
        with self._lock:
            if self._broken:
                raise ServerError(self._broken)
            try:
                dist.broadcast_object_list([(method, args)], src=0)
                return getattr(self.engine, method)(*args)
            except Exception as e:
                self._broken = (
                    f"the Megatron ranks failed in {method} ({type(e).__name__}: {e}); this "
                    "worker's models are lost, restart it"
                )
                log.critical(self._broken, exc_info=True)
                raise ServerError(self._broken) from None

    def close(self) -> None:
        """Let the other ranks exit (the process ends after its last call)."""
        with self._lock:
            if not self._broken:
                self._broken = "this worker has stopped"
                try:
                    dist.broadcast_object_list([(STOP, ())], src=0)
                except Exception as e:  # a rank already gone: torchrun ends the rest
                    log.warning("could not stop the other ranks: %s", e)

    # -- models ------------------------------------------------------------------------------

    def _base(self, name: str) -> _Base:
        from transformers import AutoConfig

        source = resolve_base_model(name, self.data_dir)
        if source.location in self._bases:
            return self._bases[source.location]
        if source.builtin:
            from tinkerd.tiny_model import build_tiny_model

            build_tiny_model(source.location)
        directory = _model_directory(source.location)
        try:
            arch = architecture(AutoConfig.from_pretrained(directory))
        except (OSError, ValueError) as e:
            raise UserError(f"base model {name!r} could not be loaded: {e}") from None
        check_parallel(arch, self.options.tp, self.options.pp)
        self._call("add_base", source.location, arch, directory)
        base = self._bases[source.location] = _Base(source.name, source.location, arch)
        return base

    def create_model(self, model_id: str, request: CreateModel) -> dict[str, Any]:
        if model_id in self._models:
            return {"model_id": model_id}
        base = self._base(request.base_model)
        model = _Model(base, request.lora, lora_mod.projections(base.arch, request.lora))
        self._peft_config(model)  # a UserError if it trains no layer
        if request.from_checkpoint:
            path = CheckpointPath.parse(request.from_checkpoint)
            state = self._read(model, path, request.with_optimizer, request.with_gradients)
        else:
            initial = lora_mod.initial_state(model.projections, request.lora)
            state = AdapterState({k: {"param": v} for k, v in initial.items()})
        self._call("create", model_id, base.location, request.lora, state)
        self._models[model_id] = model
        if request.from_checkpoint and request.with_gradients:  # a hand-over: used up
            try:
                self.store.delete(CheckpointPath.parse(request.from_checkpoint))
            except (NotFound, OSError) as e:
                log.warning("could not remove %s after loading it: %s", request.from_checkpoint, e)
        trainable = sum(
            (p.in_features + p.out_features) * request.lora.rank for p in model.projections
        )
        return {"model_id": model_id, "trainable_params": trainable}

    def _model(self, model_id: str) -> _Model:
        model = self._models.get(model_id)
        if model is None:
            raise NotFound(f"model {model_id!r} is not loaded on this worker")
        return model

    def creation(self, model_id: str) -> CreateModel:
        model = self._model(model_id)
        return CreateModel(model.base.name, model.lora)

    def remove_model(self, model_id: str) -> None:
        model = self._models.pop(model_id, None)
        if model is not None:
            self._call("remove", model_id)
            for key in model.snapshots:
                self._sampler.drop_sampler(key)

    def held(self) -> dict[str, Any]:
        info = self.info()
        return {
            "device": info.device,
            "memory_total": info.memory_total,
            "memory_free": info.memory_free,
            "base_models": list(info.base_models),
            "models": sorted(self._models),
            "tensor_parallel": self.options.tp,
            "pipeline_parallel": self.options.pp,
        }

    def info(self) -> BackendInfo:
        from tinkerd.hf_models import device_memory

        total, free = device_memory(self.device)
        return BackendInfo(
            name="megatron",
            device=str(self.device),
            dtype=str(self.engine.dtype).removeprefix("torch."),
            base_models=tuple(sorted(b.name for b in self._bases.values())),
            memory_total=total,
            memory_free=free,
        )

    # -- training ----------------------------------------------------------------------------

    def forward_backward(
        self, requests: list[tuple[str, ForwardBackward]]
    ) -> list[ForwardBackwardResult | TinkerdError]:
        """Every request checked here; those of models on one base in one pass of the ranks."""
        results: list[ForwardBackwardResult | TinkerdError | None] = [None] * len(requests)
        by_base: dict[str, list[tuple[int, str, ForwardBackward]]] = {}
        for i, (model_id, request) in enumerate(requests):
            try:
                model = self._model(model_id)
                passes.check_request(request, get_loss(request.loss_fn), model.base.arch.vocab_size)
            except TinkerdError as e:
                results[i] = e
                continue
            by_base.setdefault(model.base.location, []).append((i, model_id, request))
        for location, jobs in by_base.items():
            try:
                outcome = self._call("forward_backward", location, jobs)
            except TinkerdError as e:
                outcome = {i: e for i, _, _ in jobs}
            for i, result in outcome.items():
                results[i] = result
        return every_result(results)

    def optim_step(self, model_id: str, request: OptimStep) -> dict[str, float]:
        return passes.step_alone(self.optim_steps, model_id, request)

    def optim_steps(
        self, requests: list[tuple[str, OptimStep]]
    ) -> list[dict[str, float] | TinkerdError]:
        results: list[dict[str, float] | TinkerdError | None] = [None] * len(requests)
        steps, seen = [], set()
        for i, (model_id, request) in enumerate(requests):
            try:
                model = self._model(model_id)
            except TinkerdError as e:
                results[i] = e
                continue
            if model_id in seen:
                results[i] = UserError(f"model {model_id!r} has two optim_steps in one call")
                continue
            seen.add(model_id)
            model.adam = request.adam
            steps.append((i, model_id, request.adam))
        if steps:
            done = self._call("optim_steps", [(m, adam) for _, m, adam in steps])
            for (i, _, _), result in zip(steps, done, strict=True):
                results[i] = result
        return every_result(results)

    # -- checkpoints -------------------------------------------------------------------------

    def save_weights(self, model_id: str, request: SaveWeights) -> dict[str, Any]:
        model = self._model(model_id)
        if request.snapshot_id is not None:  # unnamed sampler save: weights stay in memory
            state = self._call("gather", model_id, False, False)
            tensors = {k: v["param"] for k, v in state.factors.items()}
            self._sampler.hold_sampler(
                request.snapshot_id, model.base.location, self._peft_config(model), tensors
            )
            model.snapshots.add(request.snapshot_id)
            return {"sampling_session_id": request.snapshot_id}
        assert request.path is not None
        path = CheckpointPath.parse(request.path)
        with_optimizer = path.kind == "weights"
        state = self._call("gather", model_id, with_optimizer, request.with_gradients)
        meta = CheckpointMeta.saved(path, model_id, model.base.name, model.lora, request)

        def write_contents(directory: Path) -> None:
            self._write(model, state, directory, with_optimizer, request.with_gradients)

        self.store.write(path, meta, write_contents, overwrite=request.overwrite)
        self._sampler.drop_sampler(str(path))  # an overwritten checkpoint must be re-read
        return {"path": str(path)}

    def load_weights(self, model_id: str, request: LoadWeights) -> dict[str, Any]:
        model = self._model(model_id)
        state = self._read(model, CheckpointPath.parse(request.path), request.with_optimizer)
        self._call("load", model_id, state)
        return {"path": request.path, "model_id": model_id}

    def _peft_config(self, model: _Model) -> Any:
        return lora_config_for([p.module for p in model.projections], model.lora)

    def _order(self, model: _Model) -> list[str]:
        """The factors' keys in PEFT's parameter order: the optimizer state's indices."""
        return [p.key(f) for p in model.projections for f in ("A", "B")]

    def _write(
        self,
        model: _Model,
        state: AdapterState,
        directory: Path,
        with_optimizer: bool,
        with_gradients: bool,
    ) -> None:
        """A PEFT directory (and optimizer.pt / gradients.pt) exactly as the HF backend writes
        one for the same adapter."""
        order = self._order(model)
        tensors = {k: state.factors[k]["param"].float().contiguous() for k in order}
        checkpoint_io.write_adapter_state(
            tensors, self._peft_config(model), model.base.location, directory
        )
        if with_optimizer:
            params = [torch.nn.Parameter(tensors[k].clone()) for k in order]
            adam = model.adam
            optimizer = torch.optim.AdamW(
                params, lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                weight_decay=adam.weight_decay, fused=True,
            )  # fmt: skip
            for p, key in zip(params, order, strict=True):
                entry = state.factors[key]
                if "exp_avg" in entry:
                    optimizer.state[p] = {
                        "step": entry["step"].float(),
                        "exp_avg": entry["exp_avg"].float(),
                        "exp_avg_sq": entry["exp_avg_sq"].float(),
                    }
            checkpoint_io.write_optimizer(optimizer, state.steps, directory)
        if with_gradients:
            grads = [state.factors[k].get("grad") for k in order]
            checkpoint_io.write_gradient_list(grads, directory)

    def _read(
        self,
        model: _Model,
        path: CheckpointPath,
        with_optimizer: bool,
        with_gradients: bool = False,
    ) -> AdapterState:
        """A checkpoint's adapter (and optimizer state, gradients) as whole tensors, after
        checking that it was made on this base and fits this model's adapter."""
        directory = checkpoint_io.checkpoint_on_base(
            self.store, self.data_dir, path, model.base.name, model.base.location
        )
        order = self._order(model)
        shapes = {p.key(f): p.full_shape(f, model.lora.rank) for p in model.projections
                  for f in ("A", "B")}  # fmt: skip
        saved = checkpoint_io.read_adapter_state(directory, shapes)
        factors = {k: {"param": saved[k]} for k in order}
        steps = 0
        if with_optimizer:
            optimizer, steps = checkpoint_io.read_optimizer(directory, torch.device("cpu"))
            for i, key in enumerate(order):
                entry = optimizer["state"].get(i)
                if entry:
                    factors[key].update(
                        step=entry["step"], exp_avg=entry["exp_avg"], exp_avg_sq=entry["exp_avg_sq"]
                    )
        if with_gradients:
            grads = checkpoint_io.read_gradients(directory, torch.device("cpu")) or []
            for key, grad in zip(order, grads, strict=False):
                if grad is not None:
                    factors[key]["grad"] = grad
        return AdapterState(factors, steps)

    # -- sampling ----------------------------------------------------------------------------

    def sample(self, requests: list[Sample]) -> list[SampleResult | TinkerdError]:
        return self._sampler.sample(requests)

    def sample_start(self, request: Sample, done: Any) -> None:
        """`worker.SampleStream`: samples run in the worker's sampling thread, beside training
        (the ranks are not involved)."""
        self._sampler.sample_start(request, done)

    def sample_step(self) -> bool:
        return self._sampler.sample_step()


def _model_directory(location: str) -> str:
    """A local directory holding the model's config and safetensors: `location` itself, or the
    hub snapshot of that name (from the local cache when the hub is out of reach)."""
    if Path(location).is_dir():
        return location
    from huggingface_hub import snapshot_download

    from tinkerd.base_models import hub_reachable

    try:
        return snapshot_download(
            location,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*"],
            local_files_only=not hub_reachable(),
        )
    except Exception as e:  # the hub client raises many kinds
        raise UserError(f"base model {location!r} could not be loaded: {e}") from None
