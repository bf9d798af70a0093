"""The named losses: unit tests of tinkerd.loss_functions on small tensors, then each loss through
the SDK and the server against an independent torch computation (transformers + PEFT + AdamW),
and forward_backward_custom against the equivalent built-in loss.

The reference formulas below are written from the docstrings, not taken from tinkerd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import RANK, SEED, lora_params, reference_logprobs, reference_model
from tinker import types

from tinkerd.loss_functions import LOSSES, get_loss, resolve_config
from tinkerd.types import UserError

# A large eps makes Adam's first step lr * g / (|g| + eps), nearly linear in the gradient; with
# the default tiny eps it would be lr * sign(g) and blind to the gradient's size.
ADAM = types.AdamParams(learning_rate=0.1, eps=1.0)


def reference_elementwise(name: str, lp, inputs: dict, config: dict) -> torch.Tensor:
    """Tinker's losses, token by token: each one's contribution to the loss."""
    if name == "cross_entropy":
        return -lp * inputs["weights"]
    q, adv = inputs["logprobs"], inputs["advantages"]
    ratio = torch.exp(lp - q)
    if name == "importance_sampling":
        return -ratio * adv
    if name == "ppo":
        clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
        return -torch.minimum(ratio * adv, clipped * adv)
    if name == "cispo":
        clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
        return -clipped.detach() * adv * lp
    if name == "dro":
        return -(lp * adv - config["beta"] / 2 * (lp - q) ** 2)
    raise AssertionError(name)


def reference_loss(name: str, lp, inputs: dict, config: dict) -> torch.Tensor:
    """Tinker's losses, each a sum over tokens (never a mean)."""
    return reference_elementwise(name, lp, inputs, config).sum()


# -- unit tests on small tensors -----------------------------------------------------------------


def test_unknown_loss_names_the_known_ones():
    with pytest.raises(UserError) as e:
        get_loss("cross_entropyy")
    assert "cross_entropyy" in e.value.message
    for name in ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro"):
        assert name in e.value.message
        assert get_loss(name).name == name
    assert e.value.status == 400


def test_resolve_config_fills_defaults_and_rejects_unknown_keys():
    ppo = get_loss("ppo")
    assert resolve_config(ppo, {}) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert resolve_config(ppo, {"clip_high_threshold": 1.5}) == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.5,
    }
    assert resolve_config(get_loss("dro"), {}) == {"beta": 0.1}
    with pytest.raises(UserError, match="clip_low"):
        resolve_config(ppo, {"clip_low": 0.5})
    with pytest.raises(UserError, match="beta"):
        resolve_config(get_loss("cross_entropy"), {"beta": 0.5})


