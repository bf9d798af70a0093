"""Stopping and starting again: processes that share a data directory.

Several processes building the built-in tiny model into one fresh data directory at once all
succeed, with one model on disk.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

# Each process imports everything first, then waits for the same moment to build, so that the
# builds overlap (a build takes a second or more).
BUILDER = """
import sys, time
from pathlib import Path
from tinkerd.tiny_model import build_tiny_model
import torch, transformers, tokenizers  # imported before the start line
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()  # ready
while not go.exists():
    time.sleep(0.01)
print(build_tiny_model(sys.argv[1]))
"""


def test_processes_building_the_tiny_model_at_once_all_succeed(tmp_path: Path) -> None:
    target = tmp_path / "data" / "models" / "tiny"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(target), str(go), str(tmp_path / f"ready-{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.1)
    go.touch()  # every process has imported torch and waits for this
    results = [(p.wait(240), *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0, err[-3000:]
        assert out.strip() == str(target)
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".tiny-")]
    assert leftovers == []
