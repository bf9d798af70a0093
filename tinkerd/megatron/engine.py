"""One rank's share of the Megatron backend: its slices of the base models, of every model's LoRA
adapter and AdamW state, and the passes over them.

Every method is collective: all ranks call it with the same arguments in the same order (rank 0's
backend sends each call to the others, `backend.py`). Whole tensors cross ranks only as LoRA
factors and their optimizer state, which are small: rank 0 sends full tensors and each rank keeps
its slice (`_slice`); saving gathers the slices back on rank 0 (`gather`).

A pass runs one micro-batch through the pipeline stages with point-to-point sends (activations
forward, their gradients backward); the last stage computes every request's logprobs from the
vocabulary-parallel logits a chunk of positions at a time (never gathering the vocabulary, never
holding all positions' logits), its loss, and sends the results to every rank.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinkerd import hf_models, passes
from tinkerd.loss_functions import get_loss
from tinkerd.megatron import lora as lora_mod
from tinkerd.megatron.model import Architecture, GPTModel, build_model, load_weights, local_arch
from tinkerd.types import (
    AdamParams,
    ForwardBackward,
    ForwardBackwardResult,
    LoraConfig,
    ServerError,
    TinkerdError,
)

# Positions per chunk of the unembedding: its logits are (chunk x vocab / tp) at a time.
LOGITS_CHUNK = 1024


@dataclass
class AdapterState:
    """A model's adapter as whole tensors: by PEFT state-dict key, the factor ("param") and,
    where they are kept, its AdamW moments ("step", "exp_avg", "exp_avg_sq") and its gradient
    ("grad"); `steps` optimizer steps taken. What rank 0 sends and gathers."""

    factors: dict[str, dict[str, torch.Tensor]]
    steps: int = 0


@dataclass
class _Base:
    arch: Architecture
    model: GPTModel  # this rank's stage
    layers: dict[int, dict[str, lora_mod.LoraParallelLinear]]  # global layer -> wrapped linears
    head: lora_mod.LoraParallelLinear | None  # the output layer, on the last stage


@dataclass
class _Slot:
    """One of a model's LoRA factors as this rank holds it."""

    key: str  # the PEFT state-dict key of the full tensor
    dim: int | None  # the dimension this rank holds a slice of; None: all of it
    size: int  # the full tensor's size along `dim`, padded to divide by tp
    full: int  # its size along `dim` unpadded
    param: nn.Parameter


@dataclass
class _Model:
    base: str
    name: str
    lora: LoraConfig
    slots: list[_Slot]  # this rank's factors, in PEFT's order
    optimizer: torch.optim.AdamW
    steps: int = 0
    layers: list[lora_mod.LoraParallelLinear] = field(default_factory=list)

    @property
    def params(self) -> list[nn.Parameter]:
        return [s.param for s in self.slots]