def small_batch(k: int | None = None, seed: int = 0):
    """(B=2, T=4[, K]) logprobs and inputs; the second row's last position is padding."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4) if k is None else (2, 4, k)
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    full = mask if k is None else mask.unsqueeze(-1).expand(shape)
    lp = -torch.rand(shape, generator=g) * 3 * full
    inputs = {
        "target_tokens": torch.randint(0, 10, shape, generator=g) * full,
        "weights": (torch.rand(shape, generator=g) * 2 - 1) * full,
        "logprobs": (lp + torch.rand(shape, generator=g) - 0.5) * full,
        "advantages": torch.randn(shape, generator=g) * full,
    }
    return lp, inputs, mask


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("k", [None, 3])
def test_loss_value_gradient_and_metrics_match_formula(name, k):
    loss = get_loss(name)
    config = resolve_config(
        loss, {"clip_low_threshold": 0.9} if "clip_low_threshold" in loss.config else {}
    )
    lp, inputs, mask = small_batch(k)
    lp_tinkerd = lp.clone().requires_grad_(True)
    value, elementwise, metrics = loss(lp_tinkerd, inputs, config, mask)
    (grad,) = torch.autograd.grad(value, lp_tinkerd)

    lp_ref = lp.clone().requires_grad_(True)
    expected = reference_loss(name, lp_ref, inputs, config)
    (expected_grad,) = torch.autograd.grad(expected, lp_ref)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert expected_grad.abs().sum() > 0
    # the per-token loss: shaped like the targets, the reference's token by token, 0 at padding
    assert elementwise.shape == lp.shape
    torch.testing.assert_close(elementwise, reference_elementwise(name, lp, inputs, config))
    assert not elementwise[1, 3].any()
    torch.testing.assert_close(elementwise.sum(), value)

    assert metrics["loss:sum"] == pytest.approx(expected.item(), rel=1e-6)
    for key, v in metrics.items():
        assert key.count(":") == 1, key
        assert isinstance(v, float)
    if name in ("importance_sampling", "ppo", "cispo"):
        real = mask if k is None else mask.unsqueeze(-1).expand_as(lp)
        ratio = torch.exp(lp - inputs["logprobs"])[real]  # padding excluded
        assert metrics["ratio:mean"] == pytest.approx(ratio.mean().item(), rel=1e-6)
        if name != "importance_sampling":
            lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
            outside = ((ratio < lo) | (ratio > hi)).float().mean().item()
            assert metrics["clip_fraction:mean"] == pytest.approx(outside)


def test_cross_entropy_with_several_targets_per_position():
    lp, inputs, mask = small_batch(k=2)
    lp.requires_grad_(True)
    value, _, _ = get_loss("cross_entropy")(lp, inputs, {}, mask)
    manual = sum(
        -lp[b, t, j] * inputs["weights"][b, t, j]
        for b in range(2)
        for t in range(4)
        for j in range(2)
    )
    torch.testing.assert_close(value, manual)
    value.backward()
    torch.testing.assert_close(lp.grad, -inputs["weights"])


def test_elementwise_loss_by_hand():
    """Two tokens, numbers worked out on paper: cross_entropy's is -logprob * weight, and
    importance_sampling's -exp(logprob - q) * advantage."""
    lp = torch.tensor([[-0.5, -2.0]])
    mask = torch.tensor([[True, True]])
    inputs = {"target_tokens": torch.tensor([[1, 2]]), "weights": torch.tensor([[1.0, 0.25]])}
    loss, elementwise, _ = get_loss("cross_entropy")(lp, inputs, {}, mask)
    torch.testing.assert_close(elementwise, torch.tensor([[0.5, 0.5]]))
    assert loss.item() == pytest.approx(1.0)

    inputs = {
        "target_tokens": torch.tensor([[1, 2]]),
        "logprobs": torch.tensor([[-0.5, -2.0 - float(np.log(2.0))]]),  # ratios 1 and 2
        "advantages": torch.tensor([[3.0, -1.0]]),
    }
    loss, elementwise, _ = get_loss("importance_sampling")(lp, inputs, {}, mask)
    torch.testing.assert_close(elementwise, torch.tensor([[-3.0, 2.0]]))
    assert loss.item() == pytest.approx(-1.0)


@pytest.mark.parametrize("name", ["ppo", "cispo"])
def test_clip_thresholds_must_be_ordered(name):
    lp, inputs, mask = small_batch()
    with pytest.raises(UserError, match="clip_low_threshold"):
        get_loss(name)(lp, inputs, {"clip_low_threshold": 1.2, "clip_high_threshold": 0.8}, mask)


# -- through the server --------------------------------------------------------------------------


def make_datum(tokens, inputs: dict[str, np.ndarray]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints([int(t) for t in tokens]),
        loss_fn_inputs={k: types.TensorData.from_numpy(v) for k, v in inputs.items()},
    )


