"""Packed passes: many sequences of many adapters in one row, with no padding.

A pass concatenates every datum of every request into one row of N tokens. Each datum keeps its own
positions (restarting at 0) and attends only to itself: attention runs per segment (varlen flash
attention on CUDA when flash-attn is installed, else SDPA on each segment, which on CPU is exactly
the computation of that sequence alone). Each request's tokens are one contiguous range of the
row, and every LoRA layer adds, to each range, the delta of that range's adapter only: adapters of
different ranks and target layers share one forward and one backward, and each adapter's
parameters get gradients from its own tokens only.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

PACKED_ATTENTION = "tinkerd_packed"
T = TypeVar("T")

# (start, stop) of each sequence in the row, while a packed pass runs.
_SEGMENTS: ContextVar[tuple[tuple[int, int], ...] | None] = ContextVar("segments", default=None)


@dataclass(frozen=True)
class Route:
    """Tokens [start, stop) of the row go through adapter `name`."""

    name: str
    start: int
    stop: int


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each sequence of the packed row, (1, H, N, D) -> (1, N, H, D).

    No position ever sees another sequence, and each sequence is computed as if it ran alone.
    Outside a packed pass this is plain SDPA, so a model left on it still samples as before.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = _SEGMENTS.get()
    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("a packed pass runs one row and no attention mask")
    window = kwargs.pop("sliding_window", None)
    outputs = []
    for start, stop in segments:
        mask = None
        if window and stop - start > window:  # the sliding window of this sequence alone
            i = torch.arange(stop - start, device=query.device)
            mask = ((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window))[None, None]
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, start:stop],
            key[:, :, start:stop],
            value[:, :, start:stop],
            mask,
            dropout,
            scaling,
            **kwargs,
        )
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


_register()


def attention_implementation(device: torch.device) -> str:
    """Varlen flash attention on CUDA when flash-attn is installed (transformers finds the
    sequences from the restarting position ids), else SDPA per sequence."""
    if device.type == "cuda":
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return PACKED_ATTENTION


def positions(lengths: Sequence[int]) -> torch.Tensor:
    """(N,) position ids restarting at 0 for each sequence."""
    return torch.cat([torch.arange(n) for n in lengths])


def bounds(lengths: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(start, stop) of each sequence in the row."""
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return tuple(out)


@contextlib.contextmanager
def attention_as(
    model: nn.Module, implementation: str, var: ContextVar[T | None], value: T
) -> Iterator[None]:
    """Run `model`'s attention through the registered `implementation`, which reads what it
    must do as `value` from `var`."""
    config = cast("PreTrainedConfig", model.config)  # a transformers model's, through PEFT's
    before = config._attn_implementation
    token = var.set(value)
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before
        var.reset(token)


def packed(
    model: nn.Module, lengths: Sequence[int], implementation: str
) -> contextlib.AbstractContextManager[None]:
    """Run `model`'s attention on the packed row of sequences of `lengths` (and its backward,
    in case a layer recomputes its forward then)."""
    return attention_as(model, implementation, _SEGMENTS, bounds(lengths))


def lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def lora_forward(
    layer: LoraLinear, x: torch.Tensor, routes: Sequence[Route], routing: Routing | None = None
) -> torch.Tensor:
    """The base layer plus, on each route's tokens (dimension -2), that route's adapter: what
    PEFT computes for one active adapter (base + B(A(x)) * scale), per range of tokens.

    The tokens are split once and the deltas joined once, so backward costs one split and one
    join per layer, never a full-size gradient per route. Without grad (sampling, forward-only
    passes) and with a `routing`, the deltas are added in place instead, several adapters' in
    two matrix products (`_add_routed`)."""
    result = layer.base_layer(x)
    if routing is not None and not torch.is_grad_enabled() and not layer.training:
        return _add_routed(layer, x, result, routing)
    n = x.shape[-2]
    sizes: list[int] = []
    names: list[str | None] = []
    at = 0
    for route in routes:
        start, stop = max(route.start, at), min(route.stop, n)
        if stop <= start:
            continue
        if start > at:  # tokens no route covers: no adapter
            sizes.append(start - at)
            names.append(None)
        sizes.append(stop - start)
        names.append(route.name if route.name in layer.lora_A else None)
        at = stop
    if at < n:
        sizes.append(n - at)
        names.append(None)
    if all(name is None for name in names):
        return result
    deltas = []
    for part, name in zip(x.split(sizes, dim=-2), names, strict=True):
        if name is None:
            deltas.append(result.new_zeros((*part.shape[:-1], result.shape[-1])))
            continue
        deltas.append(_delta(layer, name, part).to(result.dtype))
    return result + (deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-2))


def _factors(layer: LoraLinear, name: str) -> tuple[nn.Linear, nn.Linear]:
    """Adapter `name`'s A and B in `layer`: nn.Linear each (PEFT's ModuleDicts say Module)."""
    return cast(nn.Linear, layer.lora_A[name]), cast(nn.Linear, layer.lora_B[name])


def _delta(layer: LoraLinear, name: str, x: torch.Tensor) -> torch.Tensor:
    """Adapter `name`'s B(A(x)) * scale."""
    lora_a, lora_b = _factors(layer, name)
    x = x.to(lora_a.weight.dtype)
    return lora_b(lora_a(layer.lora_dropout[name](x))) * layer.scaling[name]


@dataclass(frozen=True)
class _Stacked:
    """Several adapters' factors of one layer side by side: A (R, in), B (out, R)."""

    names: tuple[str, ...]
    versions: tuple[int, ...]
    a: torch.Tensor
    b: torch.Tensor
    ranks: tuple[int, ...]
    scales: tuple[float, ...]


