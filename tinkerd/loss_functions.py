"""The named losses of `forward_backward`, as a registry.

Each loss takes the target-token logprobs of the training model, `logprobs` (B, T) or (B, T, K)
for K targets per position, the datums' loss inputs stacked and padded the same way, its config,
and `mask` (B, T), true at real (not padding) positions. It returns the per-token loss, shaped like
`logprobs`, and metrics named `name:reduction`. Calling the `Loss` sums the per-token loss into the
scalar loss, a SUM over datums and tokens as in Tinker (never a mean), so the `elementwise_loss`
each datum gets back always adds up to the loss that was trained on. Every loss reports `loss:sum`
and `num_tokens:sum` (real positions), cross_entropy `num_weighted_tokens:sum` (positions with a
non-zero weight), the RL losses `advantage:mean`, and `ratio:mean` and `clip_fraction:mean` where
they have them, over the positions with a non-zero advantage.

This module uses only tensor methods, so the API can import the registry without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tinkerd.types import UserError

if TYPE_CHECKING:
    from torch import Tensor

# (logprobs, inputs, config, mask) -> (per-token loss shaped like logprobs, metrics)
LossFn = Callable[
    ["Tensor", dict[str, "Tensor"], dict[str, float], "Tensor"], tuple["Tensor", dict]
]


@dataclass(frozen=True)
class Loss:
    name: str
    fn: LossFn
    inputs: tuple[str, ...]
    config: dict[str, float]  # accepted loss_fn_config keys and their defaults
    # inputs a datum may leave out, and the value each target then gets (as other servers do)
    input_defaults: dict[str, float] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return (self.fn.__doc__ or "").strip()

    def __call__(
        self, logprobs: Tensor, inputs: dict[str, Tensor], config: dict, mask: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """(loss, elementwise, metrics): the scalar loss is the sum of `elementwise`, the
        per-token loss shaped like `logprobs`, which is 0 at padding."""
        elementwise, metrics = self.fn(logprobs, inputs, config, mask)
        elementwise = elementwise.masked_fill(~_expand(mask, elementwise), 0.0)
        loss = elementwise.sum()
        return loss, elementwise, {"loss:sum": loss.item(), **metrics}

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return tuple(k for k in self.inputs if k not in self.input_defaults)


def cross_entropy(logprobs: Tensor, inputs: dict[str, Tensor], config: dict, mask: Tensor):
    """Supervised learning: loss = sum_i -logprob_i * weight_i.

    Weights may be fractional or negative (forward_backward_custom sends -dLoss/dlogprob as
    weights), so this is also the backward pass of any client-side loss. A datum without
    weights weighs every target 1.0.
    """
    weighted = (inputs["weights"] != 0) & _expand(mask, logprobs)
    return -logprobs * inputs["weights"], {
        "num_tokens:sum": float(mask.sum().item()),
        "num_weighted_tokens:sum": float(weighted.sum().item()),
    }


def _ratio(logprobs: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    return (logprobs - inputs["logprobs"]).exp()


def importance_sampling(logprobs: Tensor, inputs: dict[str, Tensor], config: dict, mask: Tensor):
    """Off-policy REINFORCE: loss = -sum_i ratio_i * advantage_i, ratio = p_theta / q_sampler.

    `logprobs` in the inputs are the sampler's logprobs q of the target tokens.
    """
    ratio = _ratio(logprobs, inputs)
    return -ratio * inputs["advantages"], _rl_metrics(inputs, mask, ratio)


def ppo(logprobs: Tensor, inputs: dict[str, Tensor], config: dict, mask: Tensor):
    """Clipped PPO: loss = -sum_i min(ratio_i * A_i, clip(ratio_i, low, high) * A_i).

    Config: clip_low_threshold (default 0.8) and clip_high_threshold (default 1.2), as ratios.
    """
    ratio = _ratio(logprobs, inputs)
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    _check_clip(low, high)
    adv = inputs["advantages"]
    clipped = ratio.clamp(low, high)
    elementwise = -(ratio * adv).minimum(clipped * adv)
    return elementwise, _rl_metrics(inputs, mask, ratio, low, high)


def cispo(logprobs: Tensor, inputs: dict[str, Tensor], config: dict, mask: Tensor):
    """CISPO: loss = -sum_i stopgrad(clip(ratio_i, low, high)) * A_i * logprob_i.

    The clipped ratio weights a plain policy gradient, so clipped tokens still get gradient.
    Config: clip_low_threshold (default 0.0) and clip_high_threshold (default 4.0).
    """
    ratio = _ratio(logprobs, inputs)
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    _check_clip(low, high)
    weight = ratio.detach().clamp(low, high)
    elementwise = -weight * inputs["advantages"] * logprobs
    return elementwise, _rl_metrics(inputs, mask, ratio, low, high)


def dro(logprobs: Tensor, inputs: dict[str, Tensor], config: dict, mask: Tensor):
    """DRO: loss = -sum_i (logprob_i * A_i - beta/2 * (logprob_i - q_i)^2).

    An off-policy objective with a quadratic penalty on the log ratio. Config: beta (default 0.1).
    """
    penalty = (logprobs - inputs["logprobs"]) ** 2
    elementwise = -(logprobs * inputs["advantages"] - 0.5 * config["beta"] * penalty)
    return elementwise, _rl_metrics(inputs, mask)


def _check_clip(low: float, high: float) -> None:
    if not 0.0 <= low <= high:
        raise UserError(f"need 0 <= clip_low_threshold <= clip_high_threshold, got {low}, {high}")


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    """The (B, T) mask shaped like `like`, (B, T) or (B, T, K)."""
    return mask.unsqueeze(-1).expand_as(like) if like.dim() == 3 else mask


def _rl_metrics(
    inputs: dict[str, Tensor],
    mask: Tensor,
    ratio: Tensor | None = None,
    low: float | None = None,
    high: float | None = None,
) -> dict[str, float]:
    """`num_tokens:sum` (real positions) and, over the positions the loss acts on, the mean
    advantage, ratio and fraction of ratios outside [low, high]. The loss acts on the real
    positions with a non-zero advantage (a prompt's positions carry advantage 0 and a
    placeholder sampler logprob, whose ratio means nothing); on all real ones if there are none.
    """
    advantages = inputs["advantages"]
    real = _expand(mask, advantages)
    acting = real & (advantages != 0)
    if not bool(acting.any()):
        acting = real
    n = max(int(acting.sum().item()), 1)
    metrics = {
        "num_tokens:sum": float(mask.sum().item()),
        "advantage:mean": advantages[acting].sum().item() / n,
    }
    if ratio is not None:
        ratio = ratio.detach()[acting]
        metrics["ratio:mean"] = ratio.sum().item() / n
        if low is not None and high is not None:
            metrics["clip_fraction:mean"] = ((ratio < low) | (ratio > high)).sum().item() / n
    return metrics


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")

LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in [
        Loss("cross_entropy", cross_entropy, ("target_tokens", "weights"), {}, {"weights": 1.0}),
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
