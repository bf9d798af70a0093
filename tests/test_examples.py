"""The SDK examples, run as scripts against `tinkerd serve` as a real process on the built-in
tiny model, as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinkerd.local_cluster import serve_process

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory):
    with serve_process(tmp_path_factory.mktemp("examples")) as server:
        yield server.url


def run_example(name: str, *args: str) -> dict[str, str]:
    """Run examples/NAME; returns the fields of its last line, `SUMMARY key=value ...`."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TINKER_TELEMETRY": "0", "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("SUMMARY "), out.stdout[-2000:]
    return dict(field.split("=", 1) for field in last.split()[1:])


def test_client_example_trains_saves_and_samples(url: str) -> None:
    summary = run_example("example_tinker_client.py", "--url", url)
    assert float(summary["sft_loss_last"]) < float(summary["sft_loss_first"]) - 1.0


@pytest.mark.parametrize("loss", ["importance_sampling", "ppo"])
def test_full_example_reward_rises_and_resume_is_exact(url: str, loss: str) -> None:
    summary = run_example("example_tinker_full.py", "--url", url, "--loss", loss)
    assert summary["loss"] == loss
    first, last = float(summary["reward_first"]), float(summary["reward_last3"])
    assert last > first + 0.3, summary
    assert float(summary["resumed_reward"]) > first + 0.3, summary
    assert float(summary["resume_max_logprob_diff"]) < 1e-5
