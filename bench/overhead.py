"""How much training throughput does going through tinkerd cost?

Runs one LoRA training loop two ways and compares steps per second:

(a) in process: plain transformers + PEFT + torch. LoRA (lora_alpha=32, no dropout) on every
    attention, MLP and lm_head Linear layer, a summed cross-entropy loss, backward, a
    torch.optim.AdamW step and zero_grad, all in this process;
(b) through tinkerd: the official `tinker` SDK against a live `tinkerd serve` started as a
    subprocess on a free loopback port, with forward_backward and optim_step both submitted
    before waiting on either (pipelined, as tinker-cookbook does).

Both run the same random model, LoRA rank, batch and learning rate. Two model sizes are built
locally with build_tiny_model into a temporary directory (nothing is downloaded):

  tiny   the built-in default (hidden 64, 2 layers): a step is a few ms of compute, so the
         figure is dominated by per-request overhead (HTTP, queueing, polling, encoding);
  small  hidden 256, 4 layers, vocab 4096, batch 8 x 128 tokens: an in-process step takes
         roughly 100-300 ms on a 2-core CPU, the regime where the target is (b) >= 0.9 x (a).

(a) and (b) never run at the same time: the server is started only after the in-process run
of that size has finished and its model is freed, and while (b) runs this process only waits on
futures. Each side is warmed up before a fixed number of steps is timed, in rounds of (a) then
(b) with a fresh server each round; the best round of each side is reported, to discount other
processes on the machine (their CPU use during each timed run is printed as "other load"). The
result is a table of steps/s for (a) and (b) and the ratio b/a per size; the exit code is 0
unless something failed.

On a 2-core machine torch's two OpenMP threads spin while they wait for each other; when
another process keeps a core busy, a step gets 5-40x slower, on either side. --omp-passive
sets OMP_WAIT_POLICY=PASSIVE for both sides, which keeps the comparison meaningful on a busy
machine at the price of some speed on an idle one.

    .venv/bin/python bench/overhead.py            # both sizes, 2 rounds of 30 timed steps
    .venv/bin/python bench/overhead.py --quick    # a fast smoke run (1 round of 8 steps)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from live_server import sdk_session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

LORA_ALPHA = 32  # what tinkerd uses for every rank (tinkerd.types.LoraConfig.alpha)
LEARNING_RATE = 1e-4
TARGET_RATIO = 0.9  # on the small model


@dataclass(frozen=True)
class Size:
    name: str
    model: dict[str, int]  # build_tiny_model keyword arguments
    batch: int
    seq_len: int


SIZES = (
    Size("tiny", {}, batch=4, seq_len=32),
    Size(
        "small",
        {
            "hidden_size": 256,
            "num_layers": 4,
            "num_heads": 4,
            "intermediate_size": 640,
            "vocab_size": 4096,
        },
        batch=8,
        seq_len=128,
    ),
)


@dataclass
class Timing:
    steps: int
    seconds: float  # wall time of the timed steps together
    step_seconds: list[float] = field(default_factory=list)
    other_load: float | None = None  # CPU cores busy with other processes meanwhile (Linux)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.step_seconds)


def busy_jiffies() -> int | None:
    """CPU time spent by the whole machine (all cores), in clock ticks; None off Linux."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(values) - values[3] - values[4]  # all but idle and iowait


def _process_jiffies(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_idle(limit: float, threshold: float = 0.1) -> float | None:
    """Wait (up to `limit` s) until other processes use under `threshold` cores for 2 s running;
    returns the last load seen (None off Linux)."""
    deadline = time.monotonic() + limit
    quiet = 0
    load = None
    while True:
        before, t0 = busy_jiffies(), time.monotonic()
        if before is None:
            return None
        time.sleep(1.0)
        after = busy_jiffies()
        if after is None:
            return None
        load = (after - before) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)
        quiet = quiet + 1 if load < threshold else 0
        if quiet >= 2 or time.monotonic() >= deadline:
            return load


