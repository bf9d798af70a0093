"""What every backend does with a forward_backward request around its own pass: check it before
the pass, turn its loss inputs into tensors, and turn its target logprobs into its loss and its
per-datum results. A backend computes only the logprobs its own way."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tinkerd.loss_functions import Loss
from tinkerd.types import (
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    OptimStep,
    TinkerdError,
    UserError,
)


def step_alone(
    optim_steps: Callable[[list[tuple[str, OptimStep]]], list[dict[str, float] | TinkerdError]],
    model_id: str,
    request: OptimStep,
) -> dict[str, float]:
    """One model's optimizer step through a backend's batched `optim_steps`; its error raised."""
    [result] = optim_steps([(model_id, request)])
    if isinstance(result, TinkerdError):
        raise result
    return result


def check_request(request: ForwardBackward, loss: Loss, vocab_size: int) -> None:
    """What would fail in the pass, checked before it so that a request fails alone (a loss
    that rejects its config fails its request alone in the pass, before the backward)."""
    datums = request.datums
    if not datums or any(len(d.tokens) == 0 for d in datums):
        raise UserError("every datum needs at least one token")
    for i, d in enumerate(datums):
        targets = d.loss_fn_inputs["target_tokens"]
        for what, ids in (("token", d.tokens), ("target token", targets)):
            if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
                bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
                raise UserError(
                    f"datum {i}: {what} id {bad} is outside the vocabulary (size {vocab_size})"
                )
    for name in loss.inputs:
        trailing = datums[0].loss_fn_inputs[name].shape[1:]
        if any(d.loss_fn_inputs[name].shape[1:] != trailing for d in datums):
            raise UserError(f"{name}: every datum needs the same number of targets per position")


def loss_inputs(
    datums: list[Datum], names: tuple[str, ...], device: torch.device
) -> dict[str, torch.Tensor]:
    """The request's loss inputs, its datums concatenated: (1, n) or (1, n, K) each."""
    inputs = {}
    for name in names:
        value = np.concatenate([d.loss_fn_inputs[name] for d in datums])
        dtype = torch.long if name == "target_tokens" else torch.float32
        inputs[name] = torch.from_numpy(value).to(dtype)[None]
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def request_loss(
    request: ForwardBackward,
    loss: Loss,
    logprobs: torch.Tensor,
    inputs: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, ForwardBackwardResult]:
    """The request's loss (a UserError if it is not finite) and its per-datum outputs, from the
    (1, n[, K]) logprobs of its datums' targets, concatenated."""
    mask = torch.ones(logprobs.shape[:2], dtype=torch.bool, device=logprobs.device)
    value, elementwise, metrics = loss(logprobs, inputs, request.loss_fn_config, mask)
    if not torch.isfinite(value):
        raise UserError(f"{loss.name} loss is not finite ({value.item()}); nothing applied")
    lp = logprobs[0].detach().float().cpu().numpy()
    el = elementwise[0].detach().float().cpu().numpy()
    outputs, start = [], 0
    for d in request.datums:  # each shaped like the datum's target_tokens
        n = len(d.tokens)
        outputs.append(
            {"logprobs": lp[start : start + n], "elementwise_loss": el[start : start + n]}
        )
        start += n
    return value, ForwardBackwardResult(outputs, metrics)
