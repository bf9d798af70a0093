"""The SDK examples, run as scripts against `tinkerd serve` as a real process on the built-in
tiny model, as a user would run them; and every example's one way to name the server (`--url`,
else `$TINKERD_URL`), with a one-line error within seconds when nothing answers there."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tinkerd.local_cluster import serve_process

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ALL = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


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


# -- a server that is not there -------------------------------------------------------------------


@pytest.fixture(scope="module")
def closed_url() -> Iterator[str]:
    """A loopback port where nothing listens: held bound (never listening) so no one takes it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def run_failing(name: str, args: list[str], env: dict[str, str]) -> tuple[str, float]:
    """Run examples/NAME expecting it to give up: (its stderr, seconds it took)."""
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TINKER_TELEMETRY": "0", **env},
    )
    took = time.monotonic() - started
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr, took


def test_every_example_is_listed() -> None:
    assert ALL == [
        "example_simple.py",
        "example_tinker_client.py",
        "example_tinker_full.py",
        "train_tiny.py",
    ]


@pytest.mark.parametrize("name", ALL)
def test_an_unreachable_url_is_one_line_within_seconds(name: str, closed_url: str) -> None:
    stderr, took = run_failing(name, ["--url", closed_url], {"TINKERD_URL": "http://unused:1"})
    assert stderr.strip().splitlines() == [stderr.strip()], stderr
    assert stderr.startswith(f"tinkerd is not reachable at {closed_url}: "), stderr
    assert took < 20, took  # the SDK alone retried for minutes; this is the import time


@pytest.mark.parametrize("name", ALL)
def test_tinkerd_url_names_the_server(name: str, closed_url: str) -> None:
    stderr, _ = run_failing(name, [], {"TINKERD_URL": closed_url + "/"})
    assert stderr.startswith(f"tinkerd is not reachable at {closed_url}: "), stderr


def test_a_server_that_never_answers_times_out() -> None:
    """A port that accepts connections (into the kernel's backlog) but never answers: the check
    gives up after its timeout rather than waiting with the SDK."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        stderr, took = run_failing("train_tiny.py", [], {"TINKERD_URL": url})
    assert stderr.startswith(f"tinkerd is not reachable at {url}: timed out"), stderr
    assert took < 30, took