class Engine:
    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        from megatron.core import parallel_state as ps

        self.device, self.dtype = device, dtype
        self.rank = dist.get_rank()
        self.tp, self.tp_rank = (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank(),
        )
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.model_group = ps.get_model_parallel_group()
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.prev = None if self.first else ps.get_pipeline_model_parallel_prev_rank()
        self.next = None if self.last else ps.get_pipeline_model_parallel_next_rank()
        # The rank that reports a pass's results: the last stage's first tensor-parallel rank
        # (found by asking every rank once, rather than assuming Megatron's rank order).
        reporter = torch.tensor(
            self.rank if self.last and self.tp_rank == 0 else dist.get_world_size(),
            device=device,  # nccl reduces device tensors only
        )
        dist.all_reduce(reporter, op=dist.ReduceOp.MIN)
        self.reporter = int(reporter)
        self.bases: dict[str, _Base] = {}
        self.models: dict[str, _Model] = {}
        self._names = (f"m{i}" for i in itertools.count())

    # -- models ------------------------------------------------------------------------------

    def add_base(self, key: str, arch: Architecture, directory: str | None) -> None:
        """Build base `key` from the HF weights in `directory`; None: random weights made on
        the device (benchmarks: an 8B model without writing and reading 16 GB)."""
        if key in self.bases:
            return
        from pathlib import Path

        model = build_model(arch, self.dtype, self.device)
        if directory is None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
        else:
            load_weights(model, arch, Path(directory))
        layers: dict[int, dict[str, lora_mod.LoraParallelLinear]] = {}
        local = local_arch(arch, self.tp)
        for layer in model.decoder.layers:
            attn, mlp = layer.self_attention, layer.mlp
            wrapped = {
                "qkv": lora_mod.LoraParallelLinear(
                    attn.linear_qkv, ("q_proj", "k_proj", "v_proj"), "column",
                    lora_mod.qkv_fuser(local),
                ),
                "proj": lora_mod.LoraParallelLinear(attn.linear_proj, ("o_proj",), "row", None),
                "fc1": lora_mod.LoraParallelLinear(
                    mlp.linear_fc1, ("gate_proj", "up_proj"), "column",
                    lora_mod.cat_fuser(arch.ffn_hidden_size // self.tp),
                ),
                "fc2": lora_mod.LoraParallelLinear(mlp.linear_fc2, ("down_proj",), "row", None),
            }  # fmt: skip
            attn.linear_qkv, attn.linear_proj = wrapped["qkv"], wrapped["proj"]
            mlp.linear_fc1, mlp.linear_fc2 = wrapped["fc1"], wrapped["fc2"]
            layers[layer.layer_number - 1] = wrapped
        head = None
        if self.last:
            head = lora_mod.LoraParallelLinear(model.output_layer, ("lm_head",), "column", None)
            model.output_layer = head
        self.bases[key] = _Base(arch, model, layers, head)

    def _layer_of(self, base: _Base, proj: lora_mod.Projection):
        """The wrapped linear of `proj` on this rank, or None if another stage holds it."""
        if proj.layer is None:
            return base.head
        wrapped = base.layers.get(proj.layer)
        if wrapped is None:
            return None
        return wrapped[lora_mod.FUSED_IN[proj.short]]

    def create(self, model_id: str, base_key: str, lora: LoraConfig, state: AdapterState) -> None:
        """Add model `model_id` with its full factors (and optimizer state, if any) `state`."""
        base = self.bases[base_key]
        name = next(self._names)
        slots: list[_Slot] = []
        layers: list[lora_mod.LoraParallelLinear] = []
        scale = lora.alpha / lora.rank
        for proj in lora_mod.projections(base.arch, lora):
            layer = self._layer_of(base, proj)
            if layer is None:
                continue
            made = {}
            for factor in ("A", "B"):
                dim = proj.shard_dim(factor)
                full = size = proj.full_shape(factor, lora.rank)[dim] if dim is not None else 0
                if dim is not None and proj.short == "lm_head":
                    size = base.arch.padded_vocab(self.tp)
                param = nn.Parameter(torch.empty(0, device=self.device))
                slot = _Slot(proj.key(factor), dim, size, full, param)
                slots.append(slot)
                made[factor] = param
            layer.adapters.setdefault(name, {})[proj.short] = lora_mod.Factors(
                made["A"], made["B"], scale
            )
            layers.append(layer)
        model = _Model(base_key, name, lora, slots, new_optimizer([]), layers=layers)
        self._set(model, state)
        self.models[model_id] = model

    def _slice(self, slot: _Slot, full: torch.Tensor) -> torch.Tensor:
        if slot.dim is None:
            return full.to(self.device, torch.float32).clone()
        pad = slot.size - full.shape[slot.dim]
        if pad:
            shape = list(full.shape)
            shape[slot.dim] = pad
            full = torch.cat([full, full.new_zeros(shape)], dim=slot.dim)
        n = slot.size // self.tp
        part = full.narrow(slot.dim, self.tp_rank * n, n)
        return part.to(self.device, torch.float32).clone()

    def _set(self, model: _Model, state: AdapterState) -> None:
        """Weights, optimizer moments and gradients from full tensors; a fresh optimizer."""
        with torch.no_grad():
            for slot in model.slots:
                entry = state.factors[slot.key]
                slot.param.data = self._slice(slot, entry["param"])
                grad = entry.get("grad")
                slot.param.grad = None if grad is None else self._slice(slot, grad)
        model.optimizer = new_optimizer(model.params)
        for slot in model.slots:
            entry = state.factors[slot.key]
            if "exp_avg" in entry:
                model.optimizer.state[slot.param] = {
                    "step": entry["step"].clone().to(torch.float32),
                    "exp_avg": self._slice(slot, entry["exp_avg"]),
                    "exp_avg_sq": self._slice(slot, entry["exp_avg_sq"]),
                }
        model.steps = state.steps

    def load(self, model_id: str, state: AdapterState) -> None:
        self._set(self.models[model_id], state)

    def remove(self, model_id: str) -> None:
        model = self.models.pop(model_id, None)
        if model is not None:
            for layer in model.layers:
                layer.adapters.pop(model.name, None)

    def gather(self, model_id: str, optimizer: bool, gradients: bool) -> AdapterState | None:
        """The model's full factors (with their AdamW moments and gradients if asked) on rank
        0, from every rank's slices; None on the other ranks."""
        model = self.models[model_id]
        mine = []
        for slot in model.slots:
            if slot.dim is None and self.tp_rank != 0:
                continue  # replicated: tensor-parallel rank 0 sends it
            entry = {"param": slot.param.detach()}
            if gradients and slot.param.grad is not None:
                entry["grad"] = slot.param.grad.detach()
            state = model.optimizer.state.get(slot.param)
            if optimizer and state:
                entry.update(
                    step=state["step"], exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"]
                )
            entry = {k: v.cpu() for k, v in entry.items()}
            mine.append((slot.key, slot.dim, slot.full, self.tp_rank, entry))
        everyone: list[Any] | None = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(mine, everyone, dst=0)
        if everyone is None:  # not rank 0
            return None
        pieces: dict[str, list[tuple[int, dict]]] = {}
        shapes: dict[str, tuple[int | None, int]] = {}
        for rank_slots in everyone:
            for key, dim, size, tp_rank, entry in rank_slots:
                pieces.setdefault(key, []).append((tp_rank, entry))
                shapes[key] = (dim, size)
        full: dict[str, dict[str, torch.Tensor]] = {}
        for key, parts in pieces.items():
            parts.sort(key=lambda p: p[0])
            dim, size = shapes[key]
            joined = {}
            for name, first in parts[0][1].items():
                if name == "step" or dim is None:
                    joined[name] = first
                else:  # the ranks' slices in order, less the vocabulary's padding
                    whole = torch.cat([entry[name] for _, entry in parts], dim=dim)
                    joined[name] = whole.narrow(dim, 0, size)
            full[key] = joined
        return AdapterState(full, model.steps)

    # -- passes ------------------------------------------------------------------------------

    def forward_backward(
        self, base_key: str, jobs: list[tuple[int, str, ForwardBackward]]
    ) -> dict[int, ForwardBackwardResult | TinkerdError] | None:
        """One pass of checked requests (index, model id, request) of models on one base. Each
        request's loss joins the backward only if it is finite; a model whose requests all
        failed keeps its gradients as they were. The results, by index, on rank 0."""
        base = self.bases[base_key]
        datums = [d for _, _, request in jobs for d in request.datums]
        lengths = [len(d.tokens) for d in datums]
        rows, width = len(datums), max(lengths)
        tokens = torch.zeros(rows, width, dtype=torch.long)
        for i, d in enumerate(datums):
            tokens[i, : lengths[i]] = torch.from_numpy(d.tokens)
        tokens = tokens.to(self.device)
        positions = torch.arange(width, device=self.device)[None].expand(rows, width)
        mask = causal_mask(width, self.device)
        routes, at = [], 0
        for _, model_id, request in jobs:
            routes.append((self.models[model_id].name, at, at + len(request.datums)))
            at += len(request.datums)
        trained = {m: self.models[m] for _, m, r in jobs if not r.forward_only}
        stash = {}
        for model in trained.values():
            for p in model.params:
                stash[p] = p.grad
                p.grad = None
                p.requires_grad_(True)
        train = bool(trained)
        inputs = None
        with torch.set_grad_enabled(train), lora_mod.routed(routes):
            if not self.first:
                inputs = torch.empty(width, rows, base.arch.hidden_size, dtype=self.dtype,
                                     device=self.device)  # fmt: skip
                dist.recv(inputs, self.prev)
                inputs.requires_grad_(train)
                base.model.set_input_tensor(inputs)
            decoder_input, rotary = base.model._preprocess(
                input_ids=tokens if self.first else None, position_ids=positions
            )[:2]
            hidden = base.model.decoder(
                hidden_states=decoder_input, attention_mask=mask, rotary_pos_emb=rotary
            )
            outcome: dict[int, Any] = {}
            losses: list[torch.Tensor] = []
            applied: set[str] = set()
            if not self.last:
                dist.send(hidden.detach().contiguous(), self.next)
            else:
                at = 0
                for index, model_id, request in jobs:
                    n = len(request.datums)
                    try:
                        value, outcome[index] = self._request_loss(
                            base, self.models[model_id].name, request, hidden[:, at : at + n],
                            lengths[at : at + n],
                        )  # fmt: skip
                    except Exception as e:  # this request fails alone; the ranks stay in step
                        outcome[index] = (
                            e
                            if isinstance(e, TinkerdError)
                            else ServerError(f"{type(e).__name__}: {e}")
                        )
                    else:
                        if not request.forward_only:
                            losses.append(value)
                            applied.add(model_id)
                    at += n
        report = [(outcome, applied)]
        dist.broadcast_object_list(report, src=self.reporter)
        outcome, applied = report[0]
        if applied:
            if self.last:
                total = torch.stack(losses).sum()
                if total.requires_grad:
                    torch.autograd.backward(total)
            else:
                grad = torch.empty_like(hidden)
                dist.recv(grad, self.next)
                if hidden.requires_grad:  # else no trained factor before this stage's end
                    torch.autograd.backward(hidden, grad)
            if not self.first:
                assert inputs is not None
                grad = inputs.grad if inputs.grad is not None else torch.zeros_like(inputs)
                dist.send(grad.contiguous(), self.prev)
        for model_id, model in trained.items():
            for p in model.params:
                before = stash[p]
                if model_id not in applied or p.grad is None:
                    p.grad = before
                elif before is not None:
                    p.grad = before.add_(p.grad)
        return outcome if self.rank == 0 else None

    def _request_loss(
        self,
        base: _Base,
        name: str,
        request: ForwardBackward,
        hidden: torch.Tensor,
        lengths: list[int],
    ) -> tuple[torch.Tensor, ForwardBackwardResult]:
        """A request's loss and results from its rows of the last stage's hidden states."""
        loss = get_loss(request.loss_fn)
        h = torch.cat([hidden[:n, i] for i, n in enumerate(lengths)])  # (n, H)
        inputs = passes.loss_inputs(request.datums, loss.inputs, self.device)
        targets = inputs["target_tokens"][0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not request.forward_only):
            if request.forward_only:
                h = h.detach()
            logprobs = self._target_logprobs(base, name, h, targets)[None]
            return passes.request_loss(request, loss, logprobs, inputs)

    def _target_logprobs(
        self, base: _Base, name: str, hidden: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """(n[, K]) logprobs of `targets` under model `name`, LOGITS_CHUNK positions at a time,
        each chunk's logits recomputed in backward rather than kept."""
        head = base.head
        assert head is not None
        weight = None
        if base.model.share_embeddings_and_output_weights:  # the head is the embedding itself
            weight = base.model.shared_embedding_or_output_weight()
        vocab = base.arch.padded_vocab(self.tp) // self.tp
        start, true_vocab = self.tp_rank * vocab, base.arch.vocab_size
        many = targets.dim() == 2
        targets = targets if many else targets[:, None]

        def chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with lora_mod.routed(lora_mod.everything(name)):
                logits, _ = head(h[:, None], weight=weight)
            return vocab_parallel_logprobs(
                logits[:, 0].float(), t, start, true_vocab, self.tp_group
            )

        out = []
        for h, t in zip(hidden.split(LOGITS_CHUNK), targets.split(LOGITS_CHUNK), strict=True):
            if torch.is_grad_enabled():
                out.append(checkpoint(chunk, h, t, use_reentrant=False))
            else:
                out.append(chunk(h, t))
        logprobs = torch.cat(out)
        return logprobs if many else logprobs[:, 0]

    # -- optimizer ---------------------------------------------------------------------------

    def optim_steps(self, steps: list[tuple[str, AdamParams]]) -> list[dict[str, float]]:
        """AdamW on each model's slices, after clipping its gradients to their global norm
        (sharded factors summed over every rank, replicated ones counted once)."""
        results = []
        for model_id, adam in steps:
            model = self.models[model_id]
            norm = self._grad_norm(model)
            if adam.grad_clip_norm > 0 and norm > 0:
                coef = min(adam.grad_clip_norm / (norm + 1e-6), 1.0)
                for p in model.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
            for group in model.optimizer.param_groups:
                group.update(
                    lr=adam.learning_rate,
                    betas=(adam.beta1, adam.beta2),
                    eps=adam.eps,
                    weight_decay=adam.weight_decay,
                )
            model.optimizer.step()
            model.optimizer.zero_grad(set_to_none=True)
            model.steps += 1
            results.append({"grad_norm:mean": norm, "learning_rate:mean": adam.learning_rate})
        return results

    def _grad_norm(self, model: _Model) -> float:
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for slot in model.slots:
            grad = slot.param.grad
            if grad is not None and (slot.dim is not None or self.tp_rank == 0):
                squares += grad.double().pow(2).sum()
        dist.all_reduce(squares, group=self.model_group)
        return float(squares.sqrt())


def causal_mask(width: int, device: torch.device) -> torch.Tensor:
    """Megatron's boolean attention mask (True: masked), given explicitly: its default builds
    on "cuda". Rows are right-padded, so a causal mask alone keeps padding out of every real
    position's attention."""
    return torch.triu(torch.ones(width, width, dtype=torch.bool, device=device), 1)[None, None]


def vocab_parallel_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, start: int, vocab: int, group: Any
) -> torch.Tensor:
    """log softmax(logits)[targets] over a vocabulary split across the tensor-parallel group:
    `logits` (n, V/tp) are this rank's columns [start, start + V/tp); `targets` (n, K) global
    ids below `vocab` (columns past it are padding, left out of the softmax). Only (n,)-sized
    maxima and sums cross ranks."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    width = logits.shape[-1]
    if start + width > vocab:  # this rank holds padding columns
        padding = torch.arange(start, start + width, device=logits.device) >= vocab
        logits = logits.masked_fill(padding, float("-inf"))
    top = logits.detach().max(dim=-1, keepdim=True).values
    if dist.get_world_size(group) > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - top
    total = reduce_from_tensor_model_parallel_region(shifted.exp().sum(dim=-1, keepdim=True))
    local = targets - start
    inside = (local >= 0) & (local < width)
    picked = shifted.gather(-1, local.clamp(0, width - 1))
    picked = reduce_from_tensor_model_parallel_region(torch.where(inside, picked, 0.0))
    return picked - total.log()


def new_optimizer(params: list[nn.Parameter]) -> torch.optim.AdamW:
    """The HF backend's AdamW (`hf_models.new_optimizer`) over this rank's slices; over a
    placeholder where this rank holds none of the model's factors (another stage trains them):
    torch refuses an empty parameter list."""
    return hf_models.new_optimizer(params or [nn.Parameter(torch.empty(0))])
