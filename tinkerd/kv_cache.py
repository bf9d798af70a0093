"""The sampler's KV cache: a preallocated pool of fixed-size blocks per layer, and the attention
that writes and reads it during a packed sampling pass.

A sampling pass is one row of N tokens, as in a packed training pass: first one token for each
sequence that is decoding (its last sampled token, attending to everything it has cached), then
the whole prompt of each request that joins (causal attention on itself). Each sequence owns a
list of blocks (its block table); the samples of one request share the blocks their prompt fills
and each gets its own copy of the partly filled last one. Nothing is padded in the linear layers;
attention pads each group to its longest member and masks the rest.

`cached_attention` is registered with transformers' AttentionInterface and reads what it must do
from the `Plan` of the running pass (a ContextVar), so the model's own attention modules (their
projections, norms and rotary embeddings) run unchanged.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from tinkerd.packing import attention_as

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BLOCK = 16  # tokens per block
CACHED_ATTENTION = "tinkerd_cached"

_PLAN: ContextVar[Plan | None] = ContextVar("sampling_plan", default=None)


class BlockPool:
    """The KV tensors of every layer, handed out a block at a time. Each layer's tensors are
    allocated on its first use (shaped as its keys are) and grown by doubling, up to
    `max_blocks`, when a request needs more blocks than are free: never per token or per step.
    Blocks are reference-counted, so a prompt's blocks are held until the last of its samples
    finishes."""

    def __init__(self, max_blocks: int, device: torch.device, initial_blocks: int = 64) -> None:
        self.max_blocks = max_blocks
        self.num_blocks = min(initial_blocks, max_blocks)
        self.device = device
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._refs = np.zeros(self.num_blocks, dtype=np.int32)

    @property
    def free(self) -> int:
        """Blocks that can be taken, growing the pool if need be."""
        return len(self._free) + self.max_blocks - self.num_blocks

    def reserve(self, n: int) -> bool:
        """Whether `n` blocks can be taken now, growing the pool if need be. Out of device
        memory, the pool stops growing where it is."""
        if n <= len(self._free):
            return True
        if n > self.free:
            return False
        try:
            self._grow(self.num_blocks + n - len(self._free))
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.max_blocks = self.num_blocks
            return False
        return True

    def take(self, n: int) -> list[int]:
        """`n` blocks (reserved first), each referenced once."""
        blocks = [self._free.pop() for _ in range(n)]
        self._refs[blocks] = 1
        return blocks

    def _grow(self, at_least: int) -> None:
        size = min(max(at_least, 2 * self.num_blocks), self.max_blocks)
        for index, kv in list(self.layers.items()):
            grown = []
            for old in kv:
                new = old.new_zeros((size * BLOCK, *old.shape[1:]))
                new[: old.shape[0]] = old
                grown.append(new)
            self.layers[index] = (grown[0], grown[1])
        self._free = list(range(size - 1, self.num_blocks - 1, -1)) + self._free
        self._refs = np.concatenate([self._refs, np.zeros(size - self.num_blocks, np.int32)])
        self.num_blocks = size

    def share(self, blocks: list[int]) -> None:
        self._refs[blocks] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def layer(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of layer `index`, each (num_blocks * BLOCK, Hkv, D); zeros at first, so a masked
        position never holds a NaN that 0 * NaN would spread."""
        kv = self.layers.get(index)
        if kv is None:
            shape = (self.num_blocks * BLOCK, like.shape[1], like.shape[3])
            kv = (
                torch.zeros(shape, dtype=like.dtype, device=self.device),
                torch.zeros(shape, dtype=like.dtype, device=self.device),
            )
            self.layers[index] = kv
        return kv


