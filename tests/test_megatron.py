"""The Megatron backend on the CPU over gloo, in real torchrun process groups.

Parity against the HF backend (transformers + PEFT) on the same weights, at TP=1, TP=2 and
TP=2 x PP=2, on small random Llama (tinkerd/tiny, whose odd vocabulary is padded at TP=2), Qwen3
(q/k norms, tied embeddings) and Qwen2 (q/k/v biases) models: forward logprobs and every registry
loss, gradients, AdamW steps, two models (three requests) in one pass, PEFT checkpoints both ways,
sampling (tests/megatron_parity.py does the comparing, on rank 0). Then the SDK trains through
`tinkerd serve --backend megatron --tp 2` with the same losses as through the HF backend, across a
clean stop and restart; and a Megatron worker of a Redis cluster loses its model when a rank dies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5


def torchrun(ranks: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [
        # --standalone: torchrun picks its own free port (no race with a port chosen here)
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(ranks), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from megatron_parity import build_models

    return build_models(tmp_path_factory.mktemp("megatron-models"))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2)], ids=["tp1", "tp2", "tp2xpp2"])
def test_matches_the_hf_backend(models: list[str], tmp_path: Path, tp: int, pp: int) -> None:
    out = tmp_path / "diffs.json"
    run = torchrun(tp * pp, "tests/megatron_parity.py", str(tp), str(pp), str(tmp_path),
                   str(out), *models)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    report = json.loads(out.read_text())
    assert set(report) == {"llama", "qwen3", "qwen2"}
    for model, diffs in report.items():
        assert len(diffs) == 20, diffs
        for what, diff in diffs.items():
            assert diff <= TOLERANCE, f"{model} at tp={tp} pp={pp}: {what} differs by {diff}"


TOKENS = [5, 17, 42, 99, 300, 7, 8, 61, 23, 400, 12]


def sft_step(tc, adam, forward_backward_only: bool = False) -> float:
    from tinker import types

    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )
    loss = tc.forward_backward([datum], "cross_entropy").result(timeout=120)
    if not forward_backward_only:
        tc.optim_step(adam).result(timeout=120)
    return loss.metrics["loss:sum"]


def megatron_serve(data: Path, port: int, log: Path, tp: int = 2):
    from tinkerd.local_cluster import APIProcess

    args = ["--data-dir", str(data), "--device", "cpu", "--backend", "megatron", "--tp", str(tp)]
    return APIProcess(args, log, port, env={"HF_HUB_OFFLINE": "1"}).wait_ready(240)


@pytest.mark.timeout(600)
def test_the_sdk_trains_through_serve_with_the_hf_backends_losses(
    server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`tinkerd serve --backend megatron --tp 2`: SFT through the official SDK gives the HF
    backend's losses; a clean stop mid-step (gradients pending) and a restart go on exactly;
    sampling from the trained weights gives the HF backend's tokens."""
    import signal

    import tinker
    from tinker import types

    from tinkerd.local_cluster import free_port

    adam = types.AdamParams(learning_rate=0.02)
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=5)
    prompt = types.ModelInput.from_ints(TOKENS[:4])

    def first_half(tc) -> list[float]:
        return [sft_step(tc, adam), sft_step(tc, adam), sft_step(tc, adam, True)]

    def second_half(tc) -> list[float]:
        tc.optim_step(adam).result(timeout=120)
        return [sft_step(tc, adam), sft_step(tc, adam)]

    def sampled(tc) -> list[list[int]]:
        sampler = tc.save_weights_and_get_sampling_client().result(timeout=120)
        result = sampler.sample(prompt, num_samples=2, sampling_params=params).result(timeout=120)
        return [list(s.tokens) for s in result.sequences]

    hf = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
    twin = hf.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=3).result()
    expected = first_half(twin) + second_half(twin)
    expected_tokens = sampled(twin)

    data, port = tmp_path / "data", free_port()
    mg = megatron_serve(data, port, tmp_path / "first.log")
    try:
        service = tinker.ServiceClient(base_url=mg.url, api_key="tml-test")
        tc = service.create_lora_training_client(
            base_model=str(tiny_model_dir), rank=8, seed=3
        ).result()
        losses = first_half(tc)
        mg.proc.send_signal(signal.SIGTERM)
        assert mg.proc.wait(120) == 0, mg.log_tail()
    finally:
        mg.stop()
    assert [p.name for p in (data / "stopped").glob("*.json")], "nothing saved at the stop"
    mg = megatron_serve(data, port, tmp_path / "second.log")
    try:
        losses += second_half(tc)  # the same TrainingClient, on the restarted server
        assert losses == pytest.approx(expected, rel=1e-5)
        assert sampled(tc) == expected_tokens
        service.close("success").result(timeout=30)
    finally:
        mg.stop(60)
    leftover = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True)
    assert leftover.stdout == "", f"ranks outlived the server: {leftover.stdout}"


