"""Chunked logprobs (tinkerd/logprobs.py) against the whole-logits computation a user would write:
log_softmax(model(...).logits.float()) gathered at the targets, with its gradients; and the
memory they take at Qwen's vocabulary.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.reference import reference_model
from tinkerd.logprobs import prompt_logprobs, split_causal_lm, target_logprobs

pytestmark = pytest.mark.timeout(120)


def whole_logits_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    lp = logits.float().log_softmax(-1)
    if targets.dim() == logits.dim() - 1:
        return lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp.gather(-1, targets)


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """A PEFT model with LoRA on every layer and on lm_head, its B matrices made non-zero so
    that the LoRA lm_head changes the logits and its gradients are not trivially related."""
    model = reference_model(tiny_model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.mark.parametrize("k", [0, 3])  # 0: one target per position, (B, T); else (B, T, K)
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_logprobs_and_gradients_equal_the_whole_logits(lora_model, k, chunk):
    gen = torch.Generator().manual_seed(k)
    vocab = lora_model.get_output_embeddings().out_features
    input_ids = torch.randint(0, vocab, (2, 11), generator=gen)
    targets = torch.randint(0, vocab, (2, 11, k) if k else (2, 11), generator=gen)
    weights = torch.randn(targets.shape, generator=gen)
    params = [p for n, p in lora_model.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n, p in lora_model.named_parameters() if p.requires_grad)

    want = whole_logits_logprobs(lora_model(input_ids=input_ids).logits, targets)
    want_grads = torch.autograd.grad((want * weights).sum(), params)

    body, unembed = split_causal_lm(lora_model)
    hidden = body(input_ids=input_ids).last_hidden_state
    got = target_logprobs(hidden, unembed, targets, chunk_tokens=chunk)
    got_grads = torch.autograd.grad((got * weights).sum(), params)

    assert got.dtype == torch.float32 and got.shape == targets.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_gradient_with_respect_to_hidden_and_duplicate_targets():
    """Targets repeated within a position add up, as gather's backward does."""
    gen = torch.Generator().manual_seed(1)
    head = nn.Linear(8, 50, bias=True)
    hidden = torch.randn(7, 8, generator=gen, requires_grad=True)
    targets = torch.tensor([[3, 3, 9]] * 7)
    grad = torch.randn(7, 3, generator=gen)
    want = whole_logits_logprobs(head(hidden), targets)
    want_grads = torch.autograd.grad(want, [hidden, head.weight, head.bias], grad)
    got = target_logprobs(hidden, head, targets, chunk_tokens=3)
    got_grads = torch.autograd.grad(got, [hidden, head.weight, head.bias], grad)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_prompt_logprobs_and_topk_equal_the_whole_logits():
    gen = torch.Generator().manual_seed(2)
    head = nn.Linear(8, 40, bias=False)
    hidden = torch.randn(9, 8, generator=gen)
    targets = torch.randint(0, 40, (9,), generator=gen)
    with torch.no_grad():
        lp = head(hidden).log_softmax(-1)
    chosen, values, ids = prompt_logprobs(hidden, head, targets, k=4, chunk_tokens=2)
    torch.testing.assert_close(chosen, lp.gather(-1, targets[:, None]).squeeze(-1))
    want_values, want_ids = lp.topk(4, dim=-1)
    torch.testing.assert_close(values, want_values)
    assert torch.equal(ids, want_ids)
    assert prompt_logprobs(hidden, head, targets, k=100)[1].shape == (9, 40)  # k capped at V


def test_a_family_whose_logits_are_not_the_unembedding_is_refused(tiny_model_dir):
    """Logits scaled after lm_head (as some families do) would give other numbers: refused."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits / 3.0
        return out

    model.forward = scaled
    with pytest.raises(ValueError, match="not supported"):
        split_causal_lm(model)


FAMILIES = {  # what each does to lm_head's output, at values that change the logits
    "Gemma2": {"final_logit_softcapping": 0.05},
    "Cohere": {"logit_scale": 3.0},
    "Granite": {"logits_scaling": 0.2},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_that_scale_or_cap_their_logits_are_matched(family):
    """Soft-capping and logit scales come after the unembedding, as in the family's forward."""
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, eos_token_id=0,
        **FAMILIES[family],
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    input_ids, targets = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 7, 63]])
    body, unembed = split_causal_lm(model)
    got = target_logprobs(body(input_ids=input_ids).last_hidden_state, unembed, targets)
    want = whole_logits_logprobs(model(input_ids=input_ids).logits, targets)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    lm_head = model.get_output_embeddings()
    plain = whole_logits_logprobs(lm_head(body(input_ids=input_ids).last_hidden_state), targets)
    assert not torch.allclose(plain, want, atol=1e-3)  # the family's step matters here


# -- memory -------------------------------------------------------------------------------------

QWEN_VOCAB, TOKENS, HIDDEN = 151_936, 2 * 1_536, 64

MEASURE = """
import json, sys, torch
from torch import nn
from tinkerd.logprobs import peak_memory_growth, target_logprobs
torch.set_num_threads(2)
vocab, n, h, whole = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "whole"
gen = torch.Generator().manual_seed(0)
head = nn.Linear(h, vocab, bias=False).requires_grad_(False)  # a frozen lm_head, as by default
hidden = torch.randn(n, h, generator=gen, requires_grad=True)
targets = torch.randint(0, vocab, (n,), generator=gen)

def step(n):
    if whole:  # what the backend did before: the whole logits, their fp32 copy, log_softmax
        lp = head(hidden[:n]).float().log_softmax(-1).gather(-1, targets[:n, None]).squeeze(-1)
    else:
        lp = target_logprobs(hidden[:n], head, targets[:n])
    lp.sum().backward()
    hidden.grad = None

step(8)  # warm up: one-off allocations (threads, kernels) are not the logits' memory
print(json.dumps({"growth": peak_memory_growth(lambda: step(n)), "logits": n * vocab * 4}))
"""


