"""The transformers + PEFT backend: one frozen base model per base name, one LoRA adapter and one
AdamW per training model.

All adapters of a base live in one PeftModel; a request activates its adapter, so the base weights
are held once however many models train on them. Gradients are computed with autograd.grad and
added to `.grad` only once the whole request has succeeded: a failed request changes nothing.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from tinkerd.base_models import BaseModelSource, resolve_base_model
from tinkerd.loss_functions import get_loss
from tinkerd.types import (
    CreateModel,
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    LoraConfig,
    NotFound,
    OptimStep,
    TinkerdError,
    UserError,
)

log = logging.getLogger(__name__)


def autodetect_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class _Base:
    source: BaseModelSource
    model: nn.Module  # the HF model; wrapped in place by PEFT once it has an adapter
    vocab_size: int
    peft: PeftModel | None = None
    active: str | None = None


@dataclass
class _Adapter:
    base: _Base
    name: str  # the PEFT adapter name
    lora: LoraConfig
    params: list[nn.Parameter]
    optimizer: torch.optim.AdamW
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


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
    targets = lora_target_modules(model, lora)
    if not targets:
        raise UserError("this LoRA config trains no layer of the model (train_attn/mlp/unembed)")
    return PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=targets, bias="none"
    )


class HFBackend:
    """Implements tinkerd.types.Backend with transformers + PEFT on one device."""

    def __init__(self, data_dir: Path, device: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.device = torch.device(device or autodetect_device())
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self._bases: dict[str, _Base] = {}
        self._adapters: dict[str, _Adapter] = {}
        self._names = (f"m{i}" for i in itertools.count())

    # -- models ------------------------------------------------------------------------------

    def _load_base(self, name: str) -> _Base:
        source = resolve_base_model(name, self.data_dir)
        if source.location in self._bases:
            return self._bases[source.location]
        from transformers import AutoModelForCausalLM

        if source.builtin:
            from tinkerd.tiny_model import build_tiny_model

            build_tiny_model(source.location)
        log.info("loading base model %s on %s", source.location, self.device)
        try:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=self.dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load base model {name!r}: {e}") from None
        model.to(self.device).eval().requires_grad_(False)
        vocab = min(
            model.get_input_embeddings().num_embeddings, model.get_output_embeddings().out_features
        )
        base = self._bases[source.location] = _Base(source, model, vocab)
        return base

    def create_model(self, model_id: str, request: CreateModel) -> dict[str, Any]:
        if model_id in self._adapters:
            return {"model_id": model_id}
        base = self._load_base(request.base_model)
        name = next(self._names)
        config = peft_lora_config(base.model, request.lora)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if request.lora.seed is not None:
                torch.manual_seed(request.lora.seed)
            else:  # fork_rng restores the state after, so without this every model starts alike
                torch.seed()
            if base.peft is None:
                base.peft = get_peft_model(base.model, config, adapter_name=name)
            else:
                base.peft.add_adapter(name, config)
        base.peft.eval()
        base.active = None
        params = [p for n, p in base.peft.named_parameters() if f".{name}." in n and "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=0.0)
        self._adapters[model_id] = _Adapter(base, name, request.lora, params, optimizer)
        return {"model_id": model_id}

    def remove_model(self, model_id: str) -> None:
        adapter = self._adapters.pop(model_id, None)
        if adapter is not None and adapter.base.peft is not None:
            adapter.base.peft.delete_adapter(adapter.name)
            adapter.base.active = None

    def _adapter(self, model_id: str) -> _Adapter:
        adapter = self._adapters.get(model_id)
        if adapter is None:
            raise NotFound(f"model {model_id!r} is not loaded on this worker")
        return adapter

    def _activate(self, adapter: _Adapter) -> PeftModel:
        base = adapter.base
        assert base.peft is not None
        if base.active != adapter.name:
            base.peft.set_adapter(adapter.name)
            base.active = adapter.name
        return base.peft

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
        results: list[ForwardBackwardResult | TinkerdError] = []
        for model_id, request in requests:
            try:
                results.append(self._forward_backward(self._adapter(model_id), request))
            except TinkerdError as e:
                results.append(e)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                results.append(UserError("out of memory: send a smaller batch"))
        return results

    def _forward_backward(
        self, adapter: _Adapter, request: ForwardBackward
    ) -> ForwardBackwardResult:
        loss = get_loss(request.loss_fn)
        self._check_vocab(adapter.base, request.datums)
        model = self._activate(adapter)
        input_ids, mask, inputs = self._collate(request.datums, loss.inputs)
        with torch.set_grad_enabled(not request.forward_only):
            padded = not bool(mask.all())
            attention_mask = mask.long() if padded else None
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            logprobs = target_logprobs(logits, inputs["target_tokens"]) * _expand(mask, inputs)
            loss_value, metrics = loss.fn(logprobs, inputs, request.loss_fn_config, mask)
            if not torch.isfinite(loss_value):
                raise UserError(
                    f"{loss.name} loss is not finite ({loss_value.item()}); nothing applied"
                )
            if not request.forward_only:
                grads = torch.autograd.grad(loss_value, adapter.params, allow_unused=True)
                for p, g in zip(adapter.params, grads, strict=True):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad.add_(g)
        lp = logprobs.detach().float().cpu().numpy()
        outputs = [{"logprobs": lp[i, : len(d.tokens)]} for i, d in enumerate(request.datums)]
        return ForwardBackwardResult(outputs, metrics)

    def _check_vocab(self, base: _Base, datums: list[Datum]) -> None:
        for i, d in enumerate(datums):
            targets = d.loss_fn_inputs["target_tokens"]
            for what, ids in (("token", d.tokens), ("target token", targets)):
                if ids.size and int(ids.max()) >= base.vocab_size:
                    raise UserError(
                        f"datum {i}: {what} id {int(ids.max())} is outside the vocabulary "
                        f"(size {base.vocab_size})"
                    )

    def _collate(self, datums: list[Datum], names: tuple[str, ...]):
        """Right-padded (B, T) input ids, (B, T) mask of real positions, and stacked loss inputs."""
        lengths = [len(d.tokens) for d in datums]
        width = max(lengths)
        input_ids = torch.zeros(len(datums), width, dtype=torch.long)
        mask = torch.zeros(len(datums), width, dtype=torch.bool)
        inputs: dict[str, torch.Tensor] = {}
        for name in names:
            first = datums[0].loss_fn_inputs[name]
            trailing = first.shape[1:]
            if any(d.loss_fn_inputs[name].shape[1:] != trailing for d in datums):
                raise UserError(
                    f"{name}: every datum needs the same number of targets per position"
                )
            dtype = torch.long if name == "target_tokens" else torch.float32
            inputs[name] = torch.zeros(len(datums), width, *trailing, dtype=dtype)
        for i, d in enumerate(datums):
            n = lengths[i]
            input_ids[i, :n] = torch.from_numpy(d.tokens)
            mask[i, :n] = True
            for name in names:
                inputs[name][i, :n] = torch.from_numpy(d.loss_fn_inputs[name])
        move = {"device": self.device, "non_blocking": True}
        return input_ids.to(**move), mask.to(**move), {k: v.to(**move) for k, v in inputs.items()}

    def optim_step(self, model_id: str, request: OptimStep) -> dict[str, float]:
        adapter = self._adapter(model_id)
        adam = request.adam
        grads = [p.grad for p in adapter.params if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if adam.grad_clip_norm > 0 and total_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(adapter.params, adam.grad_clip_norm, total_norm)
        grad_norm = float(total_norm) if total_norm is not None else 0.0
        for group in adapter.optimizer.param_groups:
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        adapter.steps += 1
        return {"grad_norm:mean": grad_norm, "learning_rate:mean": adam.learning_rate}


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at the targets: (B, T, V) x (B, T[, K]) -> (B, T[, K]), in fp32."""
    if targets.dim() == 2:  # one target per position: the fused kernel avoids a (B, T, V) copy
        flat = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        return flat.view_as(targets)
    return logits.float().log_softmax(-1).gather(-1, targets)


def _expand(mask: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return mask.unsqueeze(-1) if inputs["target_tokens"].dim() == 3 else mask