def rank_pid(supervisor: int, rank: int) -> int:
    """The process of `rank` among a Megatron worker's ranks (read from their environment)."""
    from tinkerd.local_cluster import _children

    for pid in _children(supervisor):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} under {supervisor}")


@pytest.mark.timeout(600)
def test_a_megatron_worker_in_a_cluster_and_a_rank_that_dies(
    server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`tinkerd worker --backend megatron --tp 2` serves a Redis cluster with the HF backend's
    losses; when one of its ranks dies, the worker's requests fail and its model is reported
    lost, as for any lost worker."""
    import os
    import signal
    import time

    import httpx
    import tinker
    from tinker import types

    from tinkerd.local_cluster import Cluster

    adam = types.AdamParams(learning_rate=0.02)
    env = {"TINKERD_WORKER_TTL_SECONDS": "8", "TINKERD_LONG_POLL_SECONDS": "5"}
    hf = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
    twin = hf.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=4).result()
    expected = [sft_step(twin, adam) for _ in range(2)]
    worker_args = ["--backend", "megatron", "--tp", "2"]
    with Cluster(tmp_path, workers=1, env=env, worker_args=worker_args).running() as cluster:
        client = tinker.ServiceClient(base_url=cluster.url, api_key="tml-test")
        tc = client.create_lora_training_client(
            base_model=str(tiny_model_dir), rank=8, seed=4
        ).result()
        assert [sft_step(tc, adam) for _ in range(2)] == pytest.approx(expected, rel=1e-5)
        worker = cluster.workers["w1"]
        follower = rank_pid(worker.proc.pid, 1)
        os.kill(follower, signal.SIGKILL)
        assert worker.proc.wait(60) != 0  # the supervisor stops every rank
        killed_at = time.monotonic()
        with pytest.raises(tinker.RequestFailedError, match="lost"):
            sft_step(tc, adam)
        assert time.monotonic() - killed_at < 60
        run = httpx.get(f"{cluster.url}/api/v1/training_runs/{tc.model_id}", timeout=10).json()
        assert run["status"] == "lost", run
        client.close("success").result(timeout=30)


def test_models_it_cannot_run_are_refused_by_name(models: list[str]) -> None:
    """A family it does not map, RoPE scaling, and shapes that do not divide by --tp/--pp are
    UserErrors naming what is wrong (at create time, before any rank builds anything); --tp on
    another backend is refused by the command line."""
    from transformers import AutoConfig, GPT2Config

    from tinkerd.cli import main
    from tinkerd.megatron.model import architecture, check_parallel
    from tinkerd.types import UserError

    with pytest.raises(UserError, match="supports llama, qwen2, qwen3 models, not 'gpt2'"):
        architecture(GPT2Config())
    llama = AutoConfig.from_pretrained(models[0])  # 4 heads, 2 kv heads, 2 layers
    arch = architecture(llama)
    check_parallel(arch, 2, 2)
    with pytest.raises(UserError, match=r"key/value heads \(2\) do not divide by --tp 4"):
        check_parallel(arch, 4, 1)
    with pytest.raises(UserError, match=r"layers \(2\) do not divide by --pp 3"):
        check_parallel(arch, 1, 3)
    llama.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(UserError, match="does not support 'yarn' RoPE scaling"):
        architecture(llama)
    with pytest.raises(SystemExit):
        main(["serve", "--tp", "2"])