def _add_routed(
    layer: LoraLinear, x: torch.Tensor, result: torch.Tensor, routing: Routing
) -> torch.Tensor:
    """Add each route's delta to its tokens of `result`, in place (routes in order, apart).

    One adapter: B(A(x)) * scale on its ranges. Several: two matrix products for all of them,
    h = x [A_1; ...; A_k]^T, each token's h kept (and scaled) only in its own adapter's
    columns, then h [B_1 ... B_k]^T: a token's delta is its adapter's alone, plus zeros."""
    present = tuple(name for name in routing.names if name in layer.lora_A)
    if not present:
        return result
    n = x.shape[-2]
    if len(present) == 1:
        for route in routing.routes:
            stop = min(route.stop, n)
            if route.name == present[0] and stop > route.start:
                part = x[..., route.start : stop, :]
                result[..., route.start : stop, :] += _delta(layer, route.name, part).to(
                    result.dtype
                )
        return result
    stacked = _stacked(layer, present, routing.frozen)
    key = (present, stacked.ranks, stacked.scales, n)
    mask = routing.masks.get(key)
    if mask is None:
        mask = torch.zeros(n, sum(stacked.ranks), dtype=stacked.a.dtype, device=x.device)
        offsets = dict(zip(present, itertools.accumulate((0, *stacked.ranks)), strict=False))
        columns = dict(zip(present, zip(stacked.ranks, stacked.scales, strict=True), strict=True))
        for route in routing.routes:
            if route.name in offsets:
                rank, scale = columns[route.name]
                at = offsets[route.name]
                mask[route.start : route.stop, at : at + rank] = scale
        routing.masks[key] = mask
    h = nn.functional.linear(x.to(stacked.a.dtype), stacked.a) * mask  # (..., n, R)
    result += nn.functional.linear(h, stacked.b).to(result.dtype)
    return result


def _stacked(layer: LoraLinear, names: tuple[str, ...], frozen: bool) -> _Stacked:
    """The layer's stacked factors of `names`, kept on the layer while they hold: the same
    names, and (unless the caller's adapters are frozen) the same weight versions."""
    stacked = layer.__dict__.get("_tinkerd_stacked")
    versions: tuple[int, ...] = ()
    if not frozen:
        versions = tuple(
            v for name in names
            for v in (layer.lora_A[name].weight._version, layer.lora_B[name].weight._version)
        )  # fmt: skip
    if stacked is None or stacked.names != names or stacked.versions != versions:
        a = [_factors(layer, name)[0].weight for name in names]
        stacked = _Stacked(
            names,
            versions,
            torch.cat(a),  # (R, in)
            torch.cat([_factors(layer, name)[1].weight for name in names], dim=1),  # (out, R)
            tuple(w.shape[0] for w in a),
            tuple(float(layer.scaling[name]) for name in names),
        )
        layer.__dict__["_tinkerd_stacked"] = stacked
    return stacked


class Routing:
    """The routes a `routed` model applies; they may change between calls (a sampling pass
    routes its tokens through the body, then its last positions through the head). `frozen`:
    the adapters' weights never change (a sampler's), so stacked factors are kept by name."""

    def __init__(self, routes: Sequence[Route], frozen: bool = False) -> None:
        self.frozen = frozen
        self.routes = tuple(routes)

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    @routes.setter
    def routes(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(routes)
        self.names = tuple(dict.fromkeys(route.name for route in self._routes))
        self.masks: dict[tuple, torch.Tensor] = {}


@contextlib.contextmanager
def routed(
    model: nn.Module,
    routes: Sequence[Route],
    layers: list[LoraLinear] | None = None,
    frozen: bool = False,
) -> Iterator[Routing]:
    """Every LoRA layer of `model` (or of `layers`, its LoRA layers if the caller knows them)
    applies each route's adapter to that route's tokens, whatever adapter PEFT has active. Held
    through backward too (a recomputed forward routes the same). Routes are in order and apart.
    `frozen`: see `Routing`."""
    layers = lora_layers(model) if layers is None else layers
    routing = Routing(routes, frozen)
    for layer in layers:
        # an instance attribute, as `layer.forward = ...` sets (typed code may not assign a method)
        layer.__dict__["forward"] = lambda x, *args, _layer=layer, **kwargs: lora_forward(
            _layer, x, routing.routes, routing
        )
    try:
        yield routing
    finally:
        for layer in layers:
            del layer.forward


class AdapterView(nn.Module):
    """One adapter's view of a LoRA layer: the base plus that adapter on every token, whatever
    routes are active. Its parameters are that adapter's alone, so a chunked unembedding that
    differentiates "its module's parameters" reaches this adapter's and no other's."""

    layer: LoraLinear

    def __init__(self, layer: LoraLinear, name: str) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: not its parameters
        self.lora_a, self.lora_b = layer.lora_A[name], layer.lora_B[name]
        self.routes = (Route(name, 0, sys.maxsize),)
        self.out_features = layer.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_forward(self.layer, x, self.routes)


def adapter_unembed(unembed: nn.Module, name: str | None) -> nn.Module:
    """`unembed` (the lm_head, maybe inside a logit-scaling wrapper whose `head` it is) as
    adapter `name` sees it; the base head when that adapter does not train it, or name is None."""
    head = getattr(unembed, "head", None)
    if isinstance(head, LoraLinear):  # a wrapper: the same wrapper around the view
        view = copy.copy(unembed)
        view._modules = dict(unembed._modules)
        view.head = adapter_unembed(head, name)
        return view
    if not isinstance(unembed, LoraLinear):
        return unembed
    if name is None or name not in unembed.lora_A:
        return unembed.base_layer
    return AdapterView(unembed, name)
