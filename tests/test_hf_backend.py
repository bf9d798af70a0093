"""The HF + PEFT backend, driven through the official SDK over HTTP, against an independent
reference: plain transformers + PEFT + torch.optim.AdamW written here, on the same tiny model.

The server seeds torch right before it creates an adapter and fixes lora_alpha at 32, so the same
seed gives a reference PeftModel with the very same initial adapter weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import (
    ALL_TARGETS,
    ATTN,
    MLP,
    RANK,
    SEED,
    lora_params,
    reference_logprobs,
    reference_model,
)
from tinker import types

# -- helpers -------------------------------------------------------------------------------------


def make_seqs(rng: np.random.Generator, lengths, k: int | None = None):
    """Random (tokens, targets) pairs; targets are (T,) or (T, k)."""
    shape = (lambda n: (n,)) if k is None else (lambda n: (n, k))
    return [(rng.integers(0, 900, n), rng.integers(0, 900, shape(n))) for n in lengths]


def make_datum(tokens, **inputs) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints([int(t) for t in tokens]),
        loss_fn_inputs={k: types.TensorData.from_numpy(np.asarray(v)) for k, v in inputs.items()},
    )


def ce_data(seqs, weights):
    return [
        make_datum(x, target_tokens=y, weights=w) for (x, y), w in zip(seqs, weights, strict=True)
    ]


def ce_loss(logprobs, weights) -> torch.Tensor:
    return sum(-(lp * torch.from_numpy(w)).sum() for lp, w in zip(logprobs, weights, strict=True))


def output_logprobs(result) -> list[torch.Tensor]:
    return [torch.from_numpy(o["logprobs"].to_numpy()) for o in result.loss_fn_outputs]


def assert_states_close(actual, expected, rtol=0.0, atol=0.0):
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name], value.detach(), rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


def new_client(service_client, model_dir, **lora):
    lora = {"rank": RANK, "seed": SEED, **lora}
    return service_client.create_lora_training_client(base_model=str(model_dir), **lora).result()


# -- forward -------------------------------------------------------------------------------------


def test_initial_adapter_and_forward_logprobs_match_reference(
    server, training_client, tiny_model_dir
):
    ref = reference_model(tiny_model_dir)
    assert_states_close(server.backend.adapter_state(training_client.model_id), lora_params(ref))

    rng = np.random.default_rng(0)
    seqs = make_seqs(rng, [5, 12, 1, 8])  # different lengths: the server right-pads
    weights = [rng.uniform(-1, 1, len(x)).astype(np.float32) for x, _ in seqs]
    result = training_client.forward(ce_data(seqs, weights), "cross_entropy").result()

    with torch.no_grad():
        expected = reference_logprobs(ref, seqs)
    got = output_logprobs(result)
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert result.metrics["loss:sum"] == pytest.approx(ce_loss(expected, weights).item(), rel=1e-5)


def test_forward_with_several_targets_per_position(training_client, tiny_model_dir):
    rng = np.random.default_rng(1)
    seqs = make_seqs(rng, [4, 7], k=3)
    weights = [rng.uniform(-1, 1, y.shape).astype(np.float32) for _, y in seqs]
    result = training_client.forward(ce_data(seqs, weights), "cross_entropy").result()

    with torch.no_grad():
        expected = reference_logprobs(reference_model(tiny_model_dir), seqs)
    got = output_logprobs(result)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert result.metrics["loss:sum"] == pytest.approx(ce_loss(expected, weights).item(), rel=1e-5)


# -- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_adam_steps_match_local_adamw(server, training_client, tiny_model_dir, clip):
    adam = types.AdamParams(
        learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-5, weight_decay=0.5, grad_clip_norm=clip
    )
    rng = np.random.default_rng(2)
    seqs = make_seqs(rng, [6, 10, 3])
    weights = [rng.uniform(-0.5, 1.0, len(x)).astype(np.float32) for x, _ in seqs]
    data = ce_data(seqs, weights)

    ref = reference_model(tiny_model_dir)
    params = lora_params(ref)
    opt = torch.optim.AdamW(params.values(), lr=1e-2, betas=(0.8, 0.9), eps=1e-5, weight_decay=0.5)
    for _ in range(3):
        fwdbwd = training_client.forward_backward(data, "cross_entropy")
        step = training_client.optim_step(adam)

        opt.zero_grad()
        loss = ce_loss(reference_logprobs(ref, seqs), weights)
        loss.backward()
        grads = [p.grad for p in params.values()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if clip > 0:
            assert norm > 2 * clip  # so that clipping really happens
            torch.nn.utils.clip_grad_norm_(params.values(), clip)
        opt.step()

        assert fwdbwd.result().metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5)
        assert step.result().metrics["grad_norm:mean"] == pytest.approx(norm.item(), rel=1e-4)

    state = server.backend.adapter_state(training_client.model_id)
    # Adam divides by sqrt(v): a few near-zero gradients amplify float noise to ~1e-6.
    assert_states_close(state, params, rtol=1e-5, atol=1e-5)
    b = "base_model.model.lm_head.lora_B.weight"
    assert state[b].abs().max() > 1e-2  # it trained: lr * steps, far above the tolerance

    # The trained adapter is applied in forward (its B is no longer zero).
    result = training_client.forward(data, "cross_entropy").result()
    with torch.no_grad():
        expected = reference_logprobs(ref, seqs)
    for g, e in zip(output_logprobs(result), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_gradients_accumulate_until_optim_step(
    server, service_client, training_client, tiny_model_dir
):
    """fwd/bwd(part 1), fwd/bwd(part 2), step == fwd/bwd(all), step; forward adds nothing.

    eps is large so that Adam's first step is nearly linear in the gradient (with a tiny eps it
    is lr * sign(grad), blind to the gradient's size). The two models' calls interleave, so this
    also checks that adapters on one base keep their gradients apart.
    """
    adam = types.AdamParams(learning_rate=0.1, eps=1.0)
    split, whole = training_client, new_client(service_client, tiny_model_dir)
    initial = server.backend.adapter_state(split.model_id)
    assert_states_close(server.backend.adapter_state(whole.model_id), initial)

    rng = np.random.default_rng(3)
    seqs = make_seqs(rng, [7, 3, 9, 5])
    weights = [rng.uniform(-1, 1, len(x)).astype(np.float32) for x, _ in seqs]
    data = ce_data(seqs, weights)

    split.forward_backward(data[:2], "cross_entropy").result()
    whole.forward_backward(data, "cross_entropy").result()
    split.forward(data[2:], "cross_entropy").result()  # forward only: no gradient
    split.forward_backward(data[2:], "cross_entropy").result()
    split.optim_step(adam).result()
    whole.optim_step(adam).result()

    got = server.backend.adapter_state(split.model_id)
    want = server.backend.adapter_state(whole.model_id)
    assert_states_close(got, want, rtol=1e-5, atol=1e-7)
    moved = max((want[k] - initial[k]).abs().max().item() for k in want)
    assert moved > 1e-3


def test_forward_only_and_optim_step_without_gradients_change_nothing(server, training_client):
    before = server.backend.adapter_state(training_client.model_id)
    rng = np.random.default_rng(4)
    seqs = make_seqs(rng, [4, 6])
    data = ce_data(seqs, [np.ones(len(x), np.float32) for x, _ in seqs])
    training_client.forward(data, "cross_entropy").result()
    metrics = training_client.optim_step(types.AdamParams(learning_rate=0.5)).result().metrics
    assert metrics["grad_norm:mean"] == 0.0
    assert_states_close(server.backend.adapter_state(training_client.model_id), before)


# -- LoRA options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "excluded"),
    [("train_mlp", MLP), ("train_attn", ATTN), ("train_unembed", ["lm_head"])],
)
def test_lora_options_choose_the_adapted_layers(
    server, service_client, tiny_model_dir, option, excluded
):
    client = new_client(service_client, tiny_model_dir, rank=4, seed=3, **{option: False})
    state = server.backend.adapter_state(client.model_id)
    targets = [t for t in ALL_TARGETS if t not in excluded]
    assert_states_close(state, lora_params(reference_model(tiny_model_dir, 4, 3, targets)))
    layers = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state}
    assert layers == set(targets)


def test_seed_decides_the_initial_adapter(server, service_client, tiny_model_dir):
    def state(seed):
        client = new_client(service_client, tiny_model_dir, seed=seed)
        return server.backend.adapter_state(client.model_id)

    one, one_again, two = state(1), state(1), state(2)
    assert_states_close(one_again, one)
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert not torch.allclose(one[a], two[a])
    assert all(not v.any() for k, v in one.items() if ".lora_B." in k)  # B starts at zero

    first, second = state(None), state(None)  # no seed: random, so two models differ
    assert not torch.allclose(first[a], second[a])


def test_lora_targets_are_the_same_on_a_wrapped_model(tiny_model_dir):
    """A second adapter on a base that already has one targets the same layers."""
    from tinkerd.hf_models import lora_target_modules, peft_lora_config
    from tinkerd.types import LoraConfig, UserError

    model = reference_model(tiny_model_dir).base_model.model  # wrapped in place by PEFT
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for lora in (LoraConfig(), LoraConfig(train_attn=False), LoraConfig(train_unembed=False)):
        assert lora_target_modules(model, lora) == lora_target_modules(plain, lora)
    names = lora_target_modules(plain, LoraConfig())
    assert len(names) == 2 * (len(ATTN) + len(MLP)) + 1
    assert {n.rsplit(".", 1)[-1] for n in names} == set(ALL_TARGETS)
    nothing = LoraConfig(train_mlp=False, train_attn=False, train_unembed=False)
    with pytest.raises(UserError, match="trains no layer"):
        peft_lora_config(plain, nothing)


def test_a_handoff_checkpoint_carries_the_model_mid_step(tmp_path, tiny_model_dir) -> None:
    """What a stopping worker saves and the next one re-creates: weights, AdamW state and the
    gradients accumulated since the last step, so the step finishes as if nothing moved."""
    from tinkerd.hf_backend import HFBackend
    from tinkerd.storage import CheckpointPath, CheckpointStore
    from tinkerd.types import AdamParams, CreateModel, Datum, LoraConfig, OptimStep, SaveWeights
    from tinkerd.wire.decode import make_forward_backward

    backend = HFBackend(tmp_path, "cpu", store=CheckpointStore(tmp_path / "runs"))
    tokens = np.array([5, 17, 42, 99, 7], dtype=np.int64)
    inputs = {"target_tokens": np.roll(tokens, -1), "weights": np.ones(5, dtype=np.float32)}
    fwdbwd = make_forward_backward([Datum(tokens, inputs)], "cross_entropy", {}, False)
    step = OptimStep(AdamParams(learning_rate=0.05))
    backend.create_model("a", CreateModel(str(tiny_model_dir), LoraConfig(rank=4, seed=1)))
    backend.forward_backward([("a", fwdbwd)])
    backend.optim_step("a", step)
    backend.forward_backward([("a", fwdbwd)])  # gradients waiting for the next step
    path = str(CheckpointPath("a", "weights", "handoff-test"))
    backend.save_weights("a", SaveWeights(path, "weights", with_gradients=True))

    create = backend.creation("a")
    assert create.lora == LoraConfig(rank=4, seed=1)
    moved = CreateModel(create.base_model, create.lora, path, True, with_gradients=True)
    backend.create_model("b", moved)
    for p, q in zip(backend._adapters["a"].params, backend._adapters["b"].params, strict=True):
        assert p.grad is not None and torch.equal(p.grad, q.grad) and torch.equal(p, q)
    for model_id in ("a", "b"):
        backend.optim_step(model_id, step)
    assert_states_close(backend.adapter_state("b"), backend.adapter_state("a"))


def test_sampling_goes_on_after_the_sampler_trees_adapters_are_deleted(
    tmp_path, tiny_model_dir
) -> None:
    """Removing a model deletes its snapshots from the sampler tree, the active one included;
    the next samples (another model's snapshot, the base) still run (PEFT's get_base_model()
    would raise KeyError on the deleted active adapter)."""
    from tinkerd.hf_backend import HFBackend
    from tinkerd.types import CreateModel, LoraConfig, Sample, SamplerWeights, SamplingParams
    from tinkerd.types import SaveWeights as Save

    backend = HFBackend(tmp_path, "cpu")
    base = str(tiny_model_dir)
    params = SamplingParams(max_tokens=3, seed=0)
    prompt = np.array([5, 17, 42])

    def sample(snapshot: str | None):
        [result] = backend.sample(
            [Sample(SamplerWeights(base, snapshot_id=snapshot), prompt, 1, params)]
        )
        assert not isinstance(result, Exception), result
        return result

    backend.create_model("a", CreateModel(base, LoraConfig(rank=4, seed=1)))
    backend.save_weights("a", Save(None, "sampler_weights", snapshot_id="s-a"))
    sample("s-a")
    backend.remove_model("a")  # the sampler tree's active adapter goes with it
    backend.create_model("b", CreateModel(base, LoraConfig(rank=4, seed=2, train_mlp=False)))
    backend.save_weights("b", Save(None, "sampler_weights", snapshot_id="s-b"))
    sample("s-b")
    sample(None)
