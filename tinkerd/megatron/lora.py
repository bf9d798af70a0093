"""LoRA on megatron-core's parallel linears: one adapter per Hugging Face projection, per model.

PEFT trains q, k, v, o, gate, up, down and lm_head as separate Linear layers; Megatron fuses
q/k/v into `linear_qkv` and gate/up into `linear_fc1`. Keeping one adapter per HF projection
(each delta placed into the fused layout) makes a Megatron adapter and a PEFT adapter the same
numbers, so checkpoints go both ways unchanged.

Tensor-parallel sharding follows the base layer: on a column-parallel layer (qkv, fc1, lm_head)
A is replicated and B holds this rank's output rows; on a row-parallel one (proj, fc2) A holds
this rank's input columns and B is replicated. The rank-r bottleneck is all-reduced where the
base layer's parallelism needs it, so replicated factors get the same gradient on every rank.

Several models train in one pass: each owns a range of the batch's rows (`routed`), and every
wrapped layer adds, to each range, the delta of that range's model only.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from tinkerd.megatron.model import Architecture
from tinkerd.types import LoraConfig

# (model name, first row, row after the last) of each model's rows in the running pass.
_ROUTES: ContextVar[tuple[tuple[str, int, int], ...]] = ContextVar("routes", default=())

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# The Megatron linear each HF projection is fused into.
FUSED_IN = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "proj",
            "gate_proj": "fc1", "up_proj": "fc1", "down_proj": "fc2"}  # fmt: skip


@dataclass(frozen=True)
class Projection:
    """One HF projection that LoRA can train: its PEFT module name, its full shape, and how
    this rank holds each factor (`shard` = the dimension of the full tensor this rank holds a
    slice of, or None where it holds all of it)."""

    module: str  # "model.layers.3.self_attn.q_proj", "lm_head"
    in_features: int
    out_features: int
    parallel: str  # "column" | "row"
    layer: int | None  # the decoder layer (global), None for lm_head

    @property
    def short(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    def key(self, factor: str) -> str:
        """The PEFT state-dict key of factor "A" or "B"."""
        return f"base_model.model.{self.module}.lora_{factor}.weight"

    def full_shape(self, factor: str, rank: int) -> tuple[int, int]:
        return (rank, self.in_features) if factor == "A" else (self.out_features, rank)

    def shard_dim(self, factor: str) -> int | None:
        """Which dimension of the factor is split across tensor-parallel ranks."""
        if self.parallel == "column":
            return 0 if factor == "B" else None
        return 1 if factor == "A" else None


def projections(arch: Architecture, lora: LoraConfig) -> list[Projection]:
    """The projections `lora` trains, in the order PEFT holds them (module order)."""
    out = []
    shapes = {
        "q_proj": (arch.hidden_size, arch.q_size, "column"),
        "k_proj": (arch.hidden_size, arch.kv_size, "column"),
        "v_proj": (arch.hidden_size, arch.kv_size, "column"),
        "o_proj": (arch.q_size, arch.hidden_size, "row"),
        "gate_proj": (arch.hidden_size, arch.ffn_hidden_size, "column"),
        "up_proj": (arch.hidden_size, arch.ffn_hidden_size, "column"),
        "down_proj": (arch.ffn_hidden_size, arch.hidden_size, "row"),
    }
    for layer in range(arch.num_layers):
        names = (ATTENTION if lora.train_attn else ()) + (MLP if lora.train_mlp else ())
        for name in names:
            group = "self_attn" if name in ATTENTION else "mlp"
            n_in, n_out, parallel = shapes[name]
            out.append(Projection(f"model.layers.{layer}.{group}.{name}", n_in, n_out, parallel,
                                  layer))  # fmt: skip
    if lora.train_unembed:
        out.append(Projection("lm_head", arch.hidden_size, arch.vocab_size, "column", None))
    return out


def initial_state(projs: Sequence[Projection], lora: LoraConfig) -> dict[str, torch.Tensor]:
    """Full fp32 factors as PEFT initializes them for this seed (the same random draws in the
    same order: each layer's nn.Linear A and B, then A kaiming-uniform again and B zero), so a
    model created here starts where the HF backend's does."""
    state: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        if lora.seed is not None:
            torch.manual_seed(lora.seed)
        else:
            torch.seed()
        for p in projs:
            a = nn.Linear(p.in_features, lora.rank, bias=False)
            b = nn.Linear(lora.rank, p.out_features, bias=False)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
            state[p.key("A")] = a.weight.detach()
            state[p.key("B")] = b.weight.detach()
    return state


@dataclass
class Factors:
    """One model's adapter on one projection, as this rank holds it."""

    a: nn.Parameter  # (r, in) or this rank's (r, in / tp)
    b: nn.Parameter  # (out, r) or this rank's rows
    scale: float


class LoraParallelLinear(nn.Module):
    """A Megatron parallel linear plus, on each routed range of rows, its model's LoRA deltas.

    `parts` names the HF projections fused in the base layer, in its output order (q, k, v for
    linear_qkv; gate, up for linear_fc1; one for the others); `fuse` joins their deltas into the
    base layer's output layout.
    """

    def __init__(self, base: nn.Module, parts: tuple[str, ...], parallel: str, fuse) -> None:
        super().__init__()
        self.base = base
        self.parts = parts
        self.parallel = parallel
        self.fuse = fuse or single
        self.adapters: dict[str, dict[str, Factors]] = {}  # model -> part -> factors

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        routes = [r for r in _ROUTES.get() if r[0] in self.adapters]
        if not routes:
            return out, bias
        rows = x.shape[1]  # Megatron's activations are (sequence, batch, features)
        pieces, at = [], 0
        for name, start, stop in routes:
            start, stop = max(start, at), min(stop, rows)
            if stop <= start:
                continue
            if start > at:
                pieces.append(out.new_zeros(out.shape[0], start - at, out.shape[2]))
            pieces.append(self._delta(self.adapters[name], x[:, start:stop]).to(out.dtype))
            at = stop
        if at < rows:
            pieces.append(out.new_zeros(out.shape[0], rows - at, out.shape[2]))
        return out + (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)), bias

    def _delta(self, factors: dict[str, Factors], x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        present = [factors.get(part) for part in self.parts]
        used = [f for f in present if f is not None]
        x = x.to(used[0].a.dtype)
        # One collective for every part: the bottlenecks side by side.
        u = torch.cat([x @ f.a.t() for f in used], dim=-1)
        if self.parallel == "column":  # backward: sum the ranks' shares of dL/du
            u = copy_to_tensor_model_parallel_region(u)
        else:  # forward: sum the ranks' shares of u
            u = reduce_from_tensor_model_parallel_region(u)
        bottlenecks = iter(u.split([f.a.shape[0] for f in used], dim=-1))
        deltas = [None if f is None else (next(bottlenecks) @ f.b.t()) * f.scale for f in present]
        return self.fuse(deltas)


Deltas = list["torch.Tensor | None"]


def single(deltas: Deltas) -> torch.Tensor:
    """The delta of a layer that is one HF projection."""
    assert deltas[0] is not None
    return deltas[0]


def cat_fuser(size: int):
    """Deltas of projections laid side by side (gate, up -> linear_fc1), each `size` wide on
    this rank; a projection the model does not train adds zeros."""

    def fuse(deltas: Deltas) -> torch.Tensor:
        like = next(d for d in deltas if d is not None)
        return torch.cat(
            [d if d is not None else like.new_zeros(*like.shape[:-1], size) for d in deltas], -1
        )

    return fuse


def qkv_fuser(arch: Architecture):
    """Deltas of q, k, v (this rank's heads, `arch` as `local_arch` gives it) in linear_qkv's
    layout: [q heads of KV group 0; k 0; v 0; q heads of group 1; ...]."""
    groups, d = arch.num_kv_heads, arch.head_dim
    per = arch.num_heads // groups
    sizes = (groups * per * d, groups * d, groups * d)

    def fuse(deltas: Deltas) -> torch.Tensor:
        like = next(x for x in deltas if x is not None)
        lead = like.shape[:-1]
        q, k, v = (
            x if x is not None else like.new_zeros(*lead, n)
            for x, n in zip(deltas, sizes, strict=True)
        )
        parts = (
            q.reshape(*lead, groups, per * d),
            k.reshape(*lead, groups, d),
            v.reshape(*lead, groups, d),
        )
        return torch.cat(parts, dim=-1).reshape(*lead, -1)

    return fuse


@contextlib.contextmanager
def routed(routes: Sequence[tuple[str, int, int]]) -> Iterator[None]:
    """Within: rows [start, stop) of every wrapped layer's input go through model `name`."""
    token = _ROUTES.set(tuple(routes))
    try:
        yield
    finally:
        _ROUTES.reset(token)


def everything(name: str) -> tuple[tuple[str, int, int], ...]:
    """A route sending every row through model `name`."""
    return ((name, 0, sys.maxsize),)
