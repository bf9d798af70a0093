"""What the sampler computes, through the official SDK over HTTP, against an independent reference:
plain transformers + PEFT loading the sampler checkpoint the server wrote, one unpadded forward
pass per sequence, no KV cache.

Every SamplingParams field (max_tokens, temperature, top_k, top_p, seed, stop as strings and as
token ids, the implicit EOS), stop_reason, num_samples, per-token logprobs, prompt logprobs, top-k
prompt logprobs and compute_logprobs; at temperature 1 the sampler agrees with the trainer.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tinkerd.storage import CheckpointPath

pytestmark = pytest.mark.timeout(120)

WAIT = 60
VOCAB = 909  # the tiny model's vocabulary (tinkerd/tiny_model.py)
EOS = 0  # its <|endoftext|>
PROMPT = [5, 17, 42, 99, 300, 7]
LONG_PROMPT = [101, 202, 303, 404, 505, 606, 707, 808, 9, 10, 11, 12, 13]
TRAIN = [[5, 17, 42, 99, 300, 7, 64, 12], [9, 8, 7, 6, 5, 4, 3]]
ATOL = 1e-4


# -- the independent reference -------------------------------------------------------------------


@torch.no_grad()
def ref_logits(model, tokens: list[int]) -> torch.Tensor:
    """(T, V) float32 logits of one unpadded sequence."""
    return model(input_ids=torch.tensor([tokens])).logits[0].float()


def ref_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n argmax tokens, one full forward pass per token (no cache, no stop)."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(ref_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt) :]


def ref_token_logprobs(model, prompt, generated, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) of each generated token, given the tokens before it."""
    logits = ref_logits(model, [*prompt, *generated])[len(prompt) - 1 : -1]
    lp = (logits / temperature).log_softmax(-1)
    return lp.gather(-1, torch.tensor(generated).view(-1, 1)).view(-1)


@torch.no_grad()
def eos_prompt(model, steps: int = 8) -> tuple[list[int], list[int]]:
    """A one-token prompt whose greedy continuation reaches EOS after a few tokens, and that
    continuation (EOS included)."""
    seqs = torch.arange(1, VOCAB).view(-1, 1)
    for _ in range(steps):
        seqs = torch.cat([seqs, model(input_ids=seqs).logits[:, -1].argmax(-1, keepdim=True)], 1)
    for row in seqs.tolist():
        generated = row[1:]
        if EOS in generated[2:6] and EOS not in generated[:2]:
            return row[:1], generated[: generated.index(EOS) + 1]
    raise AssertionError("no prompt of the tiny model reaches EOS greedily")


# -- fixtures ------------------------------------------------------------------------------------


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


