"""Older SDKs of the protobuf era drive tinkerd: a user who has not upgraded is served.

For each version in scripts/old-sdks.txt (the oldest of the protobuf era, 0.25, and a middle
one), scripts/setup.sh makes a venv, `.venv-sdk/<version>`, with that SDK from the package
registry. This test runs SDK_MODULES, which import no tinkerd, in that venv's pytest against
this process's server (the session's `server`, its tiny model), by TINKERD_TEST_URL: the server
speaks 0.38's protocol, the client an older one. Their tests that look inside the server object
(`in_process`) or use what a version lacks skip there, with the reason; the rest must pass.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = (ROOT / "scripts" / "old-sdks.txt").read_text().split()
SDK_MODULES = ["tests/test_api_tinker.py"]
# At least this many of the module's tests must pass with each version (the others skip): a
# version that skips everything would prove nothing.
MIN_PASSED = 18

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("version", VERSIONS)
def test_an_older_sdk_drives_tinkerd(version: str, server, tiny_model_dir: Path) -> None:
    python = ROOT / ".venv-sdk" / version / "bin" / "python"
    assert python.exists(), f"{python.parent.parent} is missing: run bash scripts/setup.sh"
    installed = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('tinker'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert installed == version, f"{python} has tinker {installed}: run bash scripts/setup.sh"
    env = {
        **os.environ,
        "TINKERD_TEST_URL": server.url,
        "TINKERD_TEST_MODEL_DIR": str(tiny_model_dir),
        "TINKER_TELEMETRY": "0",
    }
    env.pop("PYTHONPATH", None)  # nothing of this venv's packages in the older SDK's run
    run = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *SDK_MODULES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"tinker {version}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= MIN_PASSED, f"tinker {version}: {summary}"
    print(f"tinker {version}: {summary}")
