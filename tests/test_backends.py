"""Backends by name (tinkerd.backends), the record each publishes, and two engine options of the
HF backend: activation checkpointing (the same losses and gradients, less memory) and the
optimizer steps of several models in one fused call (each model as if stepped alone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fake_backend import FakeBackend

from tinkerd import cli
from tinkerd.backends import BackendInfo, BackendOptions, make_backend, registered_info
from tinkerd.config import Settings
from tinkerd.hf_backend import HFBackend
from tinkerd.types import (
    AdamParams,
    CreateModel,
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    LoraConfig,
    NotFound,
    OptimStep,
)

pytestmark = pytest.mark.timeout(300)

# -- the registry ------------------------------------------------------------------------------


def test_backends_are_built_by_name_and_describe_themselves(tmp_path: Path) -> None:
    hf = make_backend("hf", BackendOptions(tmp_path, "cpu"))
    assert isinstance(hf, HFBackend)
    info = hf.info()
    assert (info.name, info.device, info.dtype, info.base_models) == ("hf", "cpu", "float32", ())
    assert info.memory_total >= info.memory_free > 0
    fake = make_backend("tests.fake_backend:make", BackendOptions(tmp_path))
    assert type(fake).__name__ == "FakeBackend"  # a backend outside tinkerd, by module path
    with pytest.raises(ValueError, match=r"unknown backend 'nope' \(known: hf"):
        make_backend("nope", BackendOptions(tmp_path))
    with pytest.raises(ValueError, match="could not be imported"):
        make_backend("no_such_module:make", BackendOptions(tmp_path))


def test_the_info_record_survives_a_registration_round_trip() -> None:
    info = BackendInfo("hf", "cuda:0", "bfloat16", ("Qwen/Qwen3-8B",), 80 << 30, 60 << 30, 32768)
    assert registered_info({"name": "w1", "backend": info.to_json()}) == info
    assert registered_info({"name": "w1"}) == BackendInfo("", "", "")  # none published


def test_the_backend_flags_and_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings.load().backend, Settings.load().activation_checkpointing) == ("hf", False)
    monkeypatch.setenv("TINKERD_ACTIVATION_CHECKPOINTING", "1")
    monkeypatch.setenv("TINKERD_BACKEND", "tests.fake_backend:make")
    settings = Settings.load()
    assert (settings.backend, settings.activation_checkpointing) == (
        "tests.fake_backend:make",
        True,
    )
    monkeypatch.setenv("TINKERD_ACTIVATION_CHECKPOINTING", "perhaps")
    with pytest.raises(ValueError, match="not a boolean"):
        Settings.load()


def test_an_unknown_backend_stops_the_command_line_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["worker", "--backend", "nope", "--redis", "redis://127.0.0.1:1/0"])
    assert exited.value.code == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


# -- activation checkpointing -------------------------------------------------------------------


def batch(seed: int = 0) -> ForwardBackward:
    """Two datums of different lengths (so one is padded), cross-entropy with random weights."""
    rng = np.random.default_rng(seed)
    datums = []
    for n in (7, 13):
        inputs = {
            "target_tokens": rng.integers(0, 900, n),
            "weights": rng.uniform(0, 1, n).astype(np.float32),
        }
        datums.append(Datum(rng.integers(0, 900, n), inputs))
    return ForwardBackward(datums, "cross_entropy")


def grads(backend: HFBackend, model_id: str) -> list[torch.Tensor]:
    return [p.grad.clone() for p in backend._adapters[model_id].params]


def test_activation_checkpointing_gives_the_same_losses_and_gradients(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    create = CreateModel(str(tiny_model_dir), LoraConfig(rank=4, seed=3))
    plain = HFBackend(tmp_path / "plain", "cpu")
    checkpointed = HFBackend(tmp_path / "checkpointed", "cpu", activation_checkpointing=True)
    runs: dict[str, int] = {}
    layers = 0
    for name, backend in (("plain", plain), ("checkpointed", checkpointed)):
        backend.create_model("m", create)
        model = next(iter(backend._bases.values())).model
        attention = [m for n, m in model.named_modules() if n.endswith("self_attn")]
        layers = len(attention)
        runs[name] = 0

        def count(*_: object, name: str = name) -> None:
            runs[name] += 1

        for module in attention:
            module.register_forward_hook(count)
        [result] = backend.forward_backward([("m", batch())])
        assert isinstance(result, ForwardBackwardResult)
        backend.optim_step("m", adam(1e-2))  # both models move alike
    assert layers > 0 and runs["plain"] >= layers
    assert runs["checkpointed"] >= runs["plain"] + layers  # each layer ran again in backward
    other = CreateModel(str(tiny_model_dir), LoraConfig(rank=8, seed=4, train_mlp=False))
    for backend in (plain, checkpointed):  # two models in one batch: each row its own adapter
        backend.create_model("other", other)
    requests = [("m", batch(1)), ("other", batch(2))]
    expected, actual = plain.forward_backward(requests), checkpointed.forward_backward(requests)
    for a, b in zip(expected, actual, strict=True):
        assert isinstance(a, ForwardBackwardResult) and isinstance(b, ForwardBackwardResult)
        assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
        for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(x["logprobs"], y["logprobs"], rtol=1e-5, atol=1e-5)
    for model_id in ("m", "other"):
        for x, y in zip(grads(plain, model_id), grads(checkpointed, model_id), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# -- several models' optimizer steps in one call -----------------------------------------------


def adam(lr: float, clip: float = 0.0) -> OptimStep:
    return OptimStep(AdamParams(learning_rate=lr, weight_decay=0.01, grad_clip_norm=clip))


def step_alone(backend: HFBackend, model_id: str, request: OptimStep) -> None:
    """The reference: one model's own AdamW, stepped by itself (the backend before fusing)."""
    adapter, hp = backend._adapters[model_id], request.adam
    grads = [p.grad for p in adapter.params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hp.grad_clip_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(adapter.params, hp.grad_clip_norm, norm)
    for group in adapter.optimizer.param_groups:
        group.update(lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                     weight_decay=hp.weight_decay)  # fmt: skip
    adapter.optimizer.step()
    adapter.optimizer.zero_grad(set_to_none=True)


def test_optimizer_steps_of_several_models_in_one_fused_call_match_stepping_each_alone(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = {"m1": adam(1e-2, clip=0.05), "m2": adam(1e-2), "m3": adam(3e-3)}
    fused, alone = HFBackend(tmp_path / "fused", "cpu"), HFBackend(tmp_path / "alone", "cpu")
    for backend in (fused, alone):
        for i, model_id in enumerate(steps):
            rank = 4 if model_id != "m2" else 8  # different ranks share the call
            backend.create_model(model_id, CreateModel(str(tiny_model_dir), LoraConfig(rank, i)))
    calls = []
    kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    for step in range(3):
        for backend in (fused, alone):
            backend.forward_backward([(m, batch(step + i)) for i, m in enumerate(steps)])
        calls.clear()
        results = fused.optim_steps(list(steps.items()))
        assert len(calls) == 2  # m1 and m2 share their hyper-parameters: one call for both
        for model_id, request in steps.items():
            step_alone(alone, model_id, request)
        assert [r["learning_rate:mean"] for r in results] == [1e-2, 1e-2, 3e-3]
        assert results[0]["grad_norm:mean"] > 0.05  # m1 was clipped
    for model_id in steps:
        actual, expected = fused.adapter_state(model_id), alone.adapter_state(model_id)
        assert actual.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-6)
        state = fused._adapters[model_id].optimizer.state_dict()
        assert state["state"][0]["step"] == 3 and fused._adapters[model_id].steps == 3
        assert all(p.grad is None for p in fused._adapters[model_id].params)
    [missing, stepped] = fused.optim_steps([("nope", adam(1e-2)), ("m2", adam(1e-2))])
    assert isinstance(missing, NotFound) and stepped["learning_rate:mean"] == 1e-2


def test_the_fake_backends_default_optim_steps_steps_each_model() -> None:
    fake = FakeBackend()
    fake.create_model("a", CreateModel("fake/base", LoraConfig()))
    [stepped, missing] = fake.optim_steps([("a", adam(0.1)), ("b", adam(0.1))])
    assert stepped == {"grad_norm:mean": 0.0, "learning_rate:mean": 0.1}
    assert isinstance(missing, NotFound)