@dataclass
class Plan:
    """What one sampling pass does in every attention layer (built once per pass).

    The row holds `decode` single tokens, then `prefill` prompts. Tensors live on the device.
    """

    pool: BlockPool
    decode: int  # sequences decoding, the first tokens of the row
    write_tokens: torch.Tensor  # (W,) positions in the row whose K/V go to the cache...
    write_slots: torch.Tensor  # (W,) ...at these token slots of the pool
    tables: torch.Tensor | None = None  # (decode, nb) block tables of the decoding sequences
    lengths: torch.Tensor | None = None  # (decode,) tokens cached per sequence, its own included
    prefill_index: torch.Tensor | None = None  # (P, n) row positions of each prompt, padded
    prefill_lengths: torch.Tensor | None = None  # (P,)
    prefill_valid: torch.Tensor | None = None  # (T,) the real positions of (P * n), in row order
    layers_run: int = 0
    _masks: dict[tuple[str, int | None], torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """(decode, 1, 1, L) True where a decoding token may attend."""
        key = ("decode", window)
        if key not in self._masks:
            assert self.tables is not None and self.lengths is not None
            j = torch.arange(self.tables.shape[1] * BLOCK, device=self.lengths.device)
            last = (self.lengths - 1)[:, None]  # each query's position
            mask = j[None, :] <= last
            if window:
                mask &= last - j[None, :] < window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, window: int | None) -> torch.Tensor:
        """(P, 1, n, n) causal within each prompt, and within its sliding window if any."""
        key = ("prefill", window)
        if key not in self._masks:
            assert self.prefill_index is not None and self.prefill_lengths is not None
            i = torch.arange(self.prefill_index.shape[1], device=self.prefill_index.device)
            mask = (i[:, None] >= i[None, :])[None] & (
                i[None, None, :] < self.prefill_lengths[:, None, None]
            )
            if window:
                mask &= (i[:, None] - i[None, :] < window)[None]
            self._masks[key] = mask[:, None]
        return self._masks[key]


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Masked attention, (B, h, q, D) x (B, h, k, D) -> (B, h, q, D); with a soft-cap (Gemma 2)
    written out, as SDPA has none."""
    if softcap is None:
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, -math.inf).softmax(-1)
    return scores.to(v.dtype) @ v


def cached_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of a sampling pass, (1, H, N, D) -> (1, N, H, D): stores the row's new keys and
    values in the cache, then attends each decoding token to its sequence's cache and each prompt
    to itself."""
    plan = _PLAN.get()
    if plan is None:
        raise RuntimeError("cached_attention runs only inside a sampling pass")
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks are not supported by tinkerd's sampler")
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    plan.layers_run += 1
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    n, heads, dim = q.shape  # (N, H, D); k and v: (N, Hkv, D)
    kv_heads = k.shape[1]
    pool_k, pool_v = plan.pool.layer(cast(int, module.layer_idx), key)
    if plan.write_slots.numel():
        pool_k.index_copy_(0, plan.write_slots, k.index_select(0, plan.write_tokens))
        pool_v.index_copy_(0, plan.write_slots, v.index_select(0, plan.write_tokens))
    outputs = []
    if plan.decode:
        r = plan.decode
        blocks = (plan.pool.num_blocks, BLOCK, kv_heads, dim)
        # (r, nb, BLOCK, Hkv, D) -> (r, Hkv, L, D); a group's query heads become the query
        # length, so the keys are never repeated for grouped-query attention
        kd = pool_k.view(blocks)[plan.tables].view(r, -1, kv_heads, dim).transpose(1, 2)
        vd = pool_v.view(blocks)[plan.tables].view(r, -1, kv_heads, dim).transpose(1, 2)
        qd = q[:r].view(r, kv_heads, heads // kv_heads, dim)
        out = _attend(qd, kd, vd, plan.decode_mask(window), scaling, softcap)
        outputs.append(out.reshape(r, heads, dim))
    if plan.prefill_index is not None:
        assert plan.prefill_valid is not None
        index = plan.prefill_index  # (P, m)
        p, m = index.shape
        qp = q[index].transpose(1, 2)  # (P, H, m, D)
        kp = k[index].transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        vp = v[index].transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        out = _attend(qp, kp, vp, plan.prefill_mask(window), scaling, softcap)
        outputs.append(out.transpose(1, 2).reshape(p * m, heads, dim)[plan.prefill_valid])
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CACHED_ATTENTION, cached_attention)


_register()


def sampling_pass(model: PreTrainedModel, plan: Plan) -> contextlib.AbstractContextManager[None]:
    """Run `model`'s attention through the cache as `plan` says."""
    return attention_as(model, CACHED_ATTENTION, _PLAN, plan)


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK)