@pytest.fixture(scope="module")
def lab(server, tiny_model_dir):
    """A LoRA model trained two steps (so its adapter is not the identity), its sampler checkpoint,
    a SamplingClient on it, and the reference PeftModel loaded from that checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
    tc = sc.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0).result(
        timeout=WAIT
    )
    for _ in range(2):
        fb = tc.forward_backward([datum(t) for t in TRAIN], "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=5e-3))
        fb.result(timeout=WAIT), opt.result(timeout=WAIT)
    path = tc.save_weights_for_sampler("sampling-tests").result(timeout=WAIT).path
    sampler = sc.create_sampling_client(model_path=path).result(timeout=WAIT)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_logits = ref_logits(base, PROMPT)
    directory = server.store.directory(CheckpointPath.parse(path))
    ref = PeftModel.from_pretrained(base, str(directory)).eval()
    # The adapter must matter, or a sampler that ignored it would pass every test here.
    assert (ref_logits(ref, PROMPT) - base_logits).abs().max() > 0.05
    prompt, until_eos = eos_prompt(ref)
    yield SimpleNamespace(
        tc=tc,
        sampler=sampler,
        ref=ref,
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
        eos_prompt=prompt,
        until_eos=until_eos,
    )
    sc.close("success").result(timeout=WAIT)


def sample(sampler, prompt, num_samples=1, **params) -> types.SampleResponse:
    return sampler.sample(
        types.ModelInput.from_ints(prompt),
        num_samples=num_samples,
        sampling_params=types.SamplingParams(**params),
    ).result(timeout=WAIT)


def only(response: types.SampleResponse) -> types.SampledSequence:
    assert len(response.sequences) == 1
    return response.sequences[0]


# -- temperature, top_k, top_p: greedy -----------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT])
def test_temperature_zero_is_the_reference_argmax(lab, prompt) -> None:
    expected = ref_greedy(lab.ref, prompt, 16)
    first = sample(lab.sampler, prompt, num_samples=2, temperature=0.0, max_tokens=16, stop=[])
    again = sample(lab.sampler, prompt, num_samples=1, temperature=0.0, max_tokens=16, stop=[])
    for seq in [*first.sequences, *again.sequences]:
        assert seq.tokens == expected
        assert seq.stop_reason == "length"


@pytest.mark.parametrize(
    "params",
    [
        {"top_k": 1, "seed": 3},
        {"top_k": 1, "temperature": 0.7},  # unseeded
        {"top_p": 1e-6, "seed": 4},
        {"top_p": 1e-6, "temperature": 1.5, "top_k": 50},
        {"temperature": 1e-6, "seed": 5},
        {"temperature": 1e-40, "seed": 6},  # far below float32's range once divided
    ],
)
def test_top_k_one_tiny_top_p_and_tiny_temperature_are_greedy(lab, params) -> None:
    expected = ref_greedy(lab.ref, PROMPT, 12)
    for seq in sample(lab.sampler, PROMPT, 3, max_tokens=12, stop=[], **params).sequences:
        assert seq.tokens == expected
        assert np.all(np.isfinite(seq.logprobs)) and np.all(np.asarray(seq.logprobs) <= 0)


# -- max_tokens, stop, EOS, stop_reason ----------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 6, 40])
def test_max_tokens_is_the_exact_length_when_stop_is_disabled(lab, max_tokens) -> None:
    # This prompt reaches EOS greedily after a few tokens; stop=[] must not stop there.
    for params in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 11}):
        response = sample(lab.sampler, lab.eos_prompt, 2, max_tokens=max_tokens, stop=[], **params)
        for seq in response.sequences:
            assert len(seq.tokens) == max_tokens
            assert len(seq.logprobs) == max_tokens
            assert seq.stop_reason == "length"
    greedy = sample(lab.sampler, lab.eos_prompt, max_tokens=40, temperature=0.0, stop=[])
    assert only(greedy).tokens[: len(lab.until_eos)] == lab.until_eos  # went on past EOS
    assert only(greedy).tokens == ref_greedy(lab.ref, lab.eos_prompt, 40)


def test_implicit_eos_stops_with_reason_stop(lab) -> None:
    n = len(lab.until_eos)
    seq = only(sample(lab.sampler, lab.eos_prompt, max_tokens=30, temperature=0.0))
    assert (seq.tokens, seq.stop_reason) == (lab.until_eos, "stop")
    assert seq.tokens[-1] == EOS
    # Cut short by max_tokens first: "length".
    seq = only(sample(lab.sampler, lab.eos_prompt, max_tokens=n - 1, temperature=0.0))
    assert (seq.tokens, seq.stop_reason) == (lab.until_eos[:-1], "length")
    # Exactly enough room for EOS: it is a stop, not a length.
    seq = only(sample(lab.sampler, lab.eos_prompt, max_tokens=n, temperature=0.0))
    assert (seq.tokens, seq.stop_reason) == (lab.until_eos, "stop")
    # Stop strings or stop ids that never occur add to EOS; they do not switch it off.
    unused = next(t for t in range(1, VOCAB) if t not in lab.until_eos)
    for stop in (["never-in-this-output"], "never-in-this-output", [unused]):
        seq = only(sample(lab.sampler, lab.eos_prompt, max_tokens=30, temperature=0.0, stop=stop))
        assert (seq.tokens, seq.stop_reason) == (lab.until_eos, "stop"), stop


def test_stop_token_ids(lab) -> None:
    greedy = ref_greedy(lab.ref, PROMPT, 24)
    assert EOS not in greedy
    j = next(i for i in range(3, len(greedy)) if greedy[i] not in greedy[:i])
    seq = only(sample(lab.sampler, PROMPT, max_tokens=24, temperature=0.0, stop=[greedy[j]]))
    assert seq.tokens == greedy[: j + 1]  # the stop token is kept, and ends the output
    assert seq.stop_reason == "stop"
    assert len(seq.logprobs) == j + 1
    # Several ids: the first one to appear stops.
    later = next(t for t in greedy[j + 1 :] if t not in greedy[: j + 1])
    seq = only(sample(lab.sampler, PROMPT, max_tokens=24, temperature=0.0, stop=[later, greedy[j]]))
    assert (seq.tokens, seq.stop_reason) == (greedy[: j + 1], "stop")
    # max_tokens before the stop token: "length".
    seq = only(sample(lab.sampler, PROMPT, max_tokens=j, temperature=0.0, stop=[greedy[j]]))
    assert (seq.tokens, seq.stop_reason) == (greedy[:j], "length")


def test_stop_strings(lab) -> None:
    decode = lab.tokenizer.decode
    greedy = ref_greedy(lab.ref, PROMPT, 24)
    assert EOS not in greedy

    def clean(i: int) -> str | None:
        text = decode([greedy[i]]).strip()
        return text if len(text) >= 2 and "\ufffd" not in text else None

    j = next(i for i in range(2, len(greedy)) if clean(i) and clean(i) not in decode(greedy[:i]))
    stop = clean(j)
    # The first prefix of the output whose text contains the stop string.
    k = next(i for i in range(len(greedy)) if stop in decode(greedy[: i + 1]))
    for form in (stop, ["never-in-this-output", stop]):
        seq = only(sample(lab.sampler, PROMPT, max_tokens=24, temperature=0.0, stop=form))
        assert seq.tokens == greedy[: k + 1], form
        assert seq.stop_reason == "stop"
        assert stop in decode(seq.tokens) and stop not in decode(seq.tokens[:-1])
    seq = only(sample(lab.sampler, PROMPT, max_tokens=24, temperature=0.0, stop=["never-here"]))
    assert (seq.tokens, seq.stop_reason) == (greedy, "length")


# -- seed and num_samples ------------------------------------------------------------------------


def test_seed_decides_the_samples(lab) -> None:
    def run(n=1, **params):
        response = sample(lab.sampler, PROMPT, n, max_tokens=16, stop=[], **params)
        assert len(response.sequences) == n
        return [(tuple(s.tokens), tuple(s.logprobs)) for s in response.sequences]

    assert run(seed=7) == run(seed=7)
    assert run(seed=7) != run(seed=8)
    rows = run(4, seed=7)
    assert len({tokens for tokens, _ in rows}) == 4  # the samples of one request differ
    assert run(4, seed=7) == rows
    assert run(temperature=0.7, seed=7) == run(temperature=0.7, seed=7)
    assert run(temperature=0.7, seed=7) != run(seed=7)
    assert run() != run()  # unseeded: fresh randomness each time
    assert len({tokens for tokens, _ in run(4)}) == 4


# -- logprobs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1.0},
        {"temperature": 0.7},
        {"temperature": 1.3, "top_k": 5},
        {"temperature": 0.8, "top_p": 0.6},
    ],
)
def test_sampled_logprobs_are_the_reference_log_softmax(lab, params) -> None:
    t = params["temperature"]
    for prompt in (PROMPT, LONG_PROMPT):
        response = sample(lab.sampler, prompt, 3, max_tokens=12, stop=[], seed=21, **params)
        for seq in response.sequences:
            expected = ref_token_logprobs(lab.ref, prompt, seq.tokens, t)
            got = torch.tensor(seq.logprobs)
            torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
            logits = ref_logits(lab.ref, [*prompt, *seq.tokens])[len(prompt) - 1 : -1] / t
            for position, token in enumerate(seq.tokens):
                order = logits[position].argsort(descending=True).tolist()
                rank = order.index(token)
                if "top_k" in params:  # only the k most likely tokens are ever drawn
                    assert rank < params["top_k"]
                if "top_p" in params:  # only the nucleus: the mass before it is below top_p
                    probs = logits[position].softmax(-1)[order]
                    assert float(probs[:rank].sum()) < params["top_p"]


def test_sampler_logprobs_agree_with_the_trainer(lab) -> None:
    seq = only(sample(lab.sampler, PROMPT, max_tokens=10, stop=[], seed=5))
    full = [*PROMPT, *seq.tokens]
    out = lab.tc.forward([datum(full)], "cross_entropy").result(timeout=WAIT)
    trainer = torch.from_numpy(out.loss_fn_outputs[0]["logprobs"].to_numpy())
    torch.testing.assert_close(
        torch.tensor(seq.logprobs), trainer[len(PROMPT) - 1 :], rtol=0, atol=ATOL
    )
    scored = lab.sampler.compute_logprobs(types.ModelInput.from_ints(full)).result(timeout=WAIT)
    assert scored[0] is None
    torch.testing.assert_close(torch.tensor(scored[1:]), trainer, rtol=0, atol=ATOL)


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT, [7, 8]])
def test_compute_logprobs_equals_trainer_forward(lab, prompt) -> None:
    scored = lab.sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result(timeout=WAIT)
    assert len(scored) == len(prompt) and scored[0] is None
    out = lab.tc.forward([datum(prompt)], "cross_entropy").result(timeout=WAIT)
    trainer = torch.from_numpy(out.loss_fn_outputs[0]["logprobs"].to_numpy())
    torch.testing.assert_close(torch.tensor(scored[1:]), trainer, rtol=0, atol=ATOL)
    reference = ref_logits(lab.ref, prompt)[:-1].log_softmax(-1)
    expected = reference.gather(-1, torch.tensor(prompt[1:]).view(-1, 1)).view(-1)
    torch.testing.assert_close(torch.tensor(scored[1:]), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("k", [1, 5])
def test_prompt_logprobs_and_topk_prompt_logprobs(lab, k) -> None:
    response = lab.sampler.sample(
        types.ModelInput.from_ints(LONG_PROMPT),
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=3, seed=1),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=k,
    ).result(timeout=WAIT)
    assert len(response.sequences) == 2
    lp = ref_logits(lab.ref, LONG_PROMPT)[:-1].log_softmax(-1)  # position i predicts token i + 1
    prompt_lps = response.prompt_logprobs
    assert len(prompt_lps) == len(LONG_PROMPT) and prompt_lps[0] is None
    expected = lp.gather(-1, torch.tensor(LONG_PROMPT[1:]).view(-1, 1)).view(-1)
    torch.testing.assert_close(torch.tensor(prompt_lps[1:]), expected, rtol=0, atol=ATOL)

    topk = response.topk_prompt_logprobs
    assert len(topk) == len(LONG_PROMPT) and topk[0] is None
    values, ids = lp.topk(k, dim=-1)
    for i, row in enumerate(topk[1:]):
        assert [token for token, _ in row] == ids[i].tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in row]), values[i], rtol=0, atol=ATOL)


def test_without_logprob_options_no_prompt_logprobs_come_back(lab) -> None:
    response = sample(lab.sampler, PROMPT, max_tokens=2)
    assert response.prompt_logprobs is None and response.topk_prompt_logprobs is None
