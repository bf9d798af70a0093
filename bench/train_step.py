"""Where tinkerd's training engine stands: memory, packing, many adapters, tokens/s and MFU.

Drives the engine in process through `tinkerd.hf_backend.HFBackend` exactly as the worker does
(create_model, forward_backward with a list of (model_id, ForwardBackward), optim_step), on random
models written here (nothing is downloaded), and compares it with baselines run in this same
process or, for memory, in fresh subprocesses of the same script:

1. memory: the peak memory growth of one forward_backward of 2 x 1,536 tokens on a model with
   Qwen's 151,936-token vocabulary (a small random Qwen3: hidden 64, 2 layers), against the size
   of the fp32 logits (2 * 1536 * 151936 * 4 bytes = 1.74 GiB), for tinkerd and for a plain
   transformers + PEFT step that computes the full logits. Each figure comes from a fresh
   subprocess: after a warm-up step that allocates the model, adapter, gradients and optimizer
   state, the peak RSS is reset (/proc/self/clear_refs) and the growth is VmHWM after the step
   minus VmRSS before it; on CUDA, max_memory_allocated minus memory_allocated. Goal: < 0.25x.
2. mixed lengths: 8 sequences of 33..512 tokens (lengths evenly spread, random tokens, fixed seed)
   on a small Llama (hidden 256, 4 layers, vocab 4096: bench/overhead.py's small model),
   forward_backward + optim_step: tinkerd's steps/s over a plain padded transformers + PEFT loop
   (same LoRA rank and targets, fused AdamW). Goal: >= 1.5x.
3. many adapters: 1, 2, 4, 8, 16 LoRA models on the small model's base, each with its own batch
   (4 x 64 tokens; --adapter-batch): one forward_backward call holding every model's request,
   then their optim steps, against the same models one after another (one call each). Goal: 8 at
   once >= 1.5x.
4. throughput: real (unpadded) tokens/s of a training step; on CUDA, also the step of an
   8B-shaped random model (the Qwen3-8B config, bf16 base, adapters as the engine makes them)
   and its MFU, as docs/architecture.md defines it. On the CPU the 8B model is skipped.

Timed parts alternate rounds of tinkerd and the baseline and report each side's best round, to
discount other processes on the machine (their CPU use during the timed runs is printed as "other
load", in cores; figures from a busy machine are noise). On the CPU torch runs one thread unless
--threads says otherwise. --engine-arg NAME=VALUE passes an option to HFBackend (for instance
activation_checkpointing=true).

    .venv/bin/python bench/train_step.py --quick            # CPU, a few minutes
    .venv/bin/python bench/train_step.py                    # CPU, more steps and rounds
    python3 bench/train_step.py --device cuda --out r.json  # GPU, with the 8B model (bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tinkerd without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from overhead import busy_jiffies  # noqa: E402 - a sibling bench script

from tinkerd.hf_backend import HFBackend  # noqa: E402
from tinkerd.loss_functions import get_loss, resolve_config  # noqa: E402
from tinkerd.types import (  # noqa: E402
    AdamParams,
    CreateModel,
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    LoraConfig,
    OptimStep,
)

GIB = 1024**3
RANK = 32  # tinker's default LoRA rank
LORA_ALPHA = 32  # what tinkerd uses for every rank (tinkerd.types.LoraConfig.alpha)
LEARNING_RATE = 1e-4
QWEN_VOCAB = 151_936
MEMORY_BATCH = (2, 1536)  # sequences x tokens of the memory measurement
MIXED_LENGTHS = (33, 512, 8)  # shortest, longest, how many
ADAPTER_COUNTS = (1, 2, 4, 8, 16)
ADAPTER_BATCH = (4, 64)  # each model's own batch in the many-adapters part
GOALS = {"memory": 0.25, "mixed": 1.5, "adapters_8": 1.5}

# Dense bf16 tensor-core peak, by a substring of torch.cuda.get_device_name(), first match wins.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
)


# -- models, written here with random weights ------------------------------------------------------


def qwen3_config(**overrides: Any):
    """A Qwen3 config: Qwen3-8B's shape unless overridden (hidden 4096, 36 layers, 32 heads,
    8 kv heads, head_dim 128, intermediate 12288, vocab 151936, untied embeddings)."""
    from transformers import Qwen3Config

    shape: dict[str, Any] = {
        "vocab_size": QWEN_VOCAB,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }
    shape.update(overrides)
    return Qwen3Config(**shape)


def memory_model_config():
    """Qwen's vocabulary on a body small enough to step on a CPU in seconds."""
    return qwen3_config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    )


