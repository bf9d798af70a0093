"""The Megatron backend on the CPU over gloo, in real torchrun process groups.

Parity against the HF backend (transformers + PEFT) on the same weights, at TP=1, TP=2 and
TP=2 x PP=2, on a small random Llama (tinkerd/tiny, whose odd vocabulary is padded at TP=2) and a
small random Qwen3 (q/k norms, tied embeddings): forward logprobs and every registry loss,
gradients, AdamW steps, two models in one pass, PEFT checkpoints both ways, sampling
(tests/megatron_parity.py does the comparing, on rank 0). Then the SDK trains through
`tinkerd serve --backend megatron --tp 2` with the same losses as through the HF backend.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(ranks: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tinkerd.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("megatron-models")
    llama = root / "llama"
    build_tiny_model(str(llama))
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
    Qwen3ForCausalLM(config).save_pretrained(root / "qwen3")
    return [str(llama), str(root / "qwen3")]


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2)], ids=["tp1", "tp2", "tp2xpp2"])
def test_matches_the_hf_backend(models: list[str], tmp_path: Path, tp: int, pp: int) -> None:
    out = tmp_path / "diffs.json"
    run = torchrun(tp * pp, "tests/megatron_parity.py", str(tp), str(pp), str(tmp_path),
                   str(out), *models)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    report = json.loads(out.read_text())
    assert set(report) == {"llama", "qwen3"}
    for model, diffs in report.items():
        assert len(diffs) == 20, diffs
        for what, diff in diffs.items():
            assert diff <= TOLERANCE, f"{model} at tp={tp} pp={pp}: {what} differs by {diff}"
