"""Sampling throughput: tinkerd's `asample` through the SDK against plain `model.generate`.

Measures generated tokens per second at several concurrency levels N (default 1, 8 and 32), two
ways, on the same random tiny model (tinkerd's built-in one: hidden 64, 2 layers, vocab 909,
built with build_tiny_model into a temporary directory; nothing is downloaded):

(a) in process: transformers `model.generate` on one batch of the N prompts, left-padded, with
    sampling (temperature 1, no top-k, top-p 1) and exactly `--max-tokens` new tokens per prompt
    (EOS is not allowed to end a row early);
(b) through tinkerd: the official `tinker` SDK against a live `tinkerd serve` subprocess on a free
    loopback port. A base-model SamplingClient submits N `sample` requests at once (one prompt
    each, num_samples=1, the same sampling parameters, stop=[] so that EOS does not stop and
    every request generates exactly `--max-tokens` tokens) and waits for all N. What is timed
    includes HTTP, queueing, the worker's batching of waiting requests, the KV-cache generation
    loop, protobuf encoding and the SDK's future polling.

Both sides get the same N prompts (random token ids, 16 to 48 tokens long, so batches are
padded) and generate the same number of tokens. tokens/s = N x max_tokens / wall time of one
round; each side runs one untimed warm-up round per level, then `--rounds` timed rounds, and the
median round is reported. `--threads` sets torch's intra-op threads on both sides alike.

(a) and (b) never run at the same time: the server is started only after every in-process round
is done and its model is freed, and while (b) runs this process only waits on futures. The result
is a table of tokens/s for (a) and (b) and the ratio b/a per level, with the machine's load
average, since on a shared CPU box other work moves these figures a lot.

    .venv/bin/python bench/sampling.py                  # levels 1, 8, 32; 64 tokens; 3 rounds
    .venv/bin/python bench/sampling.py --quick          # a fast smoke run, noisy figures
    .venv/bin/python bench/sampling.py --max-tokens 128 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
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


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(rng.integers(16, 49))).tolist() for _ in range(n)]


def median_rate(tokens: int, seconds: list[float]) -> float:
    return tokens / statistics.median(seconds)


# -- (a) in process ------------------------------------------------------------------------------


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


def generate_round(model, input_ids, mask, max_tokens: int, pad: int) -> float:
    """Seconds for one model.generate call that samples exactly max_tokens per row."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
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


def run_in_process(
    model_dir: Path, levels: list[int], max_tokens: int, rounds: int
) -> dict[int, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    rates = {}
    for n in levels:
        input_ids, mask = left_padded(make_prompts(n, model.config.vocab_size), pad)
        generate_round(model, input_ids, mask, max_tokens, pad)  # warm-up
        times = [generate_round(model, input_ids, mask, max_tokens, pad) for _ in range(rounds)]
        rates[n] = median_rate(n * max_tokens, times)
    del model
    gc.collect()
    return rates


# -- (b) through tinkerd -------------------------------------------------------------------------


def sample_round(sampler, prompts, params, max_tokens: int) -> float:
    """Seconds from submitting one sample request per prompt, all at once, to the last result."""
    start = time.perf_counter()
    futures = [sampler.sample(p, num_samples=1, sampling_params=params) for p in prompts]
    results = [f.result() for f in futures]
    elapsed = time.perf_counter() - start
    assert all(len(r.sequences[0].tokens) == max_tokens for r in results)
    return elapsed


def run_through_server(
    model_dir: Path,
    levels: list[int],
    max_tokens: int,
    rounds: int,
    work_dir: Path,
    log_level: str,
    threads: int | None,
) -> dict[int, float]:
    from tinker import types
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[])
    # torch reads OMP_NUM_THREADS at start-up: the server's intra-op threads
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    rates = {}
    with sdk_session(work_dir, [], log_level, env) as (_, client):
        sampler = client.create_sampling_client(base_model=str(model_dir)).result()
        for n in levels:
            prompts = [types.ModelInput.from_ints(p) for p in make_prompts(n, vocab)]
            sample_round(sampler, prompts, params, max_tokens)  # warm-up (loads the model)
            times = [sample_round(sampler, prompts, params, max_tokens) for _ in range(rounds)]
            rates[n] = median_rate(n * max_tokens, times)
    return rates


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-tokens", type=int, help="tokens generated per request (default 64; 16 with --quick)"
    )
    parser.add_argument(
        "--rounds", type=int, help="timed rounds per level; the median counts (default 3)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        help="concurrent requests per round (default 1 8 32; 1 8 with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads on both sides (default: torch's own choice); on a busy "
        "machine 1 avoids threads waiting on each other",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: noisy figures")
    parser.add_argument("--server-log-level", default="WARNING")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    levels = args.concurrency or ([1, 8] if args.quick else [1, 8, 32])
    if max_tokens < 1 or rounds < 1 or min(levels) < 1:
        parser.error("--max-tokens, --rounds and --concurrency must be positive")

    import torch

    from tinkerd.tiny_model import build_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)

    work_dir = Path(tempfile.mkdtemp(prefix="tinkerd-bench-sampling-"))
    try:
        model_dir = build_tiny_model(work_dir / "tiny")
        print(
            f"tiny model (tinkerd's built-in config), {max_tokens} new tokens per request, "
            f"prompts of 16-48 tokens, median of {rounds} round(s) after 1 warm-up, "
            f"torch {torch.__version__} on cpu with {torch.get_num_threads()} threads per side, "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
            flush=True,
        )
        local = run_in_process(model_dir, levels, max_tokens, rounds)
        served = run_through_server(
            model_dir, levels, max_tokens, rounds, work_dir, args.server_log_level, args.threads
        )
        print(f"load average afterwards {os.getloadavg()[0]:.1f}")
    finally:
        if args.keep:
            print(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    print()
    print("| concurrent requests | model.generate tok/s | tinkerd asample tok/s | ratio |")
    print("|--------------------:|---------------------:|----------------------:|------:|")
    for n in levels:
        print(f"| {n:19d} | {local[n]:20.0f} | {served[n]:21.0f} | {served[n] / local[n]:5.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