def rl_batch(model_dir, seed: int):
    """Sequences of different lengths, with per-token loss inputs for every loss.

    The sampler logprobs are the model's own plus noise, so ratios spread around 1 and some fall
    outside the clip range.
    """
    rng = np.random.default_rng(seed)
    seqs = [(rng.integers(0, 900, n), rng.integers(0, 900, n)) for n in (6, 9, 4)]
    with torch.no_grad():
        own = reference_logprobs(reference_model(model_dir), seqs)
    inputs = []
    for (x, y), lp in zip(seqs, own, strict=True):
        n = len(x)
        inputs.append(
            {
                "target_tokens": y,
                "weights": rng.uniform(-1, 1, n).astype(np.float32),  # fractional and negative
                "logprobs": (lp.numpy() + rng.uniform(-0.4, 0.4, n)).astype(np.float32),
                "advantages": rng.normal(size=n).astype(np.float32),
            }
        )
    return seqs, inputs


def loss_data(name: str, seqs, inputs) -> list[types.Datum]:
    keys = get_loss(name).inputs
    return [make_datum(x, {k: d[k] for k in keys}) for (x, _), d in zip(seqs, inputs, strict=True)]


def assert_same_update(after, expected_after, before):
    """Compare weight changes, to a tolerance well under their size."""
    assert after.keys() == expected_after.keys()
    scale = max((expected_after[k] - before[k]).abs().max().item() for k in before)
    assert scale > 1e-3  # the step moved the weights
    for k, v in expected_after.items():
        torch.testing.assert_close(
            after[k] - before[k],
            v.detach() - before[k],
            rtol=1e-4,
            atol=1e-5 * scale,
            msg=lambda m, k=k: f"{k}: {m}",
        )


LOSS_CASES = [
    ("cross_entropy", {}),
    ("importance_sampling", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("dro", {"beta": 0.5}),
]


@pytest.mark.parametrize(("name", "config"), LOSS_CASES)
def test_loss_through_server_matches_reference(
    server, training_client, tiny_model_dir, name, config
):
    seqs, inputs = rl_batch(tiny_model_dir, seed=len(name))
    before = server.backend.adapter_state(training_client.model_id)
    result = training_client.forward_backward(loss_data(name, seqs, inputs), name, config).result()
    training_client.optim_step(ADAM).result()

    ref = reference_model(tiny_model_dir)
    params = lora_params(ref)
    lps = reference_logprobs(ref, seqs)
    tensors = [{k: torch.from_numpy(v) for k, v in d.items()} for d in inputs]
    loss = sum(reference_loss(name, lp, t, config) for lp, t in zip(lps, tensors, strict=True))
    loss.backward()
    opt = torch.optim.AdamW(
        params.values(),
        lr=ADAM.learning_rate,
        betas=(ADAM.beta1, ADAM.beta2),
        eps=ADAM.eps,
        weight_decay=ADAM.weight_decay,
    )
    opt.step()

    assert result.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-5)
    for out, lp, t in zip(result.loss_fn_outputs, lps, tensors, strict=True):
        got = torch.from_numpy(out["logprobs"].to_numpy())
        torch.testing.assert_close(got, lp.detach(), rtol=1e-5, atol=1e-5)
        # beside logprobs, each target's contribution to the loss
        assert out["elementwise_loss"].shape == list(t["target_tokens"].shape)
        torch.testing.assert_close(
            torch.from_numpy(out["elementwise_loss"].to_numpy()),
            reference_elementwise(name, lp.detach(), t, config),
            rtol=1e-5,
            atol=1e-5,
        )
    if name in ("importance_sampling", "ppo", "cispo"):
        lp_all = torch.cat(lps).detach()
        ratio = torch.exp(lp_all - torch.cat([t["logprobs"] for t in tensors]))
        assert result.metrics["ratio:mean"] == pytest.approx(ratio.mean().item(), rel=1e-5)
        if config:
            lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
            outside = (ratio < lo) | (ratio > hi)
            assert 0 < outside.float().mean() < 1  # both branches of the clip are exercised
            assert result.metrics["clip_fraction:mean"] == pytest.approx(outside.float().mean())
    assert_same_update(server.backend.adapter_state(training_client.model_id), params, before)


