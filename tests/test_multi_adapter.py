"""Several models on one base in one forward/backward: each equals training it alone (losses,
gradients, weights after optim_step), with different ranks and target layers, and a bad request
fails alone, changing nothing of its model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinkerd.hf_backend import HFBackend
from tinkerd.types import AdamParams, CreateModel, Datum, LoraConfig, OptimStep
from tinkerd.wire.decode import make_forward_backward

MODELS = {  # different ranks and target layers
    "a": LoraConfig(rank=2, seed=1),
    "b": LoraConfig(rank=8, seed=2, train_mlp=False),
    "c": LoraConfig(rank=4, seed=3, train_attn=False, train_unembed=False),
    "d": LoraConfig(rank=4, seed=4, train_unembed=False),
}
STEP = OptimStep(AdamParams(learning_rate=0.05, eps=1e-3))


def new_backend(path, model_dir) -> HFBackend:
    backend = HFBackend(path, "cpu")
    for model_id, lora in MODELS.items():
        backend.create_model(model_id, CreateModel(str(model_dir), lora))
    return backend


@pytest.fixture
def backends(tmp_path, tiny_model_dir) -> tuple[HFBackend, HFBackend]:
    """(together, alone): the same models, initialised alike."""
    return (
        new_backend(tmp_path / "together", tiny_model_dir),
        new_backend(tmp_path / "alone", tiny_model_dir),
    )


def batch(seed: int, lengths, loss: str = "cross_entropy", forward_only: bool = False):
    rng = np.random.default_rng(seed)
    datums = []
    for n in lengths:
        targets = rng.integers(0, 900, n)
        inputs = {"target_tokens": targets}
        if loss == "cross_entropy":
            inputs["weights"] = rng.uniform(-1, 1, n).astype(np.float32)
        else:
            inputs["logprobs"] = rng.uniform(-8, -6, n).astype(np.float32)
            inputs["advantages"] = rng.uniform(-1, 1, n).astype(np.float32)
        datums.append(Datum(rng.integers(0, 900, n), inputs))
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5} if loss == "ppo" else {}
    return make_forward_backward(datums, loss, config, forward_only)


def requests(seed: int):
    """A mixed cycle: several models, several requests of one model, a forward only, RL losses."""
    return [
        ("a", batch(seed, [5, 40, 3])),
        ("b", batch(seed + 1, [17], "ppo")),
        ("c", batch(seed + 2, [9, 9, 30], "importance_sampling")),
        ("a", batch(seed + 3, [12])),
        ("d", batch(seed + 4, [2, 25])),
        ("b", batch(seed + 5, [6, 11], forward_only=True)),
    ]


def grads(backend: HFBackend, model_id: str) -> list[torch.Tensor | None]:
    return [p.grad for p in backend._adapters[model_id].params]


def assert_same(together: HFBackend, alone: HFBackend, model_id: str) -> None:
    for p, q in zip(
        together._adapters[model_id].params, alone._adapters[model_id].params, strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        if q.grad is None:
            assert p.grad is None
        else:
            scale = float(q.grad.abs().max())
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5 * scale + 1e-12)


def assert_results_equal(got, want) -> None:
    assert got.metrics.keys() == want.metrics.keys()
    for key, value in want.metrics.items():
        assert got.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for g, w in zip(got.loss_fn_outputs, want.loss_fn_outputs, strict=True):
        for key in ("logprobs", "elementwise_loss"):
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-5)


def test_models_in_one_pass_equal_each_alone(backends):
    together, alone = backends
    passes = []
    body = together._adapters["a"].base.model.model
    hook = body.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        for seed in (10, 20):  # the second round with trained (non-zero) adapters
            cycle = requests(seed)
            passes.clear()
            joint = together.forward_backward(cycle)
            assert len(passes) == 1 + (seed == 10) * 2  # one pass (the first checks the head)
            for i, (model_id, request) in enumerate(cycle):
                (result,) = alone.forward_backward([(model_id, request)])
                assert_results_equal(joint[i], result)
            for model_id in MODELS:
                assert_same(together, alone, model_id)
                together.optim_step(model_id, STEP)
                alone.optim_step(model_id, STEP)
                assert_same(together, alone, model_id)
    finally:
        hook.remove()
    moved = together._adapters["c"].params[-1]
    assert moved.abs().max() > 1e-3  # it trained


def test_a_bad_request_fails_alone(backends):
    together, alone = backends
    out_of_vocab = batch(1, [4, 8])
    out_of_vocab.datums[1].tokens[2] = 5000
    not_finite = batch(2, [7], "importance_sampling")
    not_finite.datums[0].loss_fn_inputs["logprobs"][:] = -1e4  # ratio exp(1e4): inf
    bad_clip = batch(3, [5], "ppo")
    bad_clip.loss_fn_config.update(clip_low_threshold=2.0, clip_high_threshold=1.0)
    good_a, good_d = batch(4, [6, 30]), batch(5, [3, 3, 3])
    cycle = [
        ("a", good_a),
        ("b", out_of_vocab),
        ("c", not_finite),
        ("d", bad_clip),
        ("d", good_d),
        ("nobody", batch(6, [2])),
    ]
    before = {m: [p.detach().clone() for p in together._adapters[m].params] for m in MODELS}
    results = together.forward_backward(cycle)
    assert "outside the vocabulary" in str(results[1])
    assert "not finite" in str(results[2])
    assert "clip_low_threshold" in str(results[3])
    assert "not loaded" in str(results[5])
    for model_id in ("b", "c"):  # nothing of a failed request: no gradient, same weights
        assert all(g is None for g in grads(together, model_id))
    for model_id, request in [("a", good_a), ("d", good_d)]:
        (result,) = alone.forward_backward([(model_id, request)])
        assert_results_equal(results[0 if model_id == "a" else 4], result)
        assert_same(together, alone, model_id)
    for model_id in MODELS:
        for p, q in zip(together._adapters[model_id].params, before[model_id], strict=True):
            assert torch.equal(p, q)
