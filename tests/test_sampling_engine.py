"""tinkerd's sampling engine (tinkerd/sampling.py) through HFBackend, in process.

Requests of several adapters (the base, snapshots of models of different ranks, one with a LoRA
lm_head) share the engine's steps and each gets exactly what its adapter alone gives; its
logprobs are the trainer's; a long sample does not hold the others; requests beyond the batch's
rows wait and join later with the same tokens; prompts go in unpadded; the KV cache's blocks all
come back; an adapter a running request uses outlives its sampler until the request ends.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tinkerd import sampling
from tinkerd.hf_backend import HFBackend
from tinkerd.types import (
    AdamParams,
    CreateModel,
    Datum,
    ForwardBackward,
    LoraConfig,
    OptimStep,
    Sample,
    SampleResult,
    SamplerWeights,
    SamplingParams,
    SaveWeights,
)

pytestmark = pytest.mark.timeout(180)

VOCAB = 909
TRAIN = [5, 17, 42, 99, 300, 7, 64, 12, 9, 8]


def datum(tokens: list[int]) -> Datum:
    ids = np.asarray(tokens, dtype=np.int64)
    inputs = {"target_tokens": np.roll(ids, -1), "weights": np.ones(len(ids), np.float32)}
    return Datum(ids, inputs)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """A backend with three models trained one step (ranks 4, 8, 8; the last with no LoRA
    lm_head) and a snapshot of each."""
    backend = HFBackend(tmp_path_factory.mktemp("data"), "cpu")
    model = str(tiny_model_dir)
    configs = [
        LoraConfig(rank=4, seed=1),
        LoraConfig(rank=8, seed=2),
        LoraConfig(rank=8, seed=3, train_unembed=False),
    ]
    snapshots = []
    for i, lora in enumerate(configs):
        backend.create_model(f"m{i}", CreateModel(model, lora))
        [result] = backend.forward_backward(
            [(f"m{i}", ForwardBackward([datum(TRAIN[i:])], "cross_entropy"))]
        )
        assert not isinstance(result, Exception), result
        backend.optim_step(f"m{i}", OptimStep(AdamParams(learning_rate=2e-2)))
        backend.save_weights(f"m{i}", SaveWeights(None, snapshot_id=f"snap-{i}"))
        snapshots.append(SamplerWeights(model, snapshot_id=f"snap-{i}"))
    yield SimpleNamespace(
        backend=backend, model=model, base=SamplerWeights(model), snapshots=snapshots
    )


def request(
    weights: SamplerWeights,
    prompt: list[int] | int,
    num_samples: int = 1,
    prompt_logprobs: bool = False,
    **params,
) -> Sample:
    """A sample of `prompt` (or of that many random tokens); stop=[] unless given."""
    if isinstance(prompt, int):
        prompt = np.random.default_rng(prompt).integers(1, VOCAB, prompt).tolist()
    params.setdefault("stop_tokens", ())
    return Sample(
        weights, np.asarray(prompt, np.int64), num_samples, SamplingParams(**params),
        prompt_logprobs, 3 if prompt_logprobs else 0,
    )  # fmt: skip


def mixed(lab) -> list[Sample]:
    """Requests of the base and the three snapshots, of every kind, prompts of 1 to 40 tokens."""
    s0, s1, s2 = lab.snapshots
    return [
        request(s0, 40, 3, max_tokens=12, seed=1),
        request(lab.base, 7, max_tokens=9, temperature=0.0),
        request(s1, [3], 2, max_tokens=15, seed=2, temperature=0.7, top_k=20),
        request(s2, 17, max_tokens=6, seed=3, top_p=0.8, prompt_logprobs=True),
        request(s1, 33, max_tokens=10, temperature=0.0, prompt_logprobs=True),
        request(lab.base, 16, 2, max_tokens=8, seed=4, temperature=1.3),
        request(s0, 5, max_tokens=20, seed=5, stop_tokens=None),  # stops at EOS if drawn
        request(s2, 25, 4, max_tokens=7, seed=6),
    ]


def assert_same(got: SampleResult, want: SampleResult) -> None:
    assert [(s.tokens.tolist(), s.stop_reason) for s in got.sequences] == [
        (s.tokens.tolist(), s.stop_reason) for s in want.sequences
    ]
    for g, w in zip(got.sequences, want.sequences, strict=True):
        np.testing.assert_allclose(g.logprobs, w.logprobs, rtol=0, atol=1e-5)
    if want.prompt_logprobs is None:
        assert got.prompt_logprobs is None
    else:
        np.testing.assert_allclose(got.prompt_logprobs, want.prompt_logprobs, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got.topk_prompt_logprobs[0], want.topk_prompt_logprobs[0])


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[SimpleNamespace]:
    """Each engine step: the adapters of its requests, its decoding rows, its joining prompts."""
    seen: list[SimpleNamespace] = []
    real = sampling.Engine._pass

    def record(engine, model, routed, decoding, joining):
        requests = {id(r.request): r.request for r in decoding} | {id(q): q for q in joining}
        seen.append(
            SimpleNamespace(
                adapters={q.adapter for q in requests.values()},
                decoding=len(decoding),
                prompts=[len(q.sample.prompt) for q in joining],
            )
        )
        return real(engine, model, routed, decoding, joining)

    monkeypatch.setattr(sampling.Engine, "_pass", record)
    return seen


def test_mixed_adapters_in_one_batch_give_each_request_what_its_adapter_alone_gives(
    lab, steps
) -> None:
    requests = mixed(lab)
    embeddings = lab.backend._load_base(lab.model).sampler.get_input_embeddings()
    rows: list[int] = []
    hook = embeddings.register_forward_hook(lambda m, args, out: rows.append(args[0].numel()))
    try:
        together = lab.backend.sample(requests)
    finally:
        hook.remove()
    assert len(steps[0].adapters) == 4  # the base and three snapshots in one step
    assert sorted(steps[0].prompts) == sorted(len(r.prompt) for r in requests)
    assert max(rows) == sum(len(r.prompt) for r in requests)  # the prompts packed, no padding
    steps.clear()
    for r, batched in zip(requests, together, strict=True):
        (alone,) = lab.backend.sample([r])
        assert_same(batched, alone)
    assert all(len(step.adapters) == 1 for step in steps)


def test_logprobs_in_a_mixed_batch_are_the_trainers(lab) -> None:
    """At temperature 1 each sampled token's logprob is the trainer's forward logprob of that
    token, through that request's own model, whatever else shared the batch."""
    requests = [request(w, 11 + i, 2, max_tokens=8, seed=i) for i, w in enumerate(lab.snapshots)]
    results = lab.backend.sample(requests + [request(lab.base, 30, 3, max_tokens=8, seed=9)])
    for i, (r, result) in enumerate(zip(requests, results, strict=False)):
        for seq in result.sequences:
            tokens = [*r.prompt.tolist(), *seq.tokens.tolist()]
            forward = ForwardBackward([datum(tokens)], "cross_entropy", forward_only=True)
            [out] = lab.backend.forward_backward([(f"m{i}", forward)])
            trainer = out.loss_fn_outputs[0]["logprobs"][len(r.prompt) - 1 : -1]
            np.testing.assert_allclose(seq.logprobs, trainer, rtol=0, atol=1e-4)