def measure(vocab: int, tokens: int, hidden: int, whole: bool = False) -> dict[str, int]:
    """Peak memory growth of one forward + backward, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(vocab), str(tokens), str(hidden),
         "whole" if whole else "chunked"],
        capture_output=True, text=True, check=True, timeout=100,
    )  # fmt: skip
    return json.loads(out.stdout.splitlines()[-1])


def test_peak_memory_stays_under_a_quarter_of_the_fp32_logits():
    """2 x 1,536 tokens at Qwen's vocabulary: the fp32 logits alone are 1.74 GiB."""
    figures = measure(QWEN_VOCAB, TOKENS, HIDDEN)
    ratio = figures["growth"] / figures["logits"]
    print(f"peak growth {figures['growth'] / 2**20:.0f} MiB = {ratio:.3f} x the fp32 logits")
    assert ratio < 0.25


def test_the_memory_measure_sees_whole_logits():
    """The measure is not blind: the whole-logits computation, on a smaller batch, grows the
    peak by more than its logits."""
    figures = measure(QWEN_VOCAB, 256, HIDDEN, whole=True)
    assert figures["growth"] > figures["logits"]


def test_prompt_logprobs_of_a_sample_never_project_the_whole_prompt(lora_model, monkeypatch):
    """The sampler's prefill projects at most one chunk of positions onto the vocabulary at a
    time, and its prompt logprobs and top-k equal the whole logits'."""
    import numpy as np

    import tinkerd.logprobs
    from tinkerd.sampling import generate
    from tinkerd.types import Sample, SamplerWeights, SamplingParams

    vocab = lora_model.get_output_embeddings().out_features
    monkeypatch.setattr(tinkerd.logprobs, "CHUNK_BYTES", 4 * vocab * 8)  # 8 positions a chunk
    prompt = np.random.default_rng(0).integers(0, vocab, 40)
    rows_projected: list[int] = []
    hook = lora_model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows_projected.append(out.shape[:-1].numel())
    )
    sample = Sample(
        SamplerWeights("tiny"), prompt, 2, SamplingParams(max_tokens=2), True, 5
    )  # fmt: skip
    try:
        (result,) = generate(
            lora_model, [sample], context_length=2048, eos_token_ids=set(),
            decode=str, device=torch.device("cpu"),
        )  # fmt: skip
    finally:
        hook.remove()
    assert max(rows_projected) <= 8
    with torch.no_grad():
        lp = lora_model(input_ids=torch.as_tensor(prompt)[None]).logits[0, :-1].log_softmax(-1)
    want = lp.gather(-1, torch.as_tensor(prompt[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.from_numpy(result.prompt_logprobs[1:]), want)
    values, ids = result.topk_prompt_logprobs[1][1:], result.topk_prompt_logprobs[0][1:]
    torch.testing.assert_close(torch.from_numpy(values), lp.topk(5, dim=-1).values)
    assert np.array_equal(ids, lp.topk(5, dim=-1).indices.numpy())


@pytest.mark.parametrize("forward_only", [False, True])
def test_a_training_pass_never_projects_more_than_a_chunk(
    tmp_path, tiny_model_dir, monkeypatch, forward_only
):
    """Through the backend (LoRA on lm_head too), forward and backward project at most one chunk
    of positions onto the vocabulary at a time, and the logprobs are the whole logits'."""
    import numpy as np

    import tinkerd.logprobs
    from tinkerd.hf_backend import HFBackend
    from tinkerd.types import CreateModel, Datum, ForwardBackward, LoraConfig

    backend = HFBackend(tmp_path, "cpu")
    backend.create_model("a", CreateModel(str(tiny_model_dir), LoraConfig(rank=4, seed=1)))
    lm_head = backend._adapters["a"].base.model.get_output_embeddings()
    vocab = lm_head.out_features
    monkeypatch.setattr(tinkerd.logprobs, "CHUNK_BYTES", 4 * vocab * 8)  # 8 positions a chunk
    rng = np.random.default_rng(0)
    datums = []
    for n in (30, 17):
        tokens = rng.integers(0, vocab, n)
        datums.append(Datum(tokens, {"target_tokens": np.roll(tokens, -1), "weights": np.ones(n)}))
    rows_projected: list[int] = []
    hook = lm_head.base_layer.register_forward_hook(
        lambda module, args, out: rows_projected.append(out.shape[:-1].numel())
    )
    try:
        request = ForwardBackward(datums, "cross_entropy", forward_only=forward_only)
        (result,) = backend.forward_backward([("a", request)])
    finally:
        hook.remove()
    assert max(rows_projected) <= 8
    assert sum(p.grad is not None for p in backend._adapters["a"].params) == (
        0 if forward_only else len(backend._adapters["a"].params)
    )
    with torch.no_grad():
        for d, out in zip(datums, result.loss_fn_outputs, strict=True):
            logits = backend._adapters["a"].base.peft(input_ids=torch.as_tensor(d.tokens)[None])
            want = whole_logits_logprobs(
                logits.logits[0], torch.as_tensor(d.loss_fn_inputs["target_tokens"])
            )
            torch.testing.assert_close(torch.from_numpy(out["logprobs"]), want, rtol=0, atol=1e-5)
