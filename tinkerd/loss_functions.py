"""The named losses of `forward_backward`, as a registry.

Each loss takes the target-token logprobs of the training model, `logprobs` (B, T) or (B, T, K)
for K targets per position, the datums' loss inputs stacked and padded the same way, its config,
and `mask` (B, T), true at real (not padding) positions. It returns a scalar loss, which is a SUM
over datums and tokens as in Tinker (never a mean), and metrics named `name:reduction`.

This module uses only tensor methods, so the API can import the registry without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tinkerd.types import UserError

if TYPE_CHECKING:
    from torch import Tensor

LossFn = Callable[
    ["Tensor", dict[str, "Tensor"], dict[str, float], "Tensor"], tuple["Tensor", dict]
]


@dataclass(frozen=True)
class Loss:
    name: str
    fn: LossFn
    inputs: tuple[str, ...]
    config: dict[str, float]  # accepted loss_fn_config keys and their defaults

    @property
    def description(self) -> str:
        return (self.fn.__doc__ or "").strip()


def cross_entropy(logprobs: Tensor, inputs: dict[str, Tensor], config: dict, mask: Tensor):
    """Supervised learning: loss = sum_i -logprob_i * weight_i.

    Weights may be fractional or negative (forward_backward_custom sends -dLoss/dlogprob as
    weights), so this is also the backward pass of any client-side loss.
    """
    loss = -(logprobs * inputs["weights"]).sum()
    return loss, {"loss:sum": loss.item()}


def _ratio(logprobs: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    return (logprobs - inputs["logprobs"]).exp()


def importance_sampling(logprobs: Tensor, inputs: dict[str, Tensor], config: dict, mask: Tensor):
    """Off-policy REINFORCE: loss = -sum_i ratio_i * advantage_i, ratio = p_theta / q_sampler.

    `logprobs` in the inputs are the sampler's logprobs q of the target tokens.
    """
    ratio = _ratio(logprobs, inputs)
    loss = -(ratio * inputs["advantages"]).sum()
    return loss, {"loss:sum": loss.item(), **_ratio_metrics(ratio, mask)}


def ppo(logprobs: Tensor, inputs: dict[str, Tensor], config: dict, mask: Tensor):
    """Clipped PPO: loss = -sum_i min(ratio_i * A_i, clip(ratio_i, low, high) * A_i).

    Config: clip_low_threshold (default 0.8) and clip_high_threshold (default 1.2), as ratios.
    """
    ratio = _ratio(logprobs, inputs)
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    _check_clip(low, high)
    adv = inputs["advantages"]
    clipped = ratio.clamp(low, high)
    loss = -(ratio * adv).minimum(clipped * adv).sum()
    return loss, {"loss:sum": loss.item(), **_ratio_metrics(ratio, mask, low, high)}


def cispo(logprobs: Tensor, inputs: dict[str, Tensor], config: dict, mask: Tensor):
    """CISPO: loss = -sum_i stopgrad(clip(ratio_i, low, high)) * A_i * logprob_i.

    The clipped ratio weights a plain policy gradient, so clipped tokens still get gradient.
    Config: clip_low_threshold (default 0.0) and clip_high_threshold (default 4.0).
    """
    ratio = _ratio(logprobs, inputs)
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    _check_clip(low, high)
    weight = ratio.detach().clamp(low, high)
    loss = -(weight * inputs["advantages"] * logprobs).sum()
    return loss, {"loss:sum": loss.item(), **_ratio_metrics(ratio, mask, low, high)}


def dro(logprobs: Tensor, inputs: dict[str, Tensor], config: dict, mask: Tensor):
    """DRO: loss = -sum_i (logprob_i * A_i - beta/2 * (logprob_i - q_i)^2).

    An off-policy objective with a quadratic penalty on the log ratio. Config: beta (default 0.1).
    """
    penalty = (logprobs - inputs["logprobs"]) ** 2
    loss = -(logprobs * inputs["advantages"] - 0.5 * config["beta"] * penalty).sum()
    return loss, {"loss:sum": loss.item()}


def _check_clip(low: float, high: float) -> None:
    if not 0.0 <= low <= high:
        raise UserError(f"need 0 <= clip_low_threshold <= clip_high_threshold, got {low}, {high}")


def _ratio_metrics(
    ratio: Tensor, mask: Tensor, low: float | None = None, high: float | None = None
):
    """Mean ratio, and the fraction of tokens outside the clip range, over real tokens."""
    ratio = ratio.detach()
    if ratio.dim() == 3:
        mask = mask.unsqueeze(-1).expand_as(ratio)
    n = max(int(mask.sum().item()), 1)
    metrics = {"ratio:mean": (ratio * mask).sum().item() / n}
    if low is not None and high is not None:
        clipped = ((ratio < low) | (ratio > high)) & mask
        metrics["clip_fraction:mean"] = clipped.sum().item() / n
    return metrics


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")

LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in [
        Loss("cross_entropy", cross_entropy, ("target_tokens", "weights"), {}),
        Loss("importance_sampling", importance_sampling, _RL_INPUTS, {}),
        Loss("ppo", ppo, _RL_INPUTS, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        Loss("cispo", cispo, _RL_INPUTS, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
        Loss("dro", dro, _RL_INPUTS, {"beta": 0.1}),
    ]
}


def get_loss(name: str) -> Loss:
    """The registered loss `name`, or a UserError naming the ones that exist."""
    try:
        return LOSSES[name]
    except KeyError:
        raise UserError(f"unknown loss_fn {name!r}; known: {', '.join(LOSSES)}") from None


def resolve_config(loss: Loss, config: dict[str, float]) -> dict[str, float]:
    """The loss's defaults overridden by `config`; unknown keys are a UserError."""
    unknown = set(config) - set(loss.config)
    if unknown:
        known = ", ".join(loss.config) or "none"
        raise UserError(
            f"loss_fn_config keys {sorted(unknown)} unknown to {loss.name} (takes {known})"
        )
    return {**loss.config, **config}
