"""`tinkerd serve` as a subprocess on a free loopback port, for the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tinkerd.local_cluster import free_port, tinkerd_command


class ServerProcess:
    """`tinkerd serve` in a subprocess, up once /api/v1/healthz answers."""

    def __init__(
        self,
        data_dir: Path,
        extra_args: list[str],
        log_level: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "server.log"
        command = tinkerd_command() + [
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(data_dir / "data"),
            "--device",
            "cpu",
            "--log-level",
            log_level,
            *extra_args,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tinkerd exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/api/v1/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"tinkerd did not answer healthz in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextmanager
def sdk_client(start: Callable[[], str], logs: Callable[[], str], stop: Callable[[], None]):
    """Start a server (`start` returns its URL) and yield an SDK ServiceClient on it; on failure
    the server's logs are printed, and both are always shut down."""
    import tinker

    try:
        client = tinker.ServiceClient(base_url=start(), api_key="tml-bench")
        try:
            yield client
        finally:
            client.close("success").result()
    except BaseException:
        print(logs(), file=sys.stderr)
        raise
    finally:
        stop()


@contextmanager
def sdk_session(
    work_dir: Path, extra_args: list[str], log_level: str, env: dict[str, str] | None = None
) -> Iterator[tuple[ServerProcess, Any]]:
    """A ready `tinkerd serve` and an SDK ServiceClient on it."""
    server = ServerProcess(work_dir, extra_args, log_level, env)

    def start() -> str:
        server.wait_ready()
        return server.url

    with sdk_client(start, server.log_tail, server.stop) as client:
        yield server, client