@pytest.mark.parametrize("k", [None, 2])
def test_cross_entropy_weights_default_to_one(
    server, service_client, training_client, tiny_model_dir, k
):
    """Datums without `weights` (as scripts written for other servers send them) train exactly
    as with weights 1.0 on every target, also with K targets per position."""
    seqs, _ = rl_batch(tiny_model_dir, seed=11)
    if k is not None:  # (T, K) targets: the next token and the one after it
        seqs = [(x, np.stack([y, np.roll(y, -1)], axis=1)) for x, y in seqs]
    ones = [{"target_tokens": y, "weights": np.ones(y.shape, np.float32)} for _, y in seqs]
    bare = [{"target_tokens": y} for _, y in seqs]
    other = service_client.create_lora_training_client(
        base_model=str(tiny_model_dir), rank=RANK, seed=SEED
    ).result()
    before = server.backend.adapter_state(training_client.model_id)
    data = [make_datum(x, d) for (x, _), d in zip(seqs, ones, strict=True)]
    want = training_client.forward_backward(data, "cross_entropy").result()
    training_client.optim_step(ADAM).result()
    data = [make_datum(x, d) for (x, _), d in zip(seqs, bare, strict=True)]
    got = other.forward_backward(data, "cross_entropy").result()
    other.optim_step(ADAM).result()

    assert got.metrics == want.metrics
    assert got.metrics["num_weighted_tokens:sum"] == sum(y.size for _, y in seqs)
    for g, w, (_, y) in zip(got.loss_fn_outputs, want.loss_fn_outputs, seqs, strict=True):
        assert g["elementwise_loss"].shape == list(y.shape)
        np.testing.assert_array_equal(
            g["elementwise_loss"].to_numpy(), w["elementwise_loss"].to_numpy()
        )
        # cross_entropy's per-token loss with weight 1: -logprob
        np.testing.assert_allclose(
            g["elementwise_loss"].to_numpy(), -g["logprobs"].to_numpy(), rtol=1e-6
        )
    assert_same_update(
        server.backend.adapter_state(other.model_id),
        server.backend.adapter_state(training_client.model_id),
        before,
    )


def custom_cross_entropy(data, logprobs_list):
    loss = sum(
        -(lp * d.loss_fn_inputs["weights"].to_torch()).sum()
        for d, lp in zip(data, logprobs_list, strict=True)
    )
    return loss, {}


def custom_importance_sampling(data, logprobs_list):
    loss = 0.0
    for d, lp in zip(data, logprobs_list, strict=True):
        q, adv = d.loss_fn_inputs["logprobs"].to_torch(), d.loss_fn_inputs["advantages"].to_torch()
        loss = loss - (torch.exp(lp - q) * adv).sum()
    return loss, {}


@pytest.mark.parametrize(
    ("name", "custom"),
    [("cross_entropy", custom_cross_entropy), ("importance_sampling", custom_importance_sampling)],
)
def test_forward_backward_custom_matches_builtin(
    server, service_client, training_client, tiny_model_dir, name, custom
):
    builtin = training_client
    other = service_client.create_lora_training_client(
        base_model=str(tiny_model_dir), rank=RANK, seed=SEED
    ).result()
    before = server.backend.adapter_state(builtin.model_id)
    seqs, inputs = rl_batch(tiny_model_dir, seed=7)
    data = loss_data(name, seqs, inputs)

    want = builtin.forward_backward(data, name).result()
    builtin.optim_step(ADAM).result()
    got = other.forward_backward_custom(data, custom).result()
    other.optim_step(ADAM).result()

    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
    assert "surrogate_loss:sum" in got.metrics
    assert_same_update(
        server.backend.adapter_state(other.model_id),
        server.backend.adapter_state(builtin.model_id),
        before,
    )
