"""Run under torchrun by tests/test_megatron.py: the Megatron backend against the HF backend on the
same weights, in one process group of tp x pp ranks.

    torchrun --nproc-per-node N tests/megatron_parity.py TP PP WORKDIR OUT.json MODEL_DIR...
    python tests/megatron_parity.py --build DIR     # writes the two test models, prints their dirs

Both backends run in float32 on $TINKERD_PARITY_DEVICE (default cpu; bench/megatron_gpu.sh: cuda).

Rank 0 drives `MegatronBackend` exactly as the worker does, and beside it an `HFBackend` (the
independent computation: transformers + PEFT), sharing one checkpoint store; the other ranks follow.
For each model it records the largest difference of every compared quantity in OUT.json.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")

from tinkerd.backends import BackendOptions  # noqa: E402
from tinkerd.loss_functions import LOSSES, resolve_config  # noqa: E402
from tinkerd.types import (  # noqa: E402
    AdamParams,
    CreateModel,
    Datum,
    ForwardBackward,
    LoadWeights,
    LoraConfig,
    OptimStep,
    Sample,
    SamplerWeights,
    SamplingParams,
    SaveWeights,
)


def datums(rng: np.random.Generator, vocab: int, lengths: list[int]) -> list[Datum]:
    out = []
    for n in lengths:
        tokens = rng.integers(0, vocab, n + 1)
        out.append(
            Datum(
                tokens[:-1],
                {
                    "target_tokens": tokens[1:],
                    "weights": rng.uniform(0.5, 1.5, n).astype(np.float32),
                    "logprobs": -rng.uniform(3, 9, n).astype(np.float32),
                    "advantages": rng.normal(size=n).astype(np.float32),
                },
            )
        )
    return out


def request(batch: list[Datum], loss: str, forward_only: bool = False) -> ForwardBackward:
    names = LOSSES[loss].inputs
    kept = [
        Datum(d.tokens, {k: v for k, v in d.loss_fn_inputs.items() if k in names}) for d in batch
    ]
    return ForwardBackward(kept, loss, resolve_config(LOSSES[loss], {}), forward_only=forward_only)


def result_diff(a, b) -> float:
    """Largest difference of per-datum logprobs and elementwise losses, and of the loss."""
    worst = abs(a.metrics["loss:sum"] - b.metrics["loss:sum"]) / max(
        1.0, abs(b.metrics["loss:sum"])
    )
    for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
        for key in ("logprobs", "elementwise_loss"):
            worst = max(worst, float(np.abs(x[key] - y[key]).max()))
    return worst


def checkpoint_diff(directory_a: Path, directory_b: Path) -> dict[str, float]:
    """Largest difference of adapter weights, AdamW moments and gradients of two checkpoints."""
    from safetensors.torch import load_file

    out = {}
    a, b = (load_file(d / "adapter_model.safetensors") for d in (directory_a, directory_b))
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    out["weights"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    if (directory_a / "optimizer.pt").is_file():
        oa, ob = (
            torch.load(d / "optimizer.pt", weights_only=True) for d in (directory_a, directory_b)
        )
        assert oa["steps"] == ob["steps"]
        sa, sb = oa["optimizer"]["state"], ob["optimizer"]["state"]
        assert sa.keys() == sb.keys()
        out["adam"] = max(
            [
                float((sa[i][m] - sb[i][m]).abs().max())
                for i in sa
                for m in ("exp_avg", "exp_avg_sq")
            ],
            default=0.0,
        )
    if (directory_a / "gradients.pt").is_file():
        ga, gb = (
            torch.load(d / "gradients.pt", weights_only=True) for d in (directory_a, directory_b)
        )
        scale = max(1.0, max(float(y.abs().max()) for y in gb))  # relative to the largest
        out["gradients"] = (
            max(float((x - y).abs().max()) for x, y in zip(ga, gb, strict=True)) / scale
        )
    return out


def compare(mg, hf, model_dir: str, vocab: int) -> dict[str, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    store = mg.store
    diffs: dict[str, float] = {}
    lora = LoraConfig(rank=4, seed=11)
    tag = Path(model_dir).name
    for backend in (mg, hf):
        backend.create_model(f"{tag}-a", CreateModel(model_dir, lora))
        backend.create_model(
            f"{tag}-b", CreateModel(model_dir, LoraConfig(rank=8, seed=12, train_attn=False))
        )
    a, b = f"{tag}-a", f"{tag}-b"

    def save(backend, model_id: str, name: str, **kw) -> Path:
        path = f"tinker://{model_id}/weights/{name}"
        backend.save_weights(model_id, SaveWeights(path, "weights", **kw))
        return store.directory(store_path(path))

    d_mg, d_hf = save(mg, a, "mg-init"), save(hf, a, "hf-init")
    diffs["initial weights"] = checkpoint_diff(d_mg, d_hf)["weights"]
    # One step, so that every LoRA B is non-zero and every gradient below means something.
    adam = OptimStep(AdamParams(learning_rate=2e-2, grad_clip_norm=1.0))
    first = request(datums(rng, vocab, [9, 4]), "cross_entropy")
    for backend in (mg, hf):
        [r] = backend.forward_backward([(a, first)])
        backend.optim_step(a, adam)
    batch = datums(rng, vocab, [13, 5, 8])
    for loss in LOSSES:
        [x] = mg.forward_backward([(a, request(batch, loss, forward_only=True))])
        [y] = hf.forward_backward([(a, request(batch, loss, forward_only=True))])
        diffs[f"forward {loss}"] = result_diff(x, y)
    # Two models in one pass, one of them with two requests (their gradients add up), each
    # against its HF twin.
    both = [
        (a, request(batch, "ppo")),
        (b, request(datums(rng, vocab, [6, 11]), "cross_entropy")),
        (a, request(datums(rng, vocab, [3]), "cross_entropy")),
    ]
    xs, ys = mg.forward_backward(both), hf.forward_backward(both)
    diffs["forward_backward two models"] = max(
        result_diff(x, y) for x, y in zip(xs, ys, strict=True)
    )
    for model_id in (a, b):
        checked = checkpoint_diff(
            save(mg, model_id, "mg-grad", with_gradients=True),
            save(hf, model_id, "hf-grad", with_gradients=True),
        )
        diffs[f"gradients {model_id[-1]}"] = checked["gradients"]
    results = mg.optim_steps([(a, adam), (b, adam)]), hf.optim_steps([(a, adam), (b, adam)])
    diffs["grad norm"] = max(
        abs(x["grad_norm:mean"] - y["grad_norm:mean"]) / y["grad_norm:mean"]
        for x, y in zip(*results, strict=True)
    )
    for model_id in (a, b):
        checked = checkpoint_diff(save(mg, model_id, "mg-step"), save(hf, model_id, "hf-step"))
        diffs[f"weights after step {model_id[-1]}"] = checked["weights"]
        diffs[f"adam after step {model_id[-1]}"] = checked["adam"]
    # The PEFT round trip, both ways: HF and PEFT load what Megatron saved, Megatron what HF saved.
    probe = request(datums(rng, vocab, [10, 7]), "cross_entropy", forward_only=True)
    [mine] = mg.forward_backward([(a, probe)])
    hf.create_model(
        f"{tag}-from-mg", CreateModel(model_dir, lora, f"tinker://{a}/weights/mg-step", True)
    )
    [theirs] = hf.forward_backward([(f"{tag}-from-mg", probe)])
    diffs["megatron -> hf"] = result_diff(mine, theirs)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        str(store.directory(store_path(f"tinker://{a}/weights/mg-step"))),
    ).eval()
    worst = 0.0
    with torch.no_grad():
        for d, out in zip(probe.datums, mine.loss_fn_outputs, strict=True):
            logits = peft(torch.from_numpy(d.tokens)[None]).logits[0].float()
            lp = torch.log_softmax(logits, -1).gather(
                -1, torch.from_numpy(d.loss_fn_inputs["target_tokens"])[:, None]
            )
            worst = max(worst, float(np.abs(lp[:, 0].numpy() - out["logprobs"]).max()))
    diffs["megatron -> PeftModel.from_pretrained"] = worst
    mg.create_model(
        f"{tag}-from-hf", CreateModel(model_dir, lora, f"tinker://{a}/weights/hf-step", True)
    )
    [x] = mg.forward_backward([(f"{tag}-from-hf", probe)])
    [y] = hf.forward_backward([(a, probe)])
    diffs["hf -> megatron"] = result_diff(x, y)
    # load_weights with optimizer state, then one more step on both: the same weights.
    mg.load_weights(a, LoadWeights(f"tinker://{a}/weights/hf-step", with_optimizer=True))
    for backend in (mg, hf):
        backend.forward_backward([(a, request(batch, "importance_sampling"))])
        backend.optim_step(a, adam)
    diffs["load_weights + step"] = checkpoint_diff(save(mg, a, "mg-last"), save(hf, a, "hf-last"))[
        "weights"
    ]
    # Sampling from an in-memory snapshot: the same tokens and logprobs as the HF backend's.
    samples = []
    for backend in (mg, hf):
        backend.save_weights(
            a, SaveWeights(None, "sampler_weights", snapshot_id=f"snap-{tag}-{id(backend)}")
        )
        weights = SamplerWeights(model_dir, snapshot_id=f"snap-{tag}-{id(backend)}")
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop_tokens=())
        [s] = backend.sample([Sample(weights, np.array([1, 5, 9]), 2, params)])
        samples.append(s)
    diffs["sample tokens differ"] = float(
        any(
            (x.tokens != y.tokens).any()
            for x, y in zip(samples[0].sequences, samples[1].sequences, strict=True)
        )
    )
    diffs["sample logprobs"] = max(
        float(np.abs(x.logprobs - y.logprobs).max())
        for x, y in zip(samples[0].sequences, samples[1].sequences, strict=True)
    )
    for model_id in list(mg.held()["models"]):
        mg.remove_model(model_id)
    return diffs


def store_path(path: str):
    from tinkerd.storage import CheckpointPath

    return CheckpointPath.parse(path)


def build_models(root: Path) -> list[str]:
    """A small random Llama (tinkerd/tiny: its vocabulary of 909 is padded at TP=2), Qwen3 (q/k
    norms, tied embeddings, vocabulary 1001) and Qwen2 (q/k/v biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from tinkerd.tiny_model import build_tiny_model

    llama, qwen = root / "llama", root / "qwen3"
    build_tiny_model(str(llama))
    if not (qwen / "config.json").is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            config = Qwen3Config(
                vocab_size=1001,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                tie_word_embeddings=True,
                max_position_embeddings=256,
                eos_token_id=0,
            )
            Qwen3ForCausalLM(config).save_pretrained(qwen)
    qwen2 = root / "qwen2"
    if not (qwen2 / "config.json").is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            config = Qwen2Config(
                vocab_size=640,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
                max_position_embeddings=256,
                eos_token_id=0,
            )
            model = Qwen2ForCausalLM(config)
            with torch.no_grad():  # non-zero biases, so that their mapping is tested
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(0.0, 0.1)
            model.save_pretrained(qwen2)
    return [str(llama), str(qwen), str(qwen2)]


def main() -> None:
    import os

    if sys.argv[1] == "--build":
        print(" ".join(build_models(Path(sys.argv[2]))))
        return
    tp, pp, work, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    models = sys.argv[5:]
    device = os.environ.get("TINKERD_PARITY_DEVICE", "cpu")
    options = BackendOptions(work / "data", device, dtype="float32", tp=tp, pp=pp)
    if int(os.environ["RANK"]) != 0:
        from tinkerd.megatron.backend import follow, start_rank

        follow(start_rank(options))
        return
    from transformers import AutoConfig

    from tinkerd.hf_backend import HFBackend
    from tinkerd.megatron.backend import MegatronBackend

    mg = MegatronBackend(options)
    hf = HFBackend(work / "data", device, store=mg.store, dtype="float32")
    try:
        report = {}
        for model_dir in models:
            vocab = AutoConfig.from_pretrained(model_dir).vocab_size
            report[Path(model_dir).name] = compare(mg, hf, model_dir, vocab)
        out.write_text(json.dumps(report, indent=1))
    finally:
        mg.close()


if __name__ == "__main__":
    main()
