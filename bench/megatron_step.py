"""The Megatron backend's training step at several tensor/pipeline-parallel shapes, beside the HF
backend on the same model and batch.

Each shape runs in its own process group (torchrun's environment, one process per rank, one torch
thread per rank on the CPU): every rank builds its slices of the base model and of one LoRA model
(rank 32 on every projection and the lm_head) and runs forward_backward + optim_step on the same
cross-entropy batch, timed on rank 0 after warm-up steps. The HF backend's step is timed in this
process with one thread. On the CPU the model is bench/train_step.py's small Llama (hidden 256,
4 layers, vocab 4096) with 8 x 256 tokens; on a GPU, --model 8b builds a Qwen3-8B-shaped model with
random bf16 weights made on the device (nothing downloaded or written) and prints its MFU as
docs/architecture.md ("Training FLOPs and MFU") defines it.

    .venv/bin/python bench/megatron_step.py                                  # CPU: 1x1, 2x1, 1x2
    python3 bench/megatron_step.py --device cuda --model 8b --configs 1x1   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

RANK = 32


def model_config(kind: str) -> Any:
    import train_step

    if kind == "8b":
        return train_step.qwen3_config()
    return train_step.small_model_config()


def batch(vocab: int, sequences: int, length: int):
    import numpy as np
    import train_step

    rng = np.random.default_rng(3)
    return train_step.make_request(train_step.make_datums(rng, [length] * sequences, vocab))


def timed(step, warmup: int, steps: int, sync) -> float:
    """Seconds per step, after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - started) / steps


def rank_main(args: argparse.Namespace) -> None:
    """One rank of one shape: build, step, and (rank 0) write seconds per step to args.out."""
    import torch
    import torch.distributed as dist

    from tinkerd.backends import BackendOptions
    from tinkerd.megatron import lora as lora_mod
    from tinkerd.megatron.backend import start_rank
    from tinkerd.megatron.engine import AdapterState
    from tinkerd.megatron.model import architecture
    from tinkerd.types import AdamParams, LoraConfig

    tp, pp = (int(x) for x in args.shape.split("x"))
    options = BackendOptions(Path(args.work), args.device, tp=tp, pp=pp)
    engine = start_rank(options)
    config = model_config(args.model)
    arch = architecture(config)
    engine.add_base("base", arch, args.model_dir)  # None: random weights on the device
    lora = LoraConfig(rank=RANK, seed=0)
    initial = lora_mod.initial_state(lora_mod.projections(arch, lora), lora)
    engine.create("m", "base", lora, AdapterState({k: {"param": v} for k, v in initial.items()}))
    request = batch(arch.vocab_size, args.sequences, args.length)
    adam = AdamParams(learning_rate=1e-4)

    def step() -> None:
        engine.forward_backward("base", [(0, "m", request)])
        engine.optim_steps([("m", adam)])

    def sync() -> None:
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    seconds = timed(step, args.warmup, args.steps, sync)
    if dist.get_rank() == 0:
        memory = torch.cuda.max_memory_allocated() if engine.device.type == "cuda" else None
        Path(args.out).write_text(json.dumps({"seconds": seconds, "peak_memory": memory}))


def run_shape(args: argparse.Namespace, shape: str, work: Path, model_dir: str | None) -> dict:
    tp, pp = (int(x) for x in shape.split("x"))
    out = work / f"{shape}.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(tp * pp), __file__, "--rank-main",
        "--shape", shape, "--work", str(work), "--out", str(out), "--device", args.device,
        "--model", args.model, "--sequences", str(args.sequences), "--length", str(args.length),
        "--warmup", str(args.warmup), "--steps", str(args.steps),
    ]  # fmt: skip
    if model_dir:
        command += ["--model-dir", model_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{shape} failed:\n{run.stderr[-4000:]}")
    return json.loads(out.read_text())


def hf_seconds(args: argparse.Namespace, work: Path, model_dir: str) -> float:
    """The HF backend's step on the same model and batch, in this process, one thread."""
    import torch

    from tinkerd.hf_backend import HFBackend
    from tinkerd.types import AdamParams, CreateModel, LoraConfig, OptimStep

    torch.set_num_threads(1)
    backend = HFBackend(work / "hf", args.device)
    backend.create_model("m", CreateModel(model_dir, LoraConfig(rank=RANK, seed=0)))
    request = batch(model_config(args.model).vocab_size, args.sequences, args.length)
    adam = OptimStep(AdamParams(learning_rate=1e-4))

    def step() -> None:
        backend.forward_backward([("m", request)])
        backend.optim_step("m", adam)

    return timed(step, args.warmup, args.steps, lambda: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["small", "8b"], default="small")
    parser.add_argument("--configs", default="1x1,2x1,1x2", help="TPxPP shapes to time")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="(--rank-main) where rank 0 writes its timing")
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args)
        return
    import train_step

    tokens = args.sequences * args.length
    with tempfile.TemporaryDirectory(prefix="tinkerd-megatron-step-") as tmp:
        work = Path(tmp)
        model_dir = None
        if args.model == "small":
            model_dir = str(train_step.write_model(work / "small", model_config("small")))
        print(
            f"Megatron backend, {args.model} model, {args.sequences} x {args.length} tokens, "
            f"LoRA rank {RANK} on every projection, device {args.device}, one thread per rank"
        )
        rows: dict[str, float] = {}
        if model_dir is not None:
            rows["hf backend"] = hf_seconds(args, work, model_dir)
        for shape in args.configs.split(","):
            result = run_shape(args, shape, work, model_dir)
            rows[f"megatron tp x pp = {shape}"] = result["seconds"]
            if result["peak_memory"]:
                print(f"   {shape}: peak GPU memory {result['peak_memory'] / 2**30:.1f} GiB")
        first = next(k for k in rows if k.startswith("megatron"))
        config = model_config(args.model)
        flops = train_step.flops_per_token(config, (args.length + 1) / 2, RANK)
        name, peak = train_step.peak_flops(args.device)
        print(f"   {'':28} {'s/step':>8} {'tokens/s':>10} {'vs ' + first[-3:]:>8}  MFU")
        for label, seconds in rows.items():
            per_s = tokens / seconds
            mfu = f"{per_s * flops / peak:.1%}" if peak else "-"
            ratio = rows[first] / seconds
            print(f"   {label:28} {seconds:8.3f} {per_s:10,.0f} {ratio:7.2f}x  {mfu}")


if __name__ == "__main__":
    main()
