"""Packed passes: datums of different lengths in one row, no padding, against plain transformers +
PEFT run one unpadded sequence at a time, and a right-padded batch for losses and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import lora_params, reference_logprobs, reference_model

from tinkerd.hf_backend import HFBackend
from tinkerd.types import CreateModel, Datum, LoraConfig
from tinkerd.wire.decode import make_forward_backward

RANK, SEED = 4, 5
LENGTHS = [1, 7, 33, 2, 64, 19]


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_model_dir) -> HFBackend:
    backend = HFBackend(tmp_path_factory.mktemp("packing"), "cpu")
    backend.create_model("m", CreateModel(str(tiny_model_dir), LoraConfig(rank=RANK, seed=SEED)))
    with torch.no_grad(), torch.random.fork_rng():  # B starts at zero: give the adapter effect
        torch.manual_seed(1)
        for p in backend._adapters["m"].params:
            p.add_(torch.randn_like(p) * 0.05)
    return backend


@pytest.fixture(scope="module")
def reference(backend, tiny_model_dir):
    """transformers + PEFT with the backend's adapter weights."""
    ref = reference_model(tiny_model_dir, rank=RANK, seed=SEED)
    state = backend.adapter_state("m")
    with torch.no_grad():
        for name, p in lora_params(ref).items():
            p.copy_(state[name])
    return ref


def datums(lengths, k: int | None = None, seed: int = 0) -> tuple[list[Datum], list]:
    rng = np.random.default_rng(seed)
    out, seqs = [], []
    for n in lengths:
        tokens = rng.integers(0, 900, n)
        targets = rng.integers(0, 900, n if k is None else (n, k))
        weights = rng.uniform(-1, 1, targets.shape).astype(np.float32)
        out.append(Datum(tokens, {"target_tokens": targets, "weights": weights}))
        seqs.append((tokens, targets))
    return out, seqs


def grads_by_name(backend: HFBackend, model_id: str) -> dict[str, torch.Tensor]:
    adapter = backend._adapters[model_id]
    names = [
        n.replace(f".{adapter.name}.", ".")
        for n, _ in adapter.base.peft.named_parameters()
        if f".{adapter.name}." in n and "lora_" in n
    ]
    return {n: p.grad.clone() for n, p in zip(names, adapter.params, strict=True)}


def test_one_row_without_padding(backend):
    """The pass is one decoder call on one row of sum(lengths) tokens, positions restarting."""
    batch, _ = datums(LENGTHS)
    request = make_forward_backward(batch, "cross_entropy", {}, True)
    backend.forward_backward([("m", request)])  # the first pass also checks the model's head
    seen = []
    body = backend._adapters["m"].base.model.model
    hook = body.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        backend.forward_backward([("m", request)])
    finally:
        hook.remove()
    assert len(seen) == 1
    assert seen[0]["input_ids"].shape == (1, sum(LENGTHS))
    assert seen[0]["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]


@pytest.mark.parametrize("k", [None, 3])
def test_packed_logprobs_equal_each_datum_alone(backend, reference, k):
    batch, seqs = datums(LENGTHS, k, seed=1)
    (result,) = backend.forward_backward(
        [("m", make_forward_backward(batch, "cross_entropy", {}, True))]
    )
    with torch.no_grad():
        expected = reference_logprobs(reference, seqs)
    for i, (out, want) in enumerate(zip(result.loss_fn_outputs, expected, strict=True)):
        got = torch.from_numpy(out["logprobs"])
        assert got.shape == want.shape, i
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"datum {i}")


def padded_loss(ref, batch: list[Datum]) -> torch.Tensor:
    """cross_entropy of a right-padded batch with an attention mask, as a padded loop runs it."""
    width = max(len(d.tokens) for d in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    targets = torch.zeros(len(batch), width, dtype=torch.long)
    weights = torch.zeros(len(batch), width)
    for i, d in enumerate(batch):
        n = len(d.tokens)
        ids[i, :n], mask[i, :n] = torch.from_numpy(d.tokens), 1
        targets[i, :n] = torch.from_numpy(d.loss_fn_inputs["target_tokens"])
        weights[i, :n] = torch.from_numpy(d.loss_fn_inputs["weights"])
    logits = ref(input_ids=ids, attention_mask=mask).logits
    logprobs = logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    return -(logprobs * weights * mask).sum()


def test_mixed_lengths_loss_and_gradients_equal_the_padded_batch(backend, reference):
    batch, _ = datums(LENGTHS, seed=2)
    adapter = backend._adapters["m"]
    for p in adapter.params:
        p.grad = None
    (result,) = backend.forward_backward(
        [("m", make_forward_backward(batch, "cross_entropy", {}, False))]
    )
    params = lora_params(reference)
    for p in params.values():
        p.grad = None
    loss = padded_loss(reference, batch)
    loss.backward()
    assert result.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5)
    got = grads_by_name(backend, "m")
    assert got.keys() == params.keys()
    for name, p in params.items():  # float32 sums in another order: 1e-5 of the largest
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    for p in adapter.params:
        p.grad = None


def test_attention_never_crosses_sequences():
    """The packed attention of a row equals causal attention of each segment alone, and a
    change in one segment changes nothing of another."""
    from tinkerd import packing

    torch.manual_seed(0)
    lengths = [3, 1, 6]
    q, k, v = (torch.randn(1, 2, sum(lengths), 4) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    token = packing._SEGMENTS.set(packing.bounds(lengths))
    try:
        out, _ = packing.packed_attention(module, q, k, v, None)
        k2 = k.clone()
        k2[:, :, :3] += torch.randn(1, 2, 3, 4)  # the first sequence's keys only
        out2, _ = packing.packed_attention(module, q, k2, v, None)
    finally:
        packing._SEGMENTS.reset(token)
    for s, e in packing.bounds(lengths):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True
        ).transpose(1, 2)
        torch.testing.assert_close(out[:, s:e], want)
    torch.testing.assert_close(out2[:, 3:], out[:, 3:], rtol=0, atol=0)
    assert not torch.allclose(out2[:, :3], out[:, :3])
