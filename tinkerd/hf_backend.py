"""The transformers + PEFT backend: one frozen base model per base name, one LoRA adapter and one
AdamW per training model.

All adapters of a base live in one PeftModel; a request activates its adapter, so the base weights
are held once however many models train on them. Gradients are computed with autograd.grad and
added to `.grad` only once the whole request has succeeded: a failed request changes nothing.
"""

from __future__ import annotations

import itertools
import logging
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, get_peft_model_state_dict
from torch import nn

from tinkerd import checkpoint_io, packing, passes
from tinkerd.backends import BackendInfo
from tinkerd.base_models import BaseModelSource, hub_reachable, resolve_base_model
from tinkerd.hf_models import (
    LoadedBase,
    autodetect_device,
    base_dtype,
    checkpoint_layers,
    clip_gradients,
    device_memory,
    new_optimizer,
    peft_lora_config,
    sharing_weights,
)
from tinkerd.hf_sampling import SAMPLERS, Sampling
from tinkerd.logprobs import split_causal_lm
from tinkerd.logprobs import target_logprobs as chunked_target_logprobs
from tinkerd.loss_functions import Loss, get_loss
from tinkerd.storage import CheckpointMeta, CheckpointPath, CheckpointStore
from tinkerd.types import (
    CreateModel,
    ForwardBackward,
    ForwardBackwardResult,
    LoadWeights,
    LoraConfig,
    NotFound,
    OptimStep,
    SaveWeights,
    ServerError,
    TinkerdError,
    UserError,
    every_result,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass
class _Adapter:
    base: LoadedBase
    name: str  # the PEFT adapter name
    lora: LoraConfig
    params: list[nn.Parameter]
    optimizer: torch.optim.AdamW
    steps: int = 0
    snapshots: set[str] = field(default_factory=set)  # its in-memory sampler snapshots


@dataclass
class _Job:
    """One forward or forward_backward request in a packed pass; its tokens are the range
    [start, start + tokens) of the row."""

    index: int  # in the list the caller passed
    adapter: _Adapter
    request: ForwardBackward
    loss: Loss
    start: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(d.tokens) for d in self.request.datums)


def _token_groups(jobs: list[_Job], budget: int) -> list[list[_Job]]:
    """Consecutive jobs in groups of at most `budget` tokens (a larger job runs alone)."""
    groups: list[list[_Job]] = []
    size = 0
    for job in jobs:
        if not groups or size + job.tokens > budget:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.tokens
    return groups


