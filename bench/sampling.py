"""Sampling throughput: tinkerd's engine through the SDK against transformers' mixed-adapter
`generate`, for 1, 4 and 16 LoRA adapters and 8 to 128 concurrent requests, in one run.

Everything runs on the same random tiny model (tinkerd's built-in config by default: hidden 64,
2 layers, vocab 909; `--hidden` and `--layers` make it larger), built into a temporary directory;
nothing is downloaded.

First a `tinkerd serve` subprocess makes the adapters: K LoRA models (rank 8, attention and MLP),
each trained one step so that its B matrices are not zero, saved as sampler checkpoints
(`save_weights_for_sampler`, PEFT format); then it stops. Then, for each (adapters K, requests
N), rounds of the two sides alternate, one at a time (while one runs the other is idle), so that
load from other work on a shared machine falls on both alike:

- transformers + PEFT, in this process: the checkpoint directories loaded into one PeftModel,
  one `generate` call on the N prompts, left-padded, request i through adapter i mod K
  (`adapter_names`, PEFT's mixed-adapter batch), sampling at temperature 1 with exactly
  `--max-tokens` new tokens per row;
- tinkerd, a fresh `tinkerd serve` subprocess on the same data directory: one SamplingClient
  per checkpoint (`create_sampling_client(model_path=...)`), request i on client i mod K, all N
  submitted at once through the official SDK with stop=[] so that every request generates
  exactly `--max-tokens` tokens; the time counts HTTP, queueing, the engine and the SDK's
  polling, from the first submit to the last result.

Prompts are random token ids, 16 to 48 tokens long. tokens/s = N x max_tokens / wall time of a
round; each cell gets one untimed warm-up round per side, then `--rounds` timed rounds (5),
alternating, and the fastest of each side counts (other work on a shared machine only ever slows
a round). `--threads` sets torch's intra-op threads on both sides alike. The table gives both
rates and their ratio per cell, with the machine's load average.

    .venv/bin/python bench/sampling.py                 # 1 4 16 adapters x 8 16 32 64 128
    .venv/bin/python bench/sampling.py --quick         # a smoke run: 4 adapters x 8 32, noisy
    .venv/bin/python bench/sampling.py --adapters 4 --concurrency 32 --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from live_server import sdk_session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")
warnings.filterwarnings("ignore", category=FutureWarning)

TRAIN = [[5, 17, 42, 99, 300, 7, 64, 12], [9, 8, 7, 6, 5, 4, 3]]


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(rng.integers(16, 49))).tolist() for _ in range(n)]


def best_rate(tokens: int, seconds: list[float]) -> float:
    """tokens/s of the fastest round: other work on a shared machine only ever slows a round."""
    return tokens / min(seconds)


# -- 1. the adapters, made by tinkerd ------------------------------------------------------------


def make_adapters(
    model_dir: Path, count: int, work_dir: Path, log_level: str, env: dict[str, str] | None
) -> list[str]:
    """`count` sampler checkpoints, each of a LoRA model trained one step; their tinker paths."""
    from tinker import types

    def datum(tokens: list[int]) -> types.Datum:
        return types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )

    paths = []
    with sdk_session(work_dir, [], log_level, env) as (_, client):
        for i in range(count):
            tc = client.create_lora_training_client(base_model=str(model_dir), rank=8, seed=i)
            fb = tc.forward_backward([datum(t) for t in TRAIN], "cross_entropy")
            opt = tc.optim_step(types.AdamParams(learning_rate=1e-2))
            fb.result(), opt.result()
            paths.append(tc.save_weights_for_sampler(f"bench-{i}").result().path)
    return paths


def checkpoint_dir(work_dir: Path, path: str) -> Path:
    from tinkerd.storage import CheckpointPath, CheckpointStore

    return CheckpointStore(work_dir / "data" / "runs").directory(CheckpointPath.parse(path))


# -- the two sides --------------------------------------------------------------------------------


def left_padded(prompts: list[list[int]], pad: int):
    """(N, W) input ids and attention mask, each prompt at the right end of its row."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return input_ids, mask


