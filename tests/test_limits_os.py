"""The operating system's limits on a server: `tinkerd serve` and `tinkerd worker` started with a
low soft open-file limit (256, as a login shell's 1024 but lower) raise it to the hard limit at
start and say so, and then hold far more concurrent long-polls than the old limit allowed
descriptors, with no errors: the embedded server past select()'s 1,024 descriptors, the cluster's
gunicorn API processes together; and the cluster's Redis pool makes a burst wait, not fail."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import tinker
from test_cluster import forward_json  # a sibling test module

from tinkerd.cluster.state import connect, live_workers
from tinkerd.config import Settings
from tinkerd.local_cluster import free_port, tinkerd_command, wait_until

pytestmark = pytest.mark.timeout(300)

LOW_SOFT = 256


def low_soft_limit() -> None:
    """preexec_fn: the child starts with soft RLIMIT_NOFILE 256, its hard limit unchanged."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_SOFT, hard))


def own_limit_for(connections: int) -> int:
    """Raise this test's own soft limit: it holds one end of every connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert hard > connections + 256, f"the hard open-file limit {hard} is too low for this test"
    return hard


class Server:
    """A `tinkerd serve`/`worker` process started with a low soft open-file limit."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            tinkerd_command() + args,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "OMP_WAIT_POLICY": "PASSIVE",
                "TINKERD_SEQ_GAP_SECONDS": "600",  # the withheld seq 1 stays missing
                **env,
            },
            preexec_fn=low_soft_limit,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def soft_limit_of(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    return int(re.search(r"Max open files\s+(\d+)", limits).group(1))  # type: ignore[union-attr]


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def sockets_of(pids: list[int]) -> int:
    """Open socket descriptors of these processes, together."""
    count = 0
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                count += os.readlink(fd).startswith("socket:")
            except OSError:  # closed meanwhile
                pass
    return count


async def poll(port: int, request_id: str) -> str:
    """One retrieve_future on its own connection: "ok" for a 200, else what went wrong."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        return f"connect: {e!r}"
    try:
        data = json.dumps({"request_id": request_id}).encode()
        writer.write(
            b"POST /api/v1/retrieve_future HTTP/1.1\r\nHost: tinkerd\r\n"
            b"Content-Type: application/json\r\nX-API-Key: tml-test\r\nConnection: close\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
        return "ok" if head.split()[1] == b"200" else head.decode("latin1").splitlines()[0]
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
        return repr(e)
    finally:
        writer.close()


def storm(port: int, request_id: str, n: int, pids: list[int]) -> tuple[list[str], int]:
    """`n` concurrent polls of `request_id`: (their outcomes, the most sockets the server
    processes `pids` held meanwhile)."""
    most = 0

    async def run() -> list[str]:
        nonlocal most
        polls = asyncio.gather(*(poll(port, request_id) for _ in range(n)))
        while not polls.done():
            most = max(most, await asyncio.to_thread(sockets_of, pids))
            await asyncio.sleep(0.2)
        return await polls

    return asyncio.run(run()), most


def pending_request(url: str) -> str:
    """A forward request that cannot run yet: seq 2 of a new model whose seq 1 is never sent."""
    import httpx

    sdk = tinker.ServiceClient(base_url=url, api_key="tml-test")
    model_id = sdk.create_lora_training_client(base_model="tinkerd/tiny", rank=4).result().model_id
    body = forward_json(model_id, 2)
    r = httpx.post(
        f"{url}/api/v1/forward_backward", json=body, timeout=30, headers={"X-API-Key": "tml-test"}
    )
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def started(server: Server, url: str) -> bool:
    assert server.proc.poll() is None, server.text()[-3000:]
    return healthy(url)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    running: list[Server] = []
    yield running
    for server in running:
        server.stop()


def test_the_default_capacity_holds_ten_thousand_waiting_clients() -> None:
    """Each API process alone can hold them all: the gunicorn processes share one listening
    socket and the kernel does not split the clients evenly between them."""
    assert Settings().connection_limit >= 10_000


def test_a_busy_redis_pool_makes_a_command_wait_not_fail(redis_url: str) -> None:
    """10,000 polls arriving at once keep an API process's 64 Redis connections busy for tens
    of seconds: a command waits for a free one (up to 60 s) rather than failing, which the API
    would answer 503 "Redis unreachable" while Redis is healthy."""
    client = connect(redis_url, max_connections=1)
    pool = client.connection_pool
    held = pool.get_connection()
    threading.Timer(12, pool.release, args=(held,)).start()
    started = time.monotonic()
    assert client.ping()  # gets the connection once it is released
    assert 11 < time.monotonic() - started < 40
    client.close()


def test_serve_raises_its_file_limit_and_holds_polls_past_it(
    tmp_path: Path, servers: list[Server]
) -> None:
    n = 1100  # past the old soft limit, and past the 1,024 descriptors select() can watch
    hard = own_limit_for(n)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Server(
        ["serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--device", "cpu"],
        tmp_path / "serve.log",
        {"TINKERD_LONG_POLL_SECONDS": "1"},
    )
    servers.append(server)
    wait_until(lambda: started(server, url), 120, "tinkerd serve")
    assert f"open files: soft limit raised from {LOW_SOFT} to {hard}" in server.text()
    assert soft_limit_of(server.proc.pid) == hard

    request_id = pending_request(url)
    # Its 128 threads hold 128 polls at a time; the others wait, connected, for a thread.
    outcomes, most = storm(port, request_id, n, [server.proc.pid])
    errors = [o for o in outcomes if o != "ok"]
    assert not errors, (len(errors), sorted(set(errors))[:5], server.text()[-3000:])
    assert most >= n, most  # every connection accepted at once, far past the old 256
    assert healthy(url) and "Too many open files" not in server.text()


def test_cluster_api_and_worker_raise_their_file_limits_and_hold_polls_past_them(
    tmp_path: Path, servers: list[Server], redis_url: str
) -> None:
    n = 1000  # the two API processes together could accept about 2 x 240 before
    hard = own_limit_for(n)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    common = ["--redis", redis_url, "--data-dir", str(tmp_path / "data"), "--device", "cpu"]
    env = {"TINKERD_LONG_POLL_SECONDS": "10"}
    worker = Server(["worker", *common], tmp_path / "worker.log", env)
    servers.append(worker)
    api = Server(["serve", "--port", str(port), *common], tmp_path / "api.log", env)
    servers.append(api)
    wait_until(lambda: started(api, url), 120, "tinkerd serve --redis")
    workers = children_of(api.proc.pid)
    assert len(workers) == Settings().api_workers, workers
    for process in (api, worker):
        wait_until(lambda p=process: "open files:" in p.text(), 60, "the limits logged")  # type: ignore[misc]
        assert f"open files: soft limit raised from {LOW_SOFT} to {hard}" in process.text()
    for pid in [worker.proc.pid, *workers]:
        assert soft_limit_of(pid) == hard

    rdb = redis.Redis.from_url(redis_url)
    wait_until(lambda: bool(live_workers(rdb)), 120, "the worker's registration")
    rdb.close()
    request_id = pending_request(url)
    started_at = time.monotonic()
    outcomes, most = storm(port, request_id, n, workers)
    errors = [o for o in outcomes if o != "ok"]
    assert not errors, (len(errors), sorted(set(errors))[:5], api.text()[-3000:])
    assert most >= n, most
    # Held together: one long-poll (10 s) plus sending them, not several rounds of it.
    assert time.monotonic() - started_at < 30
    assert healthy(url) and "Too many open files" not in api.text()