class HFBackend(Sampling):
    """Implements tinkerd.types.Backend with transformers + PEFT on one device."""

    def __init__(
        self,
        data_dir: Path,
        device: str | None = None,
        store: CheckpointStore | None = None,
        max_sampler_adapters: int = 32,
        activation_checkpointing: bool = False,
        dtype: str | None = None,
        max_pass_tokens: int = 32768,
        sampler_cache_bytes: int = 4 << 30,
        sampler: str = "tinkerd",
        vllm_engine_args: dict[str, Any] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        # Recompute each decoder layer's activations in backward (`checkpoint_layers`): memory
        # for long sequences, at about one more forward pass of compute.
        self.activation_checkpointing = activation_checkpointing
        self.device = torch.device(device or autodetect_device())
        # The base models' dtype: bf16 on GPUs, fp32 on the CPU, unless `dtype` names one.
        self.dtype = base_dtype(self.device, dtype)
        self.store = store or CheckpointStore(self.data_dir / "runs")
        self._bases: dict[str, LoadedBase] = {}
        self._adapters: dict[str, _Adapter] = {}
        # Sampler weights held as extra adapters, least recently used first: key -> (base, name).
        self._samplers: OrderedDict[str, tuple[LoadedBase, str]] = OrderedDict()
        self._max_samplers = max_sampler_adapters
        # Held by the sampler's steps and by whatever changes its adapters (a snapshot, a drop),
        # so that the trainer's thread never changes them under a running step.
        self._sampler_lock = threading.RLock()
        self._bases_lock = threading.RLock()
        # The sampler's KV cache per base model, at most (tinkerd.sampling.Engine).
        self.sampler_cache_bytes = sampler_cache_bytes
        # The sampling engine: "tinkerd" (tinkerd.sampling) or "vllm" (tinkerd.vllm_sampler,
        # with these EngineArgs over its defaults); sampler adapters' PEFT directories for it.
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
        self.sampler = sampler
        self.vllm_engine_args = dict(vllm_engine_args or {})
        self._adapter_dirs: dict[str, Path] = {}
        # Requests of several models run in one packed pass of at most this many tokens.
        self.max_pass_tokens = max_pass_tokens
        self.attention = packing.attention_implementation(self.device)
        self._names = (f"m{i}" for i in itertools.count())

    # -- models ------------------------------------------------------------------------------

    def _load_base(self, name: str) -> LoadedBase:
        source = resolve_base_model(name, self.data_dir)
        with self._bases_lock:  # the trainer's thread and the sampler's both load bases
            if source.location in self._bases:
                return self._bases[source.location]
            if source.builtin:
                from tinkerd.tiny_model import build_tiny_model

                build_tiny_model(source.location)
            log.info("loading base model %s on %s", source.location, self.device)
            model = self._from_pretrained(source)
            # transformers' to() is @wraps(nn.Module.to), which mypy reads as taking self twice
            model.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]
            sampler = sharing_weights(model)  # before the trainer's tree is changed
            if self.activation_checkpointing:
                checkpoint_layers(model)
            vocab = min(
                model.get_input_embeddings().num_embeddings,
                model.get_output_embeddings().out_features,
            )
            base = LoadedBase(source, model, vocab, sampler=sampler)
            self._bases[source.location] = base
            return base

    def _from_pretrained(self, source: BaseModelSource) -> PreTrainedModel:
        """The base model's weights, or a UserError of one line. A hub name is read from its
        snapshot in the local Hugging Face cache when the hub is offline or out of reach, so a
        create fails in seconds, not after the hub client's retries (~50 s)."""
        from huggingface_hub import try_to_load_from_cache
        from transformers import AutoModelForCausalLM

        location = source.location
        failed = f"base model {source.name!r} could not be loaded"
        if not Path(location).is_absolute() and not hub_reachable():
            try:
                cached = try_to_load_from_cache(location, "config.json")
            except ValueError:  # not a name the hub could hold either
                cached = None
            if not isinstance(cached, str):
                raise UserError(
                    f"{failed}: not a local directory and the Hugging Face hub is not reachable"
                )
            location = str(Path(cached).parent)  # a directory: nothing asks the hub
        try:
            return AutoModelForCausalLM.from_pretrained(location, dtype=self.dtype)
        except (OSError, ValueError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{failed}: {reason}") from None

    def _add_adapter(
        self, base: LoadedBase, config: PeftLoraConfig, seed: int | None, trainable: bool
    ) -> tuple[str, list[nn.Parameter]]:
        """A new adapter on `base`, initialised from `seed` (fresh randomness when None)."""
        name = next(self._names)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            else:  # fork_rng restores the state after, so without this every model starts alike
                torch.seed()
            if base.peft is None:
                base.peft = get_peft_model(base.model, config, adapter_name=name)
            else:
                base.peft.add_adapter(name, config)
        base.peft.eval()
        params = [p for n, p in base.peft.named_parameters() if f".{name}." in n and "lora_" in n]
        for p in params:
            p.requires_grad_(trainable)
        return name, params

    def _delete_adapter(self, base: LoadedBase, name: str) -> None:
        if base.peft is not None and name in base.peft.peft_config:
            with warnings.catch_warnings():  # "Adapter m1 was active which is now deleted"
                warnings.simplefilter("ignore", UserWarning)
                base.peft.delete_adapter(name)

    def create_model(self, model_id: str, request: CreateModel) -> dict[str, Any]:
        if model_id in self._adapters:
            return {"model_id": model_id}
        base = self._load_base(request.base_model)
        config = peft_lora_config(base.model, request.lora)
        name, params = self._add_adapter(base, config, request.lora.seed, trainable=True)
        adapter = _Adapter(base, name, request.lora, params, new_optimizer(params))
        if request.from_checkpoint:
            try:
                path = CheckpointPath.parse(request.from_checkpoint)
                self._load_into(adapter, path, request.with_optimizer, request.with_gradients)
            except BaseException:
                self._delete_adapter(base, name)
                raise
        self._adapters[model_id] = adapter
        if request.from_checkpoint and request.with_gradients:
            self._consume(CheckpointPath.parse(request.from_checkpoint))
        return {"model_id": model_id, "trainable_params": sum(p.numel() for p in params)}

    def _consume(self, path: CheckpointPath) -> None:
        """Remove a hand-over's or a clean stop's state once the model lives again from it: it
        has no TTL (nothing may expire under a model in transit), and is of no use after."""
        try:
            self.store.delete(path)
        except (NotFound, OSError) as e:
            log.warning("could not remove %s after loading it: %s", path, e)

    def creation(self, model_id: str) -> CreateModel:
        """What creates this model again elsewhere (its base and LoRA config), from a checkpoint
        the caller adds."""
        adapter = self._adapter(model_id)
        return CreateModel(adapter.base.source.name, adapter.lora)

    def remove_model(self, model_id: str) -> None:
        """Free the model's adapter, optimizer state and sampler snapshots."""
        adapter = self._adapters.pop(model_id, None)
        if adapter is not None:
            for key in adapter.snapshots:
                self.drop_sampler(key)
            self._delete_adapter(adapter.base, adapter.name)

    def held(self) -> dict[str, Any]:
        from tinkerd.metrics import nvml_stats

        info = self.info()
        gpu = {}
        if self.device.type == "cuda":  # torch's own share, and NVML's utilisation if present
            gpu["memory_allocated"] = int(torch.cuda.memory_allocated(self.device))
            gpu["memory_reserved"] = int(torch.cuda.memory_reserved(self.device))
            gpu.update(nvml_stats(str(self.device)))
        return {
            "device": info.device,
            "memory_total": info.memory_total,
            "memory_free": info.memory_free,
            **gpu,
            "base_models": list(info.base_models),
            "models": sorted(self._adapters),
        }

    def info(self) -> BackendInfo:
        total, free = device_memory(self.device)
        return BackendInfo(
            name="hf",
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            base_models=tuple(sorted(b.source.name for b in self._bases.values())),
            memory_total=total,
            memory_free=free,
        )

    def _adapter(self, model_id: str) -> _Adapter:
        adapter = self._adapters.get(model_id)
        if adapter is None:
            raise NotFound(f"model {model_id!r} is not loaded on this worker")
        return adapter

    def adapter_state(self, model_id: str) -> dict[str, torch.Tensor]:
        """The adapter's weights by parameter name (used by tests and checkpoints)."""
        adapter = self._adapter(model_id)
        peft = adapter.base.peft
        assert peft is not None
        return {
            n.replace(f".{adapter.name}.", "."): p.detach().clone()
            for n, p in peft.named_parameters()
            if f".{adapter.name}." in n
        }

    # -- training ----------------------------------------------------------------------------

    def forward_backward(
        self, requests: list[tuple[str, ForwardBackward]]
    ) -> list[ForwardBackwardResult | TinkerdError]:
        """Run the requests, of any models, in as few packed passes as the token budget allows:
        one per base model when they fit. Each request is checked before any pass and fails
        alone (a bad input, a non-finite loss, out of memory): nothing of it is applied."""
        results: list[ForwardBackwardResult | TinkerdError | None] = [None] * len(requests)
        by_base: dict[int, list[_Job]] = {}
        for i, (model_id, request) in enumerate(requests):
            try:
                adapter = self._adapter(model_id)
                loss = get_loss(request.loss_fn)
                passes.check_request(request, loss, adapter.base.vocab_size)
            except TinkerdError as e:
                results[i] = e
                continue
            by_base.setdefault(id(adapter.base), []).append(_Job(i, adapter, request, loss))
        for jobs in by_base.values():
            for group in _token_groups(jobs, self.max_pass_tokens):
                self._run_group(group, results)
        return every_result(results)

    def _run_group(
        self, jobs: list[_Job], results: list[ForwardBackwardResult | TinkerdError | None]
    ) -> None:
        """One pass for `jobs`; out of memory, each request again on its own."""
        try:
            self._run_pass(jobs, results)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(jobs) == 1:
                results[jobs[0].index] = UserError("out of memory: send a smaller batch")
            else:
                for job in jobs:
                    self._run_group([job], results)

    def _run_pass(
        self, jobs: list[_Job], results: list[ForwardBackwardResult | TinkerdError | None]
    ) -> None:
        """One packed forward (and one backward) of requests of models on one base.

        Every datum is a segment of one row; each request's segments are one range of it, routed
        through its model's adapter. The backward differentiates the sum of the losses of the
        requests that succeeded, so a failed request's model gets nothing from it, and each
        model gets exactly the gradients of its own tokens. Results are written only at the end,
        so a pass that runs out of memory leaves nothing behind.
        """
        base = jobs[0].adapter.base
        assert base.peft is not None
        try:
            body, unembed = split_causal_lm(base.model)
        except ValueError as e:
            raise ServerError(str(e)) from None
        lengths = [len(d.tokens) for job in jobs for d in job.request.datums]
        start = 0
        for job in jobs:
            job.start, start = start, start + job.tokens
        tokens = np.concatenate([d.tokens for job in jobs for d in job.request.datums])
        input_ids = torch.from_numpy(tokens)[None].to(self.device, non_blocking=True)
        position_ids = packing.positions(lengths)[None].to(self.device, non_blocking=True)
        trained = list(
            {id(j.adapter): j.adapter for j in jobs if not j.request.forward_only}.values()
        )
        for adapter in trained:  # sampling (set_adapter) may have frozen it
            for p in adapter.params:
                p.requires_grad_(True)
        routes = [packing.Route(j.adapter.name, j.start, j.start + j.tokens) for j in jobs]
        outcome: dict[int, ForwardBackwardResult | TinkerdError] = {}
        losses: list[torch.Tensor] = []
        applied: dict[int, _Adapter] = {}  # the adapters of the requests that succeeded
        grads: list[tuple[nn.Parameter, torch.Tensor | None]] = []
        with (
            torch.set_grad_enabled(bool(trained)),
            packing.routed(base.peft, routes),
            packing.packed(base.model, lengths, self.attention),
        ):
            out = body(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            # (n, H) per request: one split, so backward joins them once
            hidden = out.last_hidden_state[0].split([j.tokens for j in jobs])
            for job, h in zip(jobs, hidden, strict=True):
                try:
                    value, outcome[job.index] = self._job_loss(job, h, unembed)
                except TinkerdError as e:
                    outcome[job.index] = e
                    continue
                if not job.request.forward_only:
                    losses.append(value)
                    applied[id(job.adapter)] = job.adapter
            if losses:  # a model whose requests all failed gets no gradient, not even zeros
                params = [p for a in applied.values() for p in a.params]
                total = torch.stack(losses).sum()
                found = torch.autograd.grad(total, params, allow_unused=True)
                grads = list(zip(params, found, strict=True))
        for p, g in grads:
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        for i, result in outcome.items():
            results[i] = result

    def _job_loss(
        self, job: _Job, hidden: torch.Tensor, unembed: nn.Module
    ) -> tuple[torch.Tensor, ForwardBackwardResult]:
        """The request's loss and per-datum outputs, from its (n, H) final hidden states."""
        request, loss = job.request, job.loss
        inputs = passes.loss_inputs(request.datums, loss.inputs, self.device)
        targets = inputs["target_tokens"][0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not request.forward_only):
            h = hidden.detach() if request.forward_only else hidden
            head = packing.adapter_unembed(unembed, job.adapter.name)
            logprobs = chunked_target_logprobs(h, head, targets)[None]  # (1, n[, K])
            return passes.request_loss(request, loss, logprobs, inputs)

    def optim_step(self, model_id: str, request: OptimStep) -> dict[str, float]:
        return passes.step_alone(self.optim_steps, model_id, request)

    def optim_steps(
        self, requests: list[tuple[str, OptimStep]]
    ) -> list[dict[str, float] | TinkerdError]:
        """Step several models' AdamW at once: each model's gradients are clipped to its own
        norm, then the models whose AdamParams agree (but for grad_clip_norm) go through one
        fused AdamW call over all their tensors. AdamW is elementwise per tensor, so each model
        ends exactly as if stepped alone; its state stays in its own optimizer."""
        results: list[dict[str, float] | TinkerdError] = []
        groups: dict[tuple[float, ...], list[_Adapter]] = {}
        stepped: set[str] = set()
        for model_id, request in requests:
            try:
                adapter = self._adapter(model_id)
            except TinkerdError as e:
                results.append(e)
                continue
            if model_id in stepped:
                results.append(UserError(f"model {model_id!r} has two optim_steps in one call"))
                continue
            stepped.add(model_id)
            adam = request.adam
            grad_norm = clip_gradients(adapter.params, adam.grad_clip_norm)
            for group in adapter.optimizer.param_groups:  # kept in its checkpoints
                group.update(
                    lr=adam.learning_rate,
                    betas=(adam.beta1, adam.beta2),
                    eps=adam.eps,
                    weight_decay=adam.weight_decay,
                )
            key = (adam.learning_rate, adam.beta1, adam.beta2, adam.eps, adam.weight_decay)
            groups.setdefault(key, []).append(adapter)
            results.append({"grad_norm:mean": grad_norm, "learning_rate:mean": adam.learning_rate})
        for (lr, beta1, beta2, eps, weight_decay), adapters in groups.items():
            if len(adapters) == 1:  # its own fused optimizer, set above: no new one per step
                adapters[0].optimizer.step()
            else:
                params = [p for a in adapters for p in a.params]
                fused = torch.optim.AdamW(
                    params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                    fused=True,
                )  # fmt: skip
                for a in adapters:  # the fused step reads and updates each model's own state
                    for p in a.params:
                        fused.state[p] = a.optimizer.state[p]
                fused.step()
            for a in adapters:
                a.optimizer.zero_grad(set_to_none=True)
                a.steps += 1
        return results

    # -- checkpoints -------------------------------------------------------------------------

    def save_weights(self, model_id: str, request: SaveWeights) -> dict[str, Any]:
        adapter = self._adapter(model_id)
        base, peft = adapter.base, adapter.base.peft
        assert peft is not None
        if request.snapshot_id is not None:  # unnamed sampler save: weights stay in memory
            state = get_peft_model_state_dict(
                peft, adapter_name=adapter.name, save_embedding_layers=False
            )
            config = cast(PeftLoraConfig, peft.peft_config[adapter.name])  # all LoRA here
            self.hold_sampler(request.snapshot_id, base.source.name, config, state)
            adapter.snapshots.add(request.snapshot_id)
            return {"sampling_session_id": request.snapshot_id}
        assert request.path is not None
        path = CheckpointPath.parse(request.path)
        with_optimizer = path.kind == "weights"
        meta = CheckpointMeta.saved(path, model_id, base.source.name, adapter.lora, request)

        def write_contents(directory: Path) -> None:
            checkpoint_io.write_adapter(peft, adapter.name, base.source.location, directory)
            if with_optimizer:
                checkpoint_io.write_optimizer(adapter.optimizer, adapter.steps, directory)
            if request.with_gradients:
                checkpoint_io.write_gradients(adapter.params, directory)

        self.store.write(path, meta, write_contents, overwrite=request.overwrite)
        self.drop_sampler(str(path))  # an overwritten checkpoint must be re-read
        return {"path": str(path)}

    def load_weights(self, model_id: str, request: LoadWeights) -> dict[str, Any]:
        adapter = self._adapter(model_id)
        self._load_into(adapter, CheckpointPath.parse(request.path), request.with_optimizer)
        return {"path": request.path, "model_id": model_id}

    def _checkpoint_dir(self, base: LoadedBase, path: CheckpointPath) -> Path:
        """The checkpoint's directory, after checking it exists and was made on `base`."""
        return checkpoint_io.checkpoint_on_base(
            self.store, self.data_dir, path, base.source.name, base.source.location
        )

    def _load_into(
        self,
        adapter: _Adapter,
        path: CheckpointPath,
        with_optimizer: bool,
        with_gradients: bool = False,
    ) -> None:
        """Load a checkpoint into a live adapter; on any failure the adapter is left unchanged."""
        directory = self._checkpoint_dir(adapter.base, path)
        optimizer_state = (
            checkpoint_io.read_optimizer(directory, self.device) if with_optimizer else None
        )
        grads = checkpoint_io.read_gradients(directory, self.device) if with_gradients else None
        before = [p.detach().clone() for p in adapter.params]
        try:
            assert adapter.base.peft is not None  # an adapter's base is wrapped
            checkpoint_io.load_adapter(adapter.base.peft, adapter.name, directory)
            optimizer = new_optimizer(adapter.params)
            if optimizer_state is not None:
                optimizer.load_state_dict(optimizer_state[0])
        except (RuntimeError, ValueError, KeyError) as e:
            with torch.no_grad():
                for p, old in zip(adapter.params, before, strict=True):
                    p.copy_(old)
            raise UserError(f"checkpoint {path} does not fit model: {e}") from None
        adapter.optimizer = optimizer
        adapter.steps = optimizer_state[1] if optimizer_state else 0
        for i, p in enumerate(adapter.params):
            grad = grads[i] if grads is not None else None
            p.grad = grad.to(p.dtype) if grad is not None else None