def test_a_long_sample_does_not_hold_the_others(lab) -> None:
    backend = lab.backend
    done: dict[str, int] = {}
    step = 0

    def start(name: str, sample: Sample) -> None:
        backend.sample_start(sample, lambda result: done.setdefault(name, step))

    start("long", request(lab.snapshots[0], 9, max_tokens=120, seed=1))
    for i in range(3):
        start(f"short{i}", request(lab.snapshots[i], 5 + i, max_tokens=5, seed=i))
    while backend.sample_step():
        step += 1
        if step == 10:  # one that arrives while the long one runs joins at the next step
            start("late", request(lab.base, 12, max_tokens=5, seed=7))
    assert [done[f"short{i}"] for i in range(3)] == [4, 4, 4]  # five steps: 0..4
    assert done["late"] == 14 and done["long"] == 119


def test_requests_beyond_the_rows_wait_and_join_later_with_the_same_tokens(
    lab, steps, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = mixed(lab)
    alone = [lab.backend.sample([r])[0] for r in requests]
    steps.clear()
    engine = lab.backend._engine(lab.backend._load_base(lab.model))
    monkeypatch.setattr(engine, "max_rows", 4)
    for together, want in zip(lab.backend.sample(requests), alone, strict=True):
        assert_same(together, want)
    assert max(s.decoding for s in steps) <= 4
    joined = [i for i, s in enumerate(steps) if s.prompts]
    assert len(joined) > 1 and joined[-1] > 0  # some joined once others had left


def test_the_cache_is_shared_by_a_prompts_samples_and_given_back(lab) -> None:
    backend = lab.backend
    engine = backend._engine(backend._load_base(lab.model))
    free = engine.pool.free
    results: list = []
    prompt = 40  # two full blocks of 16 and a partial one
    backend.sample_start(request(lab.base, prompt, 4, max_tokens=30, seed=1), results.append)
    backend.sample_step()
    # the prompt's full blocks once; each sample its own partial block and what it generates
    own = sampling.blocks_for(prompt + 30 - 1) - prompt // sampling.BLOCK
    assert free - engine.pool.free == prompt // sampling.BLOCK + 4 * own
    while backend.sample_step():
        pass
    assert engine.pool.free == free and not engine.running and not engine.waiting
    assert len(results) == 1 and len(results[0].sequences) == 4


def test_an_adapter_in_use_outlives_its_sampler_until_its_requests_end(lab) -> None:
    backend = lab.backend
    model = lab.model
    backend.create_model("gone", CreateModel(model, LoraConfig(rank=4, seed=11)))
    backend.optim_step("gone", OptimStep(AdamParams(learning_rate=1e-2)))
    backend.save_weights("gone", SaveWeights(None, snapshot_id="gone-snap"))
    sample = request(SamplerWeights(model, snapshot_id="gone-snap"), 10, max_tokens=12, seed=3)
    (expected,) = backend.sample([sample])
    base = backend._load_base(model)
    name = backend._samplers["gone-snap"][1]
    results: list = []
    backend.sample_start(sample, results.append)
    backend.sample_step()
    backend.remove_model("gone")  # drops its snapshot while the request runs
    assert "gone-snap" not in backend._samplers
    assert name in base.sampler_peft.peft_config
    while backend.sample_step():
        pass
    assert_same(results[0], expected)
    assert name not in base.sampler_peft.peft_config  # deleted once the request ended
    (error,) = backend.sample([sample])
    assert "no longer in memory" in str(error)


def test_sampling_never_touches_the_trainers_modules(lab) -> None:
    """Sampler adapters live in a second module tree over the same weight tensors."""
    base = lab.backend._load_base(lab.model)
    trainer = {id(p) for n, p in base.model.named_parameters() if "lora_" not in n}
    sampler = {id(p) for n, p in base.sampler.named_parameters() if "lora_" not in n}
    assert sampler and sampler <= trainer
    names = {lab.backend._samplers[s.snapshot_id][1] for s in lab.snapshots}
    assert names <= set(base.sampler_peft.peft_config)
    assert not names & set(base.peft.peft_config)


def test_score_is_the_engines_logprobs_at_any_temperature(lab) -> None:
    """`sampling.score` (the trainer's forward, used where vLLM's logprobs differ) gives the
    engine's sampled logprobs and its prompt logprobs."""
    base = lab.backend._load_base(lab.model)
    for weights, temperature in ((lab.snapshots[1], 0.7), (lab.base, 1.3)):
        r = request(weights, 21, max_tokens=10, seed=3, temperature=temperature)
        r.prompt_logprobs, r.topk_prompt_logprobs = True, 2
        (result,) = lab.backend.sample([r])
        adapter = lab.backend._sampler_adapter(base, weights)
        seq = result.sequences[0]
        tokens = np.concatenate([r.prompt, seq.tokens])
        chosen, _, _ = sampling.score(base.sampler_peft, adapter, tokens, temperature)
        np.testing.assert_allclose(chosen[len(r.prompt) - 1 :], seq.logprobs, rtol=0, atol=1e-5)
        chosen, values, ids = sampling.score(base.sampler_peft, adapter, r.prompt, 1.0, 2)
        np.testing.assert_allclose(chosen, result.prompt_logprobs[1:], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(ids, result.topk_prompt_logprobs[0][1:])


def test_the_vllm_sampler_is_refused_clearly_without_vllm(tmp_path: Path, tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="unknown sampler 'sglang'"):
        HFBackend(tmp_path, "cpu", sampler="sglang")
    try:
        import vllm  # noqa: F401
    except ImportError:
        backend = HFBackend(tmp_path, "cpu", sampler="vllm")
        (error,) = backend.sample([request(SamplerWeights(str(tiny_model_dir)), 5, max_tokens=2)])
        assert "--sampler vllm needs vLLM" in str(error) and "tinkerd[vllm]" in str(error)
    else:
        pytest.skip("vLLM is installed here: tests/test_vllm.py runs it")


def test_a_prompt_over_the_steps_budget_joins_beside_decoding_rows(
    lab, steps, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = lab.backend._engine(lab.backend._load_base(lab.model))
    monkeypatch.setattr(engine, "max_step_tokens", 16)
    done: list[str] = []
    lab.backend.sample_start(
        request(lab.base, 9, max_tokens=30, seed=1), lambda r: done.append("long")
    )
    lab.backend.sample_step()
    for name, n in (("over", 40), ("next", 10)):
        lab.backend.sample_start(
            request(lab.snapshots[0], n, max_tokens=4, seed=2), lambda r, n=name: done.append(n)
        )
    while lab.backend.sample_step():
        pass
    joined = [(s.decoding, s.prompts) for s in steps if s.prompts]
    assert joined == [(0, [9]), (1, [40]), (2, [10])]  # each beside the rows decoding
    assert done == ["over", "next", "long"]
