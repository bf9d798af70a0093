"""A whole cluster on one machine as child processes: redis-server, `tinkerd worker`s and the
`tinkerd serve --redis` API. The tests and bench/dispatch.py use it; nothing here is mocked.

Ports are picked free; Redis keeps an append-only file in its directory, so a restarted
redis-server comes back with the cluster's state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tinkerd_command() -> list[str]:
    exe = Path(sys.executable).parent / "tinkerd"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tinkerd")
    return [found] if found else [sys.executable, "-m", "tinkerd.cli"]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "redis-server is not installed: the cluster needs it (apt install redis-server)"
        )
    return found


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class ChildProcess:
    """A child process with its output in a log file."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.command = command
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(
                f"{self.command[:2]} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def kill(self) -> None:
        """SIGKILL: no cleanup, as in a crash. Its own children (gunicorn's workers) see their
        parent gone, finish what they hold and leave; this returns once they have, so that none
        still holds the old socket (and resets what it accepted there) when the next process
        takes the port."""
        if self.alive():
            children = _children(self.proc.pid)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            wait_until(
                lambda: not any(_running(pid) for pid in children),
                60,
                f"the children of killed process {self.proc.pid} to exit",
            )

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class RedisServer:
    """redis-server on a free loopback port, persisting to `directory` (unless not `persist`:
    then each start comes back empty, as a Redis run without persistence does)."""

    def __init__(self, directory: Path, port: int | None = None, persist: bool = True) -> None:
        self.directory = directory
        self.persist = persist
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: ChildProcess | None = None

    def start(self) -> RedisServer:
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "everysec",
            "--save", "",
        ]  # fmt: skip
        self.process = ChildProcess(command, self.directory / "redis.log")
        wait_until(self.ping, 20, f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        assert self.process is not None
        self.process.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class TinkerdProcess(ChildProcess):
    """`tinkerd serve` or `tinkerd worker` with the given arguments."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        super().__init__(tinkerd_command() + args, log_path, env)


class APIProcess(TinkerdProcess):
    def __init__(
        self,
        args: list[str],
        log_path: Path,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(["serve", "--port", str(self.port), *args], log_path, env)

    def healthz(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/healthz", timeout=2) as r:
                return json.loads(r.read()) if r.status == 200 else None
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None

    def wait_ready(self, timeout: float = 120.0) -> APIProcess:
        def ready() -> bool:
            self.check_alive()
            return self.healthz() is not None

        wait_until(ready, timeout, f"tinkerd API on {self.url}")
        return self


@contextmanager
def serve_process(
    work_dir: Path, args: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[APIProcess]:
    """`tinkerd serve` (embedded) as a process on a free port, data in `work_dir`/data, ready
    when yielded; its log tail is printed if anything fails, and it is always stopped."""
    base = ["--data-dir", str(work_dir / "data"), "--device", "cpu", "--log-level", "WARNING"]
    server = APIProcess(
        base + (args or []), work_dir / "server.log", env={"HF_HUB_OFFLINE": "1", **(env or {})}
    )
    try:
        yield server.wait_ready()
    except BaseException:
        print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        server.stop()


class Cluster:
    """redis-server, `workers` tinkerd workers and one API process, all on this machine."""

    def __init__(
        self,
        work_dir: Path,
        workers: int = 2,
        api_workers: int = 1,
        log_level: str = "INFO",
        env: dict[str, str] | None = None,
        worker_args: list[str] | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.worker_args = worker_args or []  # e.g. ["--backend", "megatron", "--tp", "2"]
        self.data_dir = work_dir / "data"
        self.log_level = log_level
        self.env = {
            "TINKERD_HEARTBEAT_SECONDS": "1",
            "TINKERD_WORKER_TTL_SECONDS": "5",
            **(env or {}),
        }
        self.redis = RedisServer(work_dir / "redis")
        self.api_workers = api_workers
        self.n_workers = workers
        self.workers: dict[str, TinkerdProcess] = {}
        self.api: APIProcess | None = None
        self._worker_count = 0

    def common_args(self) -> list[str]:
        return ["--redis", self.redis.url, "--data-dir", str(self.data_dir), "--device", "cpu",
                "--log-level", self.log_level]  # fmt: skip

    def start(self) -> Cluster:
        self.redis.start()
        names = [self.add_worker(wait=False) for _ in range(self.n_workers)]
        self.start_api()
        self.wait_workers(names)
        return self

    @contextmanager
    def running(self) -> Iterator[Cluster]:
        """The cluster started, its logs printed if anything fails, always stopped."""
        try:
            yield self.start()
        except BaseException:
            print(self.logs(), file=sys.stderr)
            raise
        finally:
            self.stop()

    def add_worker(self, wait: bool = True) -> str:
        self._worker_count += 1
        name = f"w{self._worker_count}"
        self.workers[name] = TinkerdProcess(
            ["worker", "--name", name, *self.common_args(), *self.worker_args],
            self.work_dir / f"worker-{name}.log",
            self.env,
        )
        if wait:
            self.wait_workers([name])
        return name

    def start_api(self, port: int | None = None) -> APIProcess:
        self.api = APIProcess(
            ["--api-workers", str(self.api_workers), *self.common_args()],
            self.work_dir / "api.log",
            port,
            self.env,
        ).wait_ready()
        return self.api

    def registered_workers(self) -> dict[str, dict[str, Any]]:
        import redis

        from tinkerd.cluster.state import live_workers

        client = redis.Redis.from_url(self.redis.url)
        try:
            return live_workers(client)
        finally:
            client.close()

    def wait_workers(self, names: list[str] | None = None, timeout: float = 120.0) -> None:
        """Until the named workers (default: all started ones still running) have registered;
        one that exits meanwhile is an error, with its log."""
        names = names or [n for n, w in self.workers.items() if w.alive()]

        def registered() -> bool:
            for name in names:
                self.workers[name].check_alive()
            return set(names) <= set(self.registered_workers())

        wait_until(registered, timeout, "the workers to register", interval=0.2)

    @property
    def url(self) -> str:
        assert self.api is not None
        return self.api.url

    def logs(self) -> str:
        parts = []
        for name, proc in [("api", self.api), *self.workers.items()]:
            if proc is not None:
                parts.append(f"--- {name} ---\n{proc.log_tail()}")
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in [self.api, *self.workers.values()]:
            if proc is not None:
                proc.stop()
        self.redis.stop()