def small_model_config():
    """bench/overhead.py's small model."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


def write_model(path: Path, config: Any, seed: int = 0) -> Path:
    """Random fp32 weights from `config`, saved as a model directory the engine loads."""
    from transformers import AutoModelForCausalLM

    if (path / "config.json").is_file():
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    del model
    gc.collect()
    return path


class ConfigBackend(HFBackend):
    """The engine with its base built from a config.json alone, random weights made on the
    device: writing and reading an 8B model's 16 GB only to benchmark it would take minutes.
    Everything after the base's weights is the engine's own path."""

    def _from_pretrained(self, source: Any) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(source.location)
        with torch.device(self.device):
            return AutoModelForCausalLM.from_config(config, dtype=self.dtype)


# -- data ------------------------------------------------------------------------------------------


def make_datums(rng: np.random.Generator, lengths: list[int], vocab: int) -> list[Datum]:
    """Random next-token data: each datum's targets are its tokens shifted by one."""
    datums = []
    for n in lengths:
        ids = rng.integers(0, vocab, n + 1)
        datums.append(
            Datum(
                ids[:-1].astype(np.int64),
                {
                    "target_tokens": ids[1:].astype(np.int64),
                    "weights": np.ones(n, np.float32),
                },
            )
        )
    return datums


def make_request(datums: list[Datum]) -> ForwardBackward:
    """A cross_entropy forward_backward, checked as the API checks a decoded one."""
    try:  # the API's own check; it loads the tinker SDK's schema, absent from a bare GPU box
        from tinkerd.config import InputLimits
        from tinkerd.wire.decode import make_forward_backward
    except ImportError:
        loss = get_loss("cross_entropy")
        return ForwardBackward(datums, loss.name, resolve_config(loss, {}), False)
    limits = InputLimits(max_datums=1 << 20, max_request_tokens=1 << 40)
    return make_forward_backward(datums, "cross_entropy", {}, False, limits)


def mixed_lengths() -> list[int]:
    low, high, n = MIXED_LENGTHS
    return [int(round(x)) for x in np.linspace(low, high, n)]


# -- the two sides ---------------------------------------------------------------------------------


class Engine:
    """tinkerd's engine, driven as the worker drives it."""

    def __init__(self, model_dir: Path, device: str, engine_args: dict[str, Any], cls=HFBackend):
        self.data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=model_dir.parent))  # cleaned up
        self.backend = cls(self.data_dir, device=device, **engine_args)
        self.model_dir = model_dir
        self.adam = OptimStep(AdamParams(learning_rate=LEARNING_RATE))

    def create(self, model_id: str, seed: int = 0) -> int:
        created = self.backend.create_model(
            model_id, CreateModel(str(self.model_dir), LoraConfig(rank=RANK, seed=seed))
        )
        return int(created.get("trainable_params", 0))

    def forward_backward(self, requests: list[tuple[str, ForwardBackward]]) -> None:
        results = self.backend.forward_backward(requests)
        for (model_id, _), result in zip(requests, results, strict=True):
            if not isinstance(result, ForwardBackwardResult):
                raise RuntimeError(f"forward_backward of {model_id} failed: {result}")

    def optim_steps(self, model_ids: list[str]) -> None:
        """The models' optimizer steps: in one call where the engine has a batched one."""
        batched = getattr(self.backend, "optim_steps", None)
        if batched is not None and len(model_ids) > 1:
            results = batched([(m, self.adam) for m in model_ids])
            for model_id, result in zip(model_ids, results, strict=True):
                if isinstance(result, Exception):
                    raise RuntimeError(f"optim_step of {model_id} failed: {result}")
            return
        for model_id in model_ids:
            self.backend.optim_step(model_id, self.adam)

    def step(self, requests: list[tuple[str, ForwardBackward]]) -> None:
        self.forward_backward(requests)
        self.optim_steps(list(dict.fromkeys(m for m, _ in requests)))