def time_steps(step, warmup: int, steps: int, pids: list[int]) -> Timing:
    """Run `step` warmup times, then time `steps` calls. Also measures how busy the machine was
    with processes other than `pids` (this one and the server), which makes figures noisy."""
    for _ in range(warmup):
        step()
    busy0 = busy_jiffies()
    own0 = sum(_process_jiffies(p) for p in pids) if busy0 is not None else 0
    times = []
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    other = None
    busy1 = busy_jiffies()
    if busy0 is not None and busy1 is not None:
        own1 = sum(_process_jiffies(p) for p in pids)
        ticks = os.sysconf("SC_CLK_TCK")
        other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / ticks / total)
    return Timing(steps, total, times, other)


# -- the batch --------------------------------------------------------------------------------


def make_batch(vocab_size: int, size: Size, seed: int = 0):
    """(B, T + 1) random token ids: position t is input, position t + 1 its target."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(size.batch, size.seq_len + 1), dtype=np.int64)


def model_vocab(model_dir: Path) -> int:
    import json

    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


# -- (a) in process ---------------------------------------------------------------------------


def lora_targets(model) -> list[str]:
    """Every attention, MLP and lm_head Linear layer (what tinkerd trains by default)."""
    from torch import nn

    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (
            name.endswith("lm_head") or ".self_attn." in name or ".mlp." in name
        ):
            names.append(name)
    return names


def run_in_process(model_dir: Path, tokens, rank: int, warmup: int, steps: int) -> Timing:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval().requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=lora_targets(model),
        bias="none",
    )
    torch.manual_seed(0)
    model = get_peft_model(model, config)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=LEARNING_RATE, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0
    )
    batch = torch.from_numpy(tokens)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, warmup, steps, [os.getpid()])


# -- (b) through tinkerd ----------------------------------------------------------------------


def sdk_batch(tokens) -> list[Any]:
    import numpy as np
    from tinker import types

    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={
                "target_tokens": row[1:].copy(),
                "weights": np.ones(len(row) - 1, dtype=np.float32),
            },
        )
        for row in tokens
    ]


def run_through_server(
    model_dir: Path,
    tokens,
    rank: int,
    warmup: int,
    steps: int,
    work_dir: Path,
    server_args: list[str],
    log_level: str,
    server_env: dict[str, str] | None = None,
) -> Timing:
    from tinker import types

    with sdk_session(work_dir, server_args, log_level, server_env) as (server, client):
        training = client.create_lora_training_client(
            base_model=str(model_dir), rank=rank, seed=0
        ).result()
        data = sdk_batch(tokens)
        adam = types.AdamParams(
            learning_rate=LEARNING_RATE, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0
        )

        def step() -> None:
            fwdbwd = training.forward_backward(data, "cross_entropy")
            optim = training.optim_step(adam)
            fwdbwd.result()
            optim.result()

        return time_steps(step, warmup, steps, [os.getpid(), server.proc.pid])


# -- main -------------------------------------------------------------------------------------


def _load(t: Timing) -> str:
    return "n/a" if t.other_load is None else f"{t.other_load:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, help="timed steps per run (default 30; 8 with --quick)"
    )
    parser.add_argument(
        "--warmup", type=int, help="untimed steps first (default 5; 2 with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="few steps, one round: a smoke run, noisy figures"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="rounds of (a) then (b) per size; the best round of each is "
        "reported, which discounts other load on the machine (default 2; 1 "
        "with --quick)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="before each round, wait up to this long for other processes to "
        "leave the CPUs idle (default 120; 0 with --quick)",
    )
    parser.add_argument("--size", choices=[s.name for s in SIZES] + ["all"], default="all")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `tinkerd serve` (repeatable)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for the server only (repeatable)",
    )
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE on both sides: idle OpenMP threads sleep "
        "instead of spinning, which keeps the figures usable on a busy machine "
        "(and costs some speed on an idle one)",
    )
    parser.add_argument("--server-log-level", default="WARNING")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    steps = args.steps or (8 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    repeat = args.repeat or (1 if args.quick else 2)
    wait = args.wait_idle if args.wait_idle is not None else (0.0 if args.quick else 120.0)
    sizes = [s for s in SIZES if args.size in ("all", s.name)]
    server_env = dict(item.split("=", 1) for item in args.server_env)
    if args.omp_passive:  # before torch loads OpenMP; the server inherits it
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

    import torch

    from tinkerd.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="tinkerd-bench-"))
    omp = os.environ.get("OMP_WAIT_POLICY", "default")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_WAIT_POLICY {omp}), "
        f"{os.cpu_count()} cpus; "
        f"LoRA rank {args.rank}, alpha {LORA_ALPHA}; {warmup} warm-up + {steps} timed steps, "
        f"best of {repeat} round(s)"
    )
    rows = []
    try:
        for size in sizes:
            model_dir = build_tiny_model(work / "models" / size.name, **size.model)
            tokens = make_batch(model_vocab(model_dir), size)
            best_a: Timing | None = None
            best_b: Timing | None = None
            for round_ in range(repeat):
                if wait > 0:
                    load = wait_idle(wait)
                    if load is not None and load >= 0.1:
                        print(
                            f"[{size.name}] the machine is busy ({load:.2f} cores used by "
                            "other processes): the figures will be disturbed (see "
                            "--omp-passive)",
                            flush=True,
                        )
                a = run_in_process(model_dir, tokens, args.rank, warmup, steps)
                gc.collect()  # free (a)'s model before the server starts
                print(
                    f"[{size.name}] (a) in-process: {a.steps_per_second:7.2f} steps/s, median "
                    f"step {a.median_ms:6.1f} ms, other load {_load(a)} cores",
                    flush=True,
                )
                run_dir = work / f"server-{size.name}-{round_}"
                run_dir.mkdir()
                b = run_through_server(
                    model_dir,
                    tokens,
                    args.rank,
                    warmup,
                    steps,
                    run_dir,
                    args.server_arg,
                    args.server_log_level,
                    server_env,
                )
                print(
                    f"[{size.name}] (b) tinkerd:    {b.steps_per_second:7.2f} steps/s, median "
                    f"step {b.median_ms:6.1f} ms, other load {_load(b)} cores; this round's "
                    f"b/a {b.steps_per_second / a.steps_per_second:.3f}",
                    flush=True,
                )
                if best_a is None or a.steps_per_second > best_a.steps_per_second:
                    best_a = a
                if best_b is None or b.steps_per_second > best_b.steps_per_second:
                    best_b = b
            assert best_a is not None and best_b is not None
            rows.append((size, best_a, best_b))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    header = (
        f"{'model':<6} {'batch':>7} {'(a) steps/s':>12} {'(a) ms/step':>12} "
        f"{'(b) steps/s':>12} {'(b) ms/step':>12} {'b/a':>6} {'overhead ms':>12} "
        f"{'other load':>11}"
    )
    print(header)
    print("-" * len(header))
    for size, a, b in rows:
        overhead = 1000 * (b.seconds - a.seconds) / steps
        load = max((t.other_load for t in (a, b) if t.other_load is not None), default=None)
        print(
            f"{size.name:<6} {f'{size.batch}x{size.seq_len}':>7} {a.steps_per_second:12.2f} "
            f"{1000 / a.steps_per_second:12.1f} {b.steps_per_second:12.2f} "
            f"{1000 / b.steps_per_second:12.1f} {b.steps_per_second / a.steps_per_second:6.3f} "
            f"{overhead:12.1f} {'n/a' if load is None else f'{load:.2f}':>11}"
        )
    print(
        "(ms/step = 1000 / steps/s; overhead = (b) - (a) per step; other load = CPU cores used "
        "by other processes during the timed steps, max of (a) and (b): above ~0.1 the figures "
        "are disturbed)"
    )
    for size, a, b in rows:
        if size.name == "small":
            ratio = b.steps_per_second / a.steps_per_second
            verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
            print(
                f"\ntarget b/a >= {TARGET_RATIO} on the small model: {verdict} ({ratio:.3f}); "
                f"in-process small step: median {a.median_ms:.1f} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
