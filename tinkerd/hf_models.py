"""The transformers + PEFT side of the HF backend that holds no state of its own: the device and
dtype, a loaded base model's record, which layers LoRA trains, activation checkpointing, the
sampler's second module tree over the same weights, and the optimizer and clipping each
adapter gets."""

from __future__ import annotations

import copy
import itertools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from tinkerd.base_models import BaseModelSource
from tinkerd.sampling import Engine
from tinkerd.types import LoraConfig, UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def autodetect_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def lora_target_modules(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Full names of the Linear layers that train_attn / train_mlp / train_unembed select.

    The model may already carry adapters: a layer PEFT wrapped counts as the Linear it wraps, and
    the Linear layers inside the wrapper (base_layer, lora_A, lora_B) are never targets.
    """
    targets = []
    wrapper = None
    for name, module in model.named_modules():
        if wrapper is not None and name.startswith(wrapper + "."):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapper, module = name, module.get_base_layer()
        if not isinstance(module, nn.Linear):
            continue
        if name.rsplit(".", 1)[-1] == "lm_head":
            wanted = lora.train_unembed
        elif re.search(r"attn|attention", name):
            wanted = lora.train_attn
        elif re.search(r"mlp|feed_forward|ffn|experts", name):
            wanted = lora.train_mlp
        else:
            wanted = False
        if wanted:
            targets.append(name)
    return targets


def peft_lora_config(model: nn.Module, lora: LoraConfig) -> PeftLoraConfig:
    """PEFT's config of `lora` on the layers of `model` it selects."""
    return lora_config_for(lora_target_modules(model, lora), lora)


def lora_config_for(targets: list[str], lora: LoraConfig) -> PeftLoraConfig:
    """PEFT's config of `lora` on the modules named `targets` (as any backend writes it into
    its checkpoints); a UserError when there is none to train."""
    if not targets:
        raise UserError("this LoRA config trains no layer of the model (train_attn/mlp/unembed)")
    # peft annotates lora_alpha as an int but divides it by r; Tinker's alpha is a float
    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
    )


def sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules and config over the same parameter and buffer tensors: a
    second tree that costs no weight memory, whose adapters, attention setting and patched
    forwards are its own."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)


def base_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """ "float32", "bfloat16" or "float16" if named (a UserError otherwise), else bfloat16 on a GPU
    and float32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype {name!r}: float32, bfloat16 or float16")
    return getattr(torch, name)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, free) bytes of the device's memory: the GPU's, or the host's RAM for the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return 0, 0
    info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines)}
    return info.get("MemTotal", 0), info.get("MemAvailable", 0)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale a model's gradients to at most `max_norm` in total (0: no clipping); the norm
    before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total_norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
    return float(total_norm)


def checkpoint_layers(model: nn.Module) -> int:
    """Recompute each decoder layer's activations in backward rather than keep them
    (non-reentrant `torch.utils.checkpoint`), in eval mode too: transformers' own gradient
    checkpointing acts only in training mode, and tinkerd runs its models in eval mode (no
    dropout). A layer's cache is left out under it, as transformers does: the recompute must
    not append to it a second time. Returns how many layers were wrapped."""
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    wrapped: list[str] = []
    for name, layer in model.named_modules():
        if not isinstance(layer, GradientCheckpointingLayer):
            continue
        if any(name.startswith(outer + ".") for outer in wrapped):
            continue  # inside a layer that is recomputed whole
        forward = layer.forward

        def checkpointed(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
                if key in kwargs:
                    kwargs[key] = None
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed
        wrapped.append(name)
    if not wrapped:
        log.warning("activation checkpointing: %s has no decoder layer to checkpoint", model)
    return len(wrapped)


def new_optimizer(params: list[nn.Parameter]) -> torch.optim.AdamW:
    """AdamW with one fused kernel for all of an adapter's tensors (about 5x faster on CPU);
    the hyper-parameters are set from each optim_step's AdamParams."""
    return torch.optim.AdamW(params, lr=0.0, fused=True)


@dataclass
class LoadedBase:
    """A base model as the HF backend holds it: the training tree (adapters of training
    models) and the sampler's tree over the same weights (sampler adapters)."""

    source: BaseModelSource
    model: PreTrainedModel  # wrapped in place by PEFT once it has an adapter
    vocab_size: int
    peft: PeftModel | None = None
    tokenizer: Any = None  # loaded on first need (stop strings)
    # The sampler's own module tree over the same weight tensors (`sharing_weights`), where
    # sampler adapters live: sampling never touches the training tree, so it can run beside it.
    sampler: nn.Module | None = None
    sampler_peft: PeftModel | None = None
    engine: Engine | None = None  # its sampling engine and KV cache, made on first sample
    retired: set[str] = field(default_factory=set)  # sampler adapters to delete once unused

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.config, getattr(self.model, "generation_config", None)):
            eos = getattr(source, "eos_token_id", None)
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        return ids

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.source.location)
        return self.tokenizer.decode(tokens)