class PeftLoop:
    """The baseline: a plain padded transformers + PEFT training step, full logits."""

    def __init__(self, model_dir: Path, device: str) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device)
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        config = PeftLoraConfig(
            r=RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets, bias="none"
        )
        self.model = get_peft_model(model, config)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LEARNING_RATE, fused=True)

    def forward_backward(self, datums: list[Datum]) -> None:
        width = max(len(d.tokens) for d in datums)
        lengths = torch.tensor([len(d.tokens) for d in datums], device=self.device)
        ids = torch.zeros(len(datums), width, dtype=torch.long)
        targets = torch.zeros_like(ids)
        weights = torch.zeros(len(datums), width)
        for i, d in enumerate(datums):
            n = len(d.tokens)
            ids[i, :n] = torch.from_numpy(d.tokens)
            targets[i, :n] = torch.from_numpy(d.loss_fn_inputs["target_tokens"])
            weights[i, :n] = torch.from_numpy(d.loss_fn_inputs["weights"])
        ids, targets, weights = (t.to(self.device) for t in (ids, targets, weights))
        padded = any(len(d.tokens) < width for d in datums)
        mask = (
            (torch.arange(width, device=self.device) < lengths[:, None]).long() if padded else None
        )
        logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        logprobs = -torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), reduction="none"
        ).view_as(targets)
        loss = -(logprobs * weights).sum()
        loss.backward()
        float(loss.detach())  # waits for the device, as the engine's results do

    def step(self, datums: list[Datum]) -> None:
        self.forward_backward(datums)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# -- timing ----------------------------------------------------------------------------------------


@dataclass
class Timing:
    steps: int
    seconds: float
    other_load: float | None  # CPU cores busy with other processes meanwhile (Linux)

    @property
    def per_second(self) -> float:
        return self.steps / self.seconds


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: str) -> Timing:
    for _ in range(warmup):
        step()
    sync(device)
    busy0, own0 = busy_jiffies(), time.process_time()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    load = None
    busy1 = busy_jiffies()
    if busy0 is not None and busy1 is not None:
        other = (busy1 - busy0) / os.sysconf("SC_CLK_TCK") - (time.process_time() - own0)
        load = max(0.0, other / seconds)
    return Timing(steps, seconds, load)


def best_of(rounds: int, sides: dict[str, Callable[[], Timing]]) -> dict[str, Timing]:
    """Rounds of each side in turn; each side's fastest round."""
    best: dict[str, Timing] = {}
    for _ in range(rounds):
        for name, run in sides.items():
            t = run()
            if name not in best or t.per_second > best[name].per_second:
                best[name] = t
    return best


def _load(t: Timing) -> str:
    return "n/a" if t.other_load is None else f"{t.other_load:.2f}"


# -- 1. memory -------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(side: str, model_dir: Path, device: str, engine_args: dict[str, Any]) -> dict:
    """In a fresh process: the growth of peak memory over one forward_backward."""
    rng = np.random.default_rng(0)
    vocab = QWEN_VOCAB
    batch, length = MEMORY_BATCH
    warm = make_datums(rng, [16, 16], vocab)
    datums = make_datums(rng, [length] * batch, vocab)
    if side == "tinkerd":
        engine = Engine(model_dir, device, engine_args)
        engine.create("m")
        engine.step([("m", make_request(warm))])  # adapter, gradients, optimizer state
        request = make_request(datums)

        def run() -> None:
            engine.forward_backward([("m", request)])
    else:
        loop = PeftLoop(model_dir, device)
        loop.step(warm)

        def run() -> None:
            loop.forward_backward(datums)

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return {"growth": torch.cuda.max_memory_allocated() - before, "how": "cuda allocated"}
    try:  # reset VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        how = "VmHWM after - VmRSS before (peak reset)"
    except OSError:
        how = "VmHWM after - VmRSS before (peak NOT reset: an upper bound)"
    before = _status_kib("VmRSS")
    run()
    return {"growth": (_status_kib("VmHWM") - before) * 1024, "how": how}


