"""`tinkerd serve` as a real process, driven by the example script through the SDK."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINKERD = Path(sys.executable).with_name("tinkerd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "tinkerd serve exited early"
        try:
            with urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=2) as r:
                return json.load(r)
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} never became healthy")


@pytest.fixture
def cli_server(tmp_path: Path):
    """`tinkerd serve` in a subprocess; its data dir comes from TINKERD_DATA_DIR."""
    port = free_port()
    env = {**os.environ, "TINKERD_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [str(TINKERD), "serve", "--host", "127.0.0.1", "--port", str(port)]
        + ["--log-level", "WARNING"],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, tmp_path / "data"
    finally:
        proc.terminate()
        proc.wait(10)


def test_example_trains_builtin_tiny_model(cli_server) -> None:
    url, data_dir = cli_server
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--base-url", url]
        + ["--steps", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TINKER_TELEMETRY": "0"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loss fell from" in out.stdout
    # The built-in model was created on first use, in the data dir the environment named.
    assert (data_dir / "models" / "tiny" / "config.json").is_file()
    assert (data_dir / "models" / "tiny" / "tokenizer.json").is_file()


def test_help_lists_serve_options() -> None:
    out = subprocess.run([str(TINKERD), "serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--host", "--port", "--data-dir"):
        assert flag in out.stdout