def peft_model(model_dir: Path, adapter_dirs: list[Path]):
    """The base model with every checkpoint loaded as an adapter a0, a1, ..., and its pad id."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name="a0")
    for i, directory in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(str(directory), adapter_name=f"a{i}")
    return model.eval(), AutoTokenizer.from_pretrained(model_dir).pad_token_id


def generate_round(model, prompts: list[list[int]], k: int, max_tokens: int, pad: int) -> float:
    """Seconds for one `generate` call, row i through adapter i mod k, exactly max_tokens new."""
    import torch

    input_ids, mask = left_padded(prompts, pad)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            adapter_names=[f"a{i % k}" for i in range(len(prompts))],
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,  # EOS may not end a row early
            pad_token_id=pad,
        )
    elapsed = time.perf_counter() - start
    assert out.shape == (input_ids.shape[0], input_ids.shape[1] + max_tokens), out.shape
    return elapsed


def sample_round(samplers, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds from submitting one request per prompt (request i on sampler i mod K), all at
    once, to the last result."""
    from tinker import types

    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[])
    inputs = [types.ModelInput.from_ints(p) for p in prompts]
    start = time.perf_counter()
    futures = [
        samplers[i % len(samplers)].sample(p, num_samples=1, sampling_params=params)
        for i, p in enumerate(inputs)
    ]
    results = [f.result() for f in futures]
    elapsed = time.perf_counter() - start
    assert all(len(r.sequences[0].tokens) == max_tokens for r in results)
    return elapsed


def run_cells(
    model_dir: Path,
    paths: list[str],
    cells: list[tuple[int, int]],
    work_dir: Path,
    env: dict[str, str] | None,
    args,
) -> dict[tuple[int, int], tuple[float, float]]:
    """(generate, tinkerd) tokens/s per cell, their rounds alternating."""
    model, pad = peft_model(model_dir, [checkpoint_dir(work_dir, p) for p in paths])
    vocab = model.config.vocab_size
    rates = {}
    with sdk_session(work_dir, [], args.server_log_level, env) as (_, client):
        samplers = [client.create_sampling_client(model_path=p) for p in paths]
        for k, n in cells:
            prompts = make_prompts(n, vocab)
            generate_round(model, prompts, k, args.max_tokens, pad)  # warm-ups
            sample_round(samplers[:k], prompts, args.max_tokens)
            local, served = [], []
            for _ in range(args.rounds):
                local.append(generate_round(model, prompts, k, args.max_tokens, pad))
                served.append(sample_round(samplers[:k], prompts, args.max_tokens))
            tokens = n * args.max_tokens
            rates[k, n] = (best_rate(tokens, local), best_rate(tokens, served))
            a, b = rates[k, n]
            print(
                f"  {k:2d} adapters x {n:3d} requests: generate {a:6.0f} tok/s, "
                f"tinkerd {b:6.0f} tok/s ({b / a:.2f}x), load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    return rates


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, help="tokens per request (default 64; 16 quick)")
    parser.add_argument("--rounds", type=int, help="timed rounds per cell, best (default 5)")
    parser.add_argument(
        "--adapters", type=int, nargs="+", help="adapters per batch (default 1 4 16; 4 quick)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        help="concurrent requests (default 8 16 32 64 128; 8 32 quick)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads on both sides")
    parser.add_argument("--hidden", type=int, default=64, help="the model's hidden size (64)")
    parser.add_argument("--layers", type=int, default=2, help="the model's layers (2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: noisy figures")
    parser.add_argument("--server-log-level", default="WARNING")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.max_tokens = args.max_tokens or (16 if args.quick else 64)
    args.rounds = args.rounds or (1 if args.quick else 5)
    adapters = args.adapters or ([4] if args.quick else [1, 4, 16])
    levels = args.concurrency or ([8, 32] if args.quick else [8, 16, 32, 64, 128])
    if args.max_tokens < 1 or args.rounds < 1 or min(levels) < 1 or min(adapters) < 1:
        parser.error("--max-tokens, --rounds, --adapters and --concurrency must be positive")
    cells = [(k, n) for k in adapters for n in levels]

    import torch

    from tinkerd.tiny_model import build_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    # torch reads OMP_NUM_THREADS at start-up: the server's intra-op threads
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None

    work_dir = Path(tempfile.mkdtemp(prefix="tinkerd-bench-sampling-"))
    try:
        model_dir = build_tiny_model(
            work_dir / "model", hidden_size=args.hidden, num_layers=args.layers
        )
        print(
            f"random Llama (hidden {args.hidden}, {args.layers} layers), LoRA rank 8, "
            f"{args.max_tokens} new tokens per request, prompts of 16-48 tokens, best of "
            f"{args.rounds} round(s) after 1 warm-up, torch {torch.__version__} on cpu with "
            f"{torch.get_num_threads()} threads per side, load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
            flush=True,
        )
        paths = make_adapters(model_dir, max(adapters), work_dir, args.server_log_level, env)
        rates = run_cells(model_dir, paths, cells, work_dir, env, args)
        print(f"load average afterwards {os.getloadavg()[0]:.1f}")
    finally:
        if args.keep:
            print(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    print()
    print("| adapters | concurrent requests | generate tok/s | tinkerd tok/s | ratio |")
    print("|---------:|--------------------:|---------------:|--------------:|------:|")
    for k, n in cells:
        a, b = rates[k, n]
        print(f"| {k:8d} | {n:19d} | {a:14.0f} | {b:13.0f} | {b / a:5.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