def bench_memory(work: Path, device: str, engine_args: dict[str, Any]) -> dict[str, Any]:
    batch, length = MEMORY_BATCH
    logits_bytes = batch * length * QWEN_VOCAB * 4
    print(
        f"\n1. memory: one forward_backward of {batch} x {length} tokens, vocab {QWEN_VOCAB}; "
        f"fp32 logits = {logits_bytes / GIB:.2f} GiB"
    )
    model_dir = write_model(work / "qwen-vocab", memory_model_config())
    out: dict[str, Any] = {"fp32_logits_bytes": logits_bytes}
    for side in ("tinkerd", "peft"):
        command = [
            sys.executable,
            __file__,
            "--memory-child",
            side,
            "--model-dir",
            str(model_dir),
            "--device",
            device,
            "--engine-args",
            json.dumps(engine_args),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"memory measurement of {side} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        ratio = result["growth"] / logits_bytes
        out[side] = {"growth_bytes": result["growth"], "ratio": ratio}
        label = "tinkerd" if side == "tinkerd" else "PEFT loop"
        print(
            f"   {label:<10} peak growth {result['growth'] / GIB:6.2f} GiB = {ratio:5.2f}x "
            f"the fp32 logits   ({result['how']})"
        )
    print(f"   goal: tinkerd < {GOALS['memory']}x")
    return out


# -- 2. mixed lengths ------------------------------------------------------------------------------


def bench_mixed(
    work: Path, device: str, engine_args: dict[str, Any], warmup: int, steps: int, rounds: int
) -> dict[str, Any]:
    lengths = mixed_lengths()
    tokens = sum(lengths)
    padded = len(lengths) * max(lengths)
    print(
        f"\n2. mixed lengths: {len(lengths)} sequences of {lengths[0]}..{lengths[-1]} tokens "
        f"({tokens} tokens, {1 - tokens / padded:.0%} padding when padded), small model, "
        "forward_backward + optim_step"
    )
    model_dir = write_model(work / "small", small_model_config())
    datums = make_datums(np.random.default_rng(1), lengths, 4096)
    engine = Engine(model_dir, device, engine_args)
    engine.create("m")
    request = make_request(datums)
    loop = PeftLoop(model_dir, device)
    best = best_of(
        rounds,
        {
            "tinkerd": lambda: time_steps(
                lambda: engine.step([("m", request)]), warmup, steps, device
            ),
            "peft": lambda: time_steps(lambda: loop.step(datums), warmup, steps, device),
        },
    )
    ratio = best["tinkerd"].per_second / best["peft"].per_second
    for name, label in (("peft", "PEFT loop"), ("tinkerd", "tinkerd")):
        t = best[name]
        print(
            f"   {label:<10} {t.per_second:7.2f} steps/s  {t.per_second * tokens:9.0f} tokens/s "
            f"  other load {_load(t)}"
        )
    print(f"   ratio tinkerd / PEFT loop: {ratio:.2f}x   (goal >= {GOALS['mixed']}x)")
    return {
        "lengths": lengths,
        "tokens": tokens,
        "tinkerd_steps_per_s": best["tinkerd"].per_second,
        "peft_steps_per_s": best["peft"].per_second,
        "tinkerd_tokens_per_s": best["tinkerd"].per_second * tokens,
        "peft_tokens_per_s": best["peft"].per_second * tokens,
        "ratio": ratio,
    }


# -- 3. many adapters ------------------------------------------------------------------------------


def bench_adapters(
    work: Path,
    device: str,
    engine_args: dict[str, Any],
    counts: tuple[int, ...],
    per_model: int,
    length: int,
    warmup: int,
    steps: int,
    rounds: int,
) -> dict[str, Any]:
    print(
        f"\n3. many adapters on one base (small model), each model {per_model} x {length} tokens:"
        " one call with every model's request vs one call per model"
    )
    model_dir = write_model(work / "small", small_model_config())
    engine = Engine(model_dir, device, engine_args)
    rng = np.random.default_rng(2)
    models = [f"m{i}" for i in range(max(counts))]
    requests = []
    for i, model_id in enumerate(models):
        engine.create(model_id, seed=i)
        requests.append((model_id, make_request(make_datums(rng, [length] * per_model, 4096))))
    out: dict[str, Any] = {}
    print(f"   {'models':>6} {'at once':>14} {'one by one':>14} {'ratio':>7}  other load")
    for k in counts:
        batch = requests[:k]

        def sequential(batch: list[tuple[str, ForwardBackward]] = batch) -> None:
            for request in batch:
                engine.step([request])

        best = best_of(
            rounds,
            {
                "once": lambda b=batch: time_steps(lambda: engine.step(b), warmup, steps, device),
                "seq": lambda: time_steps(sequential, warmup, steps, device),
            },
        )
        ratio = best["once"].per_second / best["seq"].per_second
        out[str(k)] = {
            "at_once_steps_per_s": best["once"].per_second,
            "sequential_steps_per_s": best["seq"].per_second,
            "ratio": ratio,
        }
        print(
            f"   {k:>6} {best['once'].per_second:8.2f} rounds/s {best['seq'].per_second:6.2f} "
            f"rounds/s {ratio:6.2f}x  {_load(best['once'])} / {_load(best['seq'])}"
        )
    print(
        f"   (a round: every model's forward_backward + optim_step) goal: 8 at once >= "
        f"{GOALS['adapters_8']}x"
    )
    return out


# -- 4. throughput and MFU -------------------------------------------------------------------------


def matmul_params(config: Any, rank: int = RANK) -> tuple[int, int]:
    """(frozen, LoRA) parameters of the matmuls a token goes through, from a Llama/Qwen-style
    config: q, k, v, o, gate, up, down in every layer and lm_head, LoRA of `rank` on each (the
    engine's default targets). The input embedding is a lookup, not a matmul."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    shapes = [  # (in, out) of each Linear of one layer
        (h, heads * head_dim),
        (h, kv * head_dim),
        (h, kv * head_dim),
        (heads * head_dim, h),
        (h, inter),
        (h, inter),
        (inter, h),
    ]
    layers = config.num_hidden_layers
    frozen = layers * sum(i * o for i, o in shapes) + h * vocab
    lora = layers * sum(rank * (i + o) for i, o in shapes) + rank * (h + vocab)
    return frozen, lora


def flops_per_token(config: Any, mean_context: float, rank: int = RANK) -> float:
    """Useful training FLOPs per token (docs/architecture.md, MFU): 2N forward and 2N
    backward through the activations for the frozen matmul weights N; 2 + 2 + 2 (the weight
    gradient too) for each LoRA weight; causal attention, 4 x heads x head_dim per attended
    position forward and twice that backward, in every layer. Recomputation is not counted."""
    frozen, lora = matmul_params(config, rank)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 12 * config.num_hidden_layers * heads * head_dim * mean_context
    return 4 * frozen + 6 * lora + attention


def peak_flops(device: str) -> tuple[str, float | None]:
    if not device.startswith("cuda"):
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return name, flops
    return name, None


def bench_8b(
    work: Path,
    device: str,
    engine_args: dict[str, Any],
    layers: int,
    batch: int,
    length: int,
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    config = qwen3_config(num_hidden_layers=layers)
    model_dir = work / "qwen3-8b-shape"
    model_dir.mkdir(exist_ok=True)
    config.save_pretrained(model_dir)  # config.json only: ConfigBackend makes the weights
    started = time.perf_counter()
    engine = Engine(model_dir, device, engine_args, cls=ConfigBackend)
    dtype = str(getattr(engine.backend, "dtype", "?")).removeprefix("torch.")
    print(
        f"\n4b. 8B-shaped model (Qwen3-8B config, {layers} layers, {dtype} base), "
        f"forward_backward + optim_step of {batch} x {length} tokens"
    )
    lora = engine.create("m")
    frozen, counted = matmul_params(config)
    print(
        f"   built in {time.perf_counter() - started:.0f} s; {frozen / 1e9:.2f} B matmul and "
        f"{lora / 1e6:.1f} M LoRA parameters (the MFU count assumes {counted / 1e6:.1f} M)"
    )
    rng = np.random.default_rng(3)
    while True:
        request = make_request(make_datums(rng, [length] * batch, QWEN_VOCAB))
        try:
            t = time_steps(lambda r=request: engine.step([("m", r)]), warmup, steps, device)
            break
        except RuntimeError as e:
            if "out of memory" not in str(e) or batch == 1:
                raise
            print(f"   {batch} x {length} tokens ran out of memory; halving the batch")
            batch //= 2
            torch.cuda.empty_cache()
    tokens = batch * length
    flops = flops_per_token(config, (length + 1) / 2)  # each token sees (its position + 1)
    name, peak = peak_flops(device)
    tokens_per_s = t.per_second * tokens
    achieved = tokens_per_s * flops
    mfu = achieved / peak if peak else None
    peak_memory = torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None
    print(
        f"   {t.per_second:.3f} steps/s  {tokens_per_s:,.0f} tokens/s  "
        f"{flops / 1e9:.1f} GFLOP/token  {achieved / 1e12:.1f} TFLOP/s"
    )
    if mfu is not None:
        print(f"   MFU {mfu:.1%} of {name}'s {peak / 1e12:.0f} TFLOP/s (bf16 dense)")
    else:
        print(f"   MFU: no peak FLOP/s known for {name!r} (bench/train_step.py PEAK_BF16_FLOPS)")
    if peak_memory is not None:
        print(f"   peak GPU memory allocated {peak_memory:.1f} GiB")
    return {
        "device_name": name,
        "layers": layers,
        "batch": batch,
        "length": length,
        "steps_per_s": t.per_second,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "tflops": achieved / 1e12,
        "peak_flops": peak,
        "mfu": mfu,
        "peak_memory_gib": peak_memory,
        "lora_params": lora,
    }


# -- main ------------------------------------------------------------------------------------------


def parse_engine_args(pairs: list[str]) -> dict[str, Any]:
    """NAME=VALUE pairs for HFBackend's constructor; values read as JSON when they parse."""
    known = inspect.signature(HFBackend.__init__).parameters
    args: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in known or name in ("self", "data_dir", "device"):
            options = ", ".join(p for p in known if p not in ("self", "data_dir", "device"))
            raise SystemExit(f"--engine-arg {pair!r}: HFBackend takes NAME=VALUE of: {options}")
        try:
            args[name] = json.loads(value)
        except json.JSONDecodeError:
            args[name] = value
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds: noisy")
    parser.add_argument(
        "--parts",
        default="memory,mixed,adapters,8b",
        help="comma-separated subset of memory,mixed,adapters,8b (default: all)",
    )
    parser.add_argument("--steps", type=int, help="timed steps per round (default 8; 3 quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; 1 quick)")
    parser.add_argument("--rounds", type=int, help="rounds per side, best kept (default 3; 1)")
    parser.add_argument(
        "--counts", default=",".join(map(str, ADAPTER_COUNTS)), help="adapter counts (part 3)"
    )
    parser.add_argument(
        "--adapter-batch",
        default="x".join(map(str, ADAPTER_BATCH)),
        help="each model's batch in part 3, SEQUENCESxTOKENS (%(default)s)",
    )
    parser.add_argument("--big-layers", type=int, default=36, help="8B model's layers (36)")
    parser.add_argument(
        "--big-batch", default="4x1024", help="8B model's batch, SEQUENCESxTOKENS (4x1024)"
    )
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="keyword argument for HFBackend(...), e.g. an activation-checkpointing option",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads; 0: torch's own choice (default on CUDA). Default on the "
        "CPU: 1, as on a shared machine torch's spinning OpenMP threads make a step 5-40x "
        "slower whenever another process holds a core, on either side",
    )
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--memory-child", choices=["tinkerd", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--engine-args", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads if args.threads is not None else (0 if "cuda" in args.device else 1)
    if threads:
        torch.set_num_threads(threads)
    if args.memory_child:
        result = memory_child(
            args.memory_child, args.model_dir, args.device, json.loads(args.engine_args)
        )
        print(json.dumps(result))
        return 0

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    engine_args = parse_engine_args(args.engine_arg)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"memory", "mixed", "adapters", "8b"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}")
    steps = args.steps or (3 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    rounds = args.rounds or (1 if args.quick else 3)
    counts = tuple(int(c) for c in args.counts.split(","))
    big_batch, big_length = (int(x) for x in args.big_batch.lower().split("x"))
    adapter_batch, adapter_length = (int(x) for x in args.adapter_batch.lower().split("x"))
    name = torch.cuda.get_device_name(torch.device(device)) if device != "cpu" else "cpu"
    print(
        f"tinkerd training engine vs transformers + PEFT: device {device} ({name}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, LoRA rank {RANK} on every "
        f"Linear layer, engine args {engine_args or '{}'}"
    )
    results: dict[str, Any] = {
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "engine_args": engine_args,
        "quick": args.quick,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tinkerd-train-step-") as tmp:
        work = Path(tmp)
        if "memory" in parts:
            results["memory"] = bench_memory(work, device, engine_args)
        if "mixed" in parts:
            results["mixed"] = bench_mixed(work, device, engine_args, warmup, steps, rounds)
            print(
                f"\n4a. tokens/s of a training step, small model, mixed lengths: tinkerd "
                f"{results['mixed']['tinkerd_tokens_per_s']:,.0f} (PEFT loop "
                f"{results['mixed']['peft_tokens_per_s']:,.0f})"
            )
        if "adapters" in parts:
            results["adapters"] = bench_adapters(
                work,
                device,
                engine_args,
                counts,
                adapter_batch,
                adapter_length,
                warmup,
                steps,
                rounds,
            )
        if "8b" in parts:
            if device.startswith("cuda"):
                results["8b"] = bench_8b(
                    work,
                    device,
                    engine_args,
                    args.big_layers,
                    big_batch,
                    big_length,
                    warmup,
                    max(steps, 5),
                )
            else:
                print(
                    "\n4b. 8B-shaped model: skipped on the CPU (16 GB of bf16 weights and a step "
                    "of minutes; MFU is defined against a GPU's peak: --device cuda)"
                )
    results["seconds"] = time.perf_counter() - started
    print(f"\ndone in {results['seconds']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
