"""What does scaling tinkerd out cost per request, and what does it buy?

tinkerd runs two ways: alone (`tinkerd serve`: API and worker in one process, futures in memory,
waitress threads) and scaled out (`tinkerd serve --redis`: gunicorn/gevent API processes that
sequence requests in Redis and hand them by Celery to `tinkerd worker` processes, which settle
futures in Redis). The second adds hops to every request: a Lua script in Redis, a Celery
message, a worker-side queue, a result written to Redis and a pub/sub notice to the API. This
script measures that cost, and the two things the cluster is for, on the built-in tiny model
(`tinkerd/tiny`, LoRA rank 8: a step is a few ms of compute, so the figures are dominated by
dispatch, not by the model):

1. per-request overhead: p50 and p99 latency of a minimal request, a forward-only
   `TrainingClient.forward([datum], "cross_entropy")` on 8 tokens, sent one after another
   (after a warm-up) and timed from the SDK call to its `.result()`;
2. pipelined training: forward_backward + optim_step submitted back to back with the SDK's
   futures, each step submitted before waiting on the previous one (as tinker-cookbook does),
   for one training client, then for two clients at once in two threads (aggregate steps/s).
   Scaled out, models are placed on the worker holding the fewest, so with two workers the two
   clients' models land on different workers (the placement read from Redis is printed);
3. concurrent long-polls: N (default 10,000; 1,000 against the embedded server, see
   --embedded-polls) `retrieve_future` polls at once, in plain HTTP/1.1 over asyncio streams (one
   connection each; this process raises its own open-file limit for them, the servers raise
   theirs at start), for N forward requests that are queued but cannot run yet (seq ids 2..N+1
   of a model whose seq 1 is withheld). Phase "hold": every poll should be held for
   `long_poll_seconds` and answered `{"type": "try_again"}` (a success).
   Phase "release": N polls again, and seq 1 is sent once they are all out, so all N requests
   run and every poll should end with its result. Counted: polls answered, errors (non-200 or
   connection errors), the most polls in flight (client side) and TCP connections open to the
   API (from /proc/net/tcp) at once, how many polls the server held on time (answered within
   1.5 x the long-poll of being sent, so not queued behind another held poll) and how many of
   those at once (and how long after the first was sent all of those were held), the slowest
   poll, the time until every poll was answered, and the time from unblocking to the last
   result. `tinkerd serve` has 128 HTTP threads and each held poll takes one, so there polls
   queue behind each other; its errors are printed, not fatal.

The servers run with OMP_WAIT_POLICY=PASSIVE unless --omp-default is given. torch's OpenMP
threads otherwise spin while they wait for each other, and here the API processes, Redis, one
or two workers (two OpenMP threads each) and this client share the same cores: a thread that is
descheduled mid-op leaves its peer spinning, and on a 2-core box a forward that takes 5 ms in
`tinkerd worker` was seen to take 0.5-1.2 s (350 ms of it CPU time of the worker's own thread),
which buries the dispatch cost this measures. --omp-default shows what a deployment with
OpenMP's defaults gets on such a box instead.

Each runs in three modes, one after another, each on fresh processes: `embedded` (`tinkerd
serve`, via bench/live_server.py), `redis-1w` and `redis-2w` (`tinkerd.local_cluster.Cluster`: a
real redis-server on a free port, 1 or 2 `tinkerd worker`s and `tinkerd serve --redis` under
gunicorn with --api-workers processes). Figures are printed as absolute numbers and as ratios
against the embedded run of the same invocation. Everything (client, API, workers, Redis) shares
this machine's cores, so on a small or busy machine the figures are noisy: compare ratios from
one run rather than absolute numbers across runs.

    .venv/bin/python bench/dispatch.py            # the full run (a few minutes on 2 cores)
    .venv/bin/python bench/dispatch.py --quick    # a smoke run: fewer requests, steps and polls
    .venv/bin/python bench/dispatch.py --modes embedded redis-2w --polls 2000
    .venv/bin/python bench/dispatch.py --modes redis-1w --polls-only --long-poll 25  # 10,000 polls
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from live_server import sdk_client, sdk_session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")
warnings.filterwarnings("ignore", category=FutureWarning)

MODES = ("embedded", "redis-1w", "redis-2w")
BASE_MODEL = "tinkerd/tiny"
RANK = 8
API_KEY = "tml-bench"
SDK_POLL_TIMEOUT = 45.0  # the SDK gives up on one retrieve_future poll after this long
LEARNING_RATE = 1e-4


# -- results -------------------------------------------------------------------------------------


@dataclass
class Latency:
    seconds: list[float]

    def percentile(self, q: float) -> float:
        """The q-th percentile (nearest rank), in ms."""
        ordered = sorted(self.seconds)
        return 1000 * ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean(self) -> float:
        return 1000 * statistics.fmean(self.seconds)


@dataclass
class Steps:
    steps: int  # per client
    seconds: list[float]  # wall time per client
    wall: float  # from the common start to the last client done

    @property
    def aggregate(self) -> float:
        return self.steps * len(self.seconds) / self.wall

    def per_client(self) -> list[float]:
        return [self.steps / s for s in self.seconds]


@dataclass
class PollPhase:
    polls: int
    ok: int = 0  # answered 200 with a try_again or a result
    try_again: int = 0
    results: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_bodies: dict[str, bytes] = field(default_factory=dict)  # the first of each kind
    max_in_flight: int = 0  # client side
    max_connections: int | None = None  # established TCP connections to the API port
    sent_in: float = 0.0  # from the first poll sent to the last one sent
    on_time: int = 0  # hold: answered try_again within 1.5 x the long-poll of being sent
    held_at_once: int = 0  # hold: the most on-time polls outstanding at one moment
    all_held_at: float | None = None  # hold: when the server held every poll (from t0)
    late: int = 0  # answered after the SDK's 45 s poll timeout would have fired
    seconds: float = 0.0  # from the first poll sent to the last answered
    slowest: float = 0.0  # the longest single poll
    repolls: int = 0  # release: polls answered try_again and sent again
    drain: float | None = None  # release: from seq 1 sent to the last result
    client_cpu: float = 0.0  # CPU cores this process used meanwhile
    unblock_submit: float | None = None  # release: seconds the POST of seq 1 took to answer


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one moment."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


@dataclass
class ModeResult:
    mode: str
    latency: Latency | None = None
    one: Steps | None = None
    two: Steps | None = None
    placement: dict[str, str] = field(default_factory=dict)
    hold: PollPhase | None = None
    release: PollPhase | None = None
    sdk_try_again: int = 0  # SDK polls of the training clients answered try_again
    error: str | None = None  # the mode failed: what came before it is kept
    poll_error: str | None = None


class TryAgainCounter(logging.Filter):
    """Counts (and keeps off the console) the SDK's warning for a poll answered try_again: a
    request of the training clients that took longer than the long-poll."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "because of try_again" in record.getMessage():
            self.count += 1
            return False
        return True


TRY_AGAIN = TryAgainCounter()
logging.getLogger("tinker.lib.api_future_impl").addFilter(TRY_AGAIN)


# -- the SDK side --------------------------------------------------------------------------------


def make_datum(length: int, seed: int) -> Any:
    import numpy as np
    from tinker import types

    tokens = np.random.default_rng(seed).integers(1, 800, size=length + 1).tolist()
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
    )


def measure_latency(training: Any, warmup: int, requests: int) -> Latency:
    """Sequential forward-only requests: each from the SDK call to its result."""
    datum = make_datum(8, seed=1)
    for _ in range(warmup):
        training.forward([datum], "cross_entropy").result()
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        training.forward([datum], "cross_entropy").result()
        times.append(time.perf_counter() - start)
    return Latency(times)


def pipelined(training: Any, data: list[Any], steps: int) -> float:
    """Seconds for `steps` training steps, each submitted before waiting on the previous one."""
    from tinker import types

    adam = types.AdamParams(learning_rate=LEARNING_RATE)
    start = time.perf_counter()
    previous: tuple[Any, Any] | None = None
    for _ in range(steps):
        current = (training.forward_backward(data, "cross_entropy"), training.optim_step(adam))
        if previous is not None:
            previous[0].result()
            previous[1].result()
        previous = current
    assert previous is not None
    previous[0].result()
    previous[1].result()
    return time.perf_counter() - start


def measure_steps(trainings: list[Any], data: list[Any], warmup: int, steps: int) -> Steps:
    """Pipelined steps on each training client at once, one thread per client."""
    for training in trainings:
        pipelined(training, data, warmup)
    barrier = threading.Barrier(len(trainings) + 1)
    seconds: list[float] = [0.0] * len(trainings)
    failures: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            seconds[i] = pipelined(trainings[i], data, steps)
        except BaseException as e:  # re-raised in the main thread
            failures.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(trainings))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        raise failures[0]
    return Steps(steps, seconds, wall)


def training_batch(batch: int, seq_len: int) -> list[Any]:
    return [make_datum(seq_len, seed=10 + i) for i in range(batch)]


def new_training_client(client: Any) -> Any:
    return client.create_lora_training_client(base_model=BASE_MODEL, rank=RANK, seed=0).result()


# -- concurrent long-polls over raw HTTP ---------------------------------------------------------


def open_connections(port: int) -> int | None:
    """Established TCP connections to 127.0.0.1:`port`, counted from the client ends."""
    try:
        with open("/proc/net/tcp") as f:
            lines = f.readlines()[1:]
    except OSError:
        return None
    count = 0
    for line in lines:
        parts = line.split()
        if parts[3] == "01" and int(parts[2].rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def is_json(self) -> bool:
        return self.content_type.startswith("application/json")


class HTTPError(Exception):
    """A request that got no HTTP answer (connection refused or reset, timeout, bad reply)."""


class Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams, for JSON POSTs. The polls use
    this rather than a client library: in a trial with an httpx AsyncClient, the 1,000 polls of
    the hold phase took up to 28 s against the cluster where these take about 6 s; the client,
    not the server, was queueing them."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: dict[str, Any]) -> Reply:
        try:
            return await asyncio.wait_for(self._post(path, body), self.timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            self.close()
            raise HTTPError(type(e).__name__) from e
        except TimeoutError as e:
            self.close()
            raise HTTPError("Timeout") from e

    async def _post(self, path: str, body: dict[str, Any]) -> Reply:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        data = json.dumps(body).encode()
        head = (
            f"POST /api/v1/{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"X-API-Key: {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        writer.write(head.encode() + data)
        await writer.drain()
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            payload = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            payload = b""
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                payload += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
        else:
            payload = await reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Reply(status, headers.get("content-type", ""), payload)

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


class PollStorm:
    """N pending forward requests of one model and N concurrent retrieve_future polls on them,
    one connection each."""

    def __init__(self, url: str, polls: int, long_poll: float, timeout: float) -> None:
        host_port = url.split("://", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.n = polls
        self.long_poll = long_poll
        self.timeout = timeout
        self.model_id = ""
        self.request_ids: list[str] = []

    def connection(self) -> Connection:
        return Connection(self.host, self.port, self.timeout)

    async def post(self, path: str, body: dict[str, Any]) -> Reply:
        """A request outside the storm, on its own connection; anything but 200 is an error."""
        conn = self.connection()
        try:
            r = await conn.post(path, body)
        finally:
            conn.close()
        if r.status != 200:
            raise RuntimeError(f"{path} answered {r.status}: {r.body[:300]!r}")
        return r

    async def settle(self, request_id: str, limit: float = 300.0) -> Reply:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            r = await self.post("retrieve_future", {"request_id": request_id})
            if r.is_json:
                body = r.json()
                if body.get("type") == "try_again":
                    continue
                if "error" in body:
                    raise RuntimeError(f"request {request_id} failed: {body}")
            return r
        raise TimeoutError(f"request {request_id} did not settle in {limit:.0f} s")

    def forward_body(self, seq_id: int) -> dict[str, Any]:
        tokens = [5, 17, 42, 99, 300, 7, 8, 11, 13]
        return {
            "model_id": self.model_id,
            "seq_id": seq_id,
            "forward_only": True,
            "forward_backward_input": {
                "loss_fn": "cross_entropy",
                "data": [
                    {
                        "model_input": {
                            "chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]
                        },
                        "loss_fn_inputs": {
                            "target_tokens": tokens[1:],
                            "weights": [1.0] * (len(tokens) - 1),
                        },
                    }
                ],
            },
        }

    async def prepare(self) -> None:
        """A session and model, and N forward requests (seq 2..N+1) stuck behind seq 1."""
        r = await self.post(
            "create_session",
            {
                "tags": ["bench"],
                "user_metadata": {},
                "sdk_version": "0.38.0",
                "type": "create_session",
            },
        )
        session_id = r.json()["session_id"]
        r = await self.post(
            "create_model",
            {
                "session_id": session_id,
                "model_seq_id": 0,
                "base_model": BASE_MODEL,
                "lora_config": {"rank": RANK, "seed": 0},
                "optimizer_config": {"type": "adamw"},
                "type": "create_model",
            },
        )
        self.model_id = r.json()["model_id"]
        await self.settle(r.json()["request_id"])
        pending = iter(range(2, self.n + 2))
        ids: dict[int, str] = {}

        async def submitter() -> None:  # 16 of these, each on one keep-alive connection
            conn = self.connection()
            try:
                for seq_id in pending:
                    r = await conn.post("forward_backward", self.forward_body(seq_id))
                    if r.status != 200:
                        raise RuntimeError(f"forward_backward answered {r.status}: {r.body!r}")
                    ids[seq_id] = str(r.json()["request_id"])
            finally:
                conn.close()

        await asyncio.gather(*(submitter() for _ in range(16)))
        self.request_ids = [ids[s] for s in range(2, self.n + 2)]

    async def storm(self, release: bool) -> PollPhase:
        """One poll per request id, all at once. With `release`, seq 1 is sent once every poll
        is out, and a poll answered try_again is sent again until its result."""
        phase = PollPhase(self.n)
        in_flight = 0
        unsent = self.n
        all_sent = asyncio.Event()
        done = asyncio.Event()
        held: list[tuple[float, float]] = []
        holds_from: list[float] = []  # hold: when each try_again came
        released_at: float | None = None
        cpu0 = time.process_time()
        t0 = time.monotonic()

        async def poll(request_id: str) -> None:
            nonlocal in_flight, unsent
            conn = self.connection()
            first = True
            try:
                while True:
                    in_flight += 1
                    phase.max_in_flight = max(phase.max_in_flight, in_flight)
                    sent = time.monotonic()
                    if first:
                        first = False
                        unsent -= 1
                        phase.sent_in = max(phase.sent_in, sent - t0)
                        if unsent == 0:
                            all_sent.set()
                    try:
                        r = await conn.post("retrieve_future", {"request_id": request_id})
                    except HTTPError as e:
                        phase.errors[str(e)] += 1
                        return
                    finally:
                        in_flight -= 1
                    now = time.monotonic()
                    phase.slowest = max(phase.slowest, now - sent)
                    phase.late += now - sent > SDK_POLL_TIMEOUT
                    if r.status != 200:
                        phase.errors[f"HTTP {r.status}"] += 1
                        phase.error_bodies.setdefault(f"HTTP {r.status}", r.body[:300])
                        return
                    if r.is_json:
                        body = r.json()
                        if "error" in body:
                            phase.errors["error body"] += 1
                            return
                        if body.get("type") == "try_again":
                            if release:
                                phase.repolls += 1
                                continue
                            phase.ok += 1
                            phase.try_again += 1
                            holds_from.append(now)
                            if now - sent < 1.5 * self.long_poll:
                                phase.on_time += 1
                                held.append((sent, now))
                            return
                    phase.ok += 1
                    phase.results += 1
                    if released_at is not None:
                        phase.drain = max(phase.drain or 0.0, now - released_at)
                    return
            finally:
                conn.close()

        async def watch() -> None:
            while not done.is_set():
                count = open_connections(self.port)
                if count is not None:
                    phase.max_connections = max(phase.max_connections or 0, count)
                await asyncio.sleep(0.2)

        async def unblock() -> None:
            nonlocal released_at
            await all_sent.wait()
            await asyncio.sleep(min(1.0, self.long_poll / 2))
            released_at = time.monotonic()
            r = await self.post("forward_backward", self.forward_body(1))
            phase.unblock_submit = time.monotonic() - released_at
            await self.settle(r.json()["request_id"])

        watcher = asyncio.create_task(watch())
        extra = [unblock()] if release else []
        await asyncio.gather(*(poll(rid) for rid in self.request_ids), *extra)
        phase.seconds = time.monotonic() - t0
        phase.client_cpu = (time.process_time() - cpu0) / phase.seconds
        phase.held_at_once = most_at_once(held)
        if holds_from and len(holds_from) == phase.polls:
            # The server answers try_again one long-poll after it began to hold the poll.
            phase.all_held_at = max(holds_from) - self.long_poll - t0
        done.set()
        await watcher
        return phase


async def run_polls(
    result: ModeResult, url: str, polls: int, long_poll: float, timeout: float
) -> None:
    """The hold phase, then the release phase, each kept in `result` (and printed) as soon as
    it is over, so that a failure of the second keeps the first."""
    storm = PollStorm(url, polls, long_poll, timeout)
    await storm.prepare()
    result.hold = await storm.storm(release=False)
    print(f"[{result.mode}] {polls} polls, hold: {describe(result.hold)}", flush=True)
    result.release = await storm.storm(release=True)
    print(f"[{result.mode}] {polls} polls, release: {describe(result.release)}", flush=True)


# -- the modes -----------------------------------------------------------------------------------


@contextmanager
def cluster_session(
    work_dir: Path, workers: int, api_workers: int, log_level: str, env: dict[str, str]
) -> Iterator[tuple[Any, Any]]:
    """A started local Cluster and an SDK ServiceClient on its API."""
    from tinkerd.local_cluster import Cluster

    cluster = Cluster(
        work_dir, workers=workers, api_workers=api_workers, log_level=log_level, env=env
    )

    def start() -> str:
        cluster.start()
        return cluster.url

    with sdk_client(start, cluster.logs, cluster.stop) as client:
        yield cluster, client


def placement(cluster: Any) -> dict[str, str]:
    import redis

    from tinkerd.cluster.keys import PLACEMENT

    client = redis.Redis.from_url(cluster.redis.url)
    try:
        return {k.decode(): v.decode() for k, v in client.hgetall(PLACEMENT).items()}
    finally:
        client.close()


def run_mode(
    result: ModeResult, args: argparse.Namespace, work_dir: Path, env: dict[str, str]
) -> None:
    """Fills `result` as the measurements finish, so that a failure keeps what came before."""
    mode = result.mode
    data = training_batch(args.batch, args.seq_len)
    mode_dir = work_dir / mode
    mode_dir.mkdir()
    if mode == "embedded":
        session = sdk_session(mode_dir, [], args.server_log_level, env)
    else:
        workers = 1 if mode == "redis-1w" else 2
        session = cluster_session(mode_dir, workers, args.api_workers, args.server_log_level, env)
    started = time.perf_counter()
    try_again_before = TRY_AGAIN.count
    with session as (server, client):
        url = server.url
        print(
            f"[{mode}] up in {time.perf_counter() - started:.1f} s at {url}; load average "
            f"{os.getloadavg()[0]:.2f}",
            flush=True,
        )
        if args.polls_only:
            run_poll_storm(result, args, url)
            return
        first = new_training_client(client)
        result.latency = measure_latency(first, args.warmup, args.requests)
        lat = result.latency
        print(
            f"[{mode}] forward latency over {args.requests}: p50 {lat.p50:.1f} ms, p99 "
            f"{lat.p99:.1f} ms, mean {lat.mean:.1f} ms",
            flush=True,
        )
        result.one = measure_steps([first], data, args.warmup_steps, args.steps)
        print(f"[{mode}] pipelined, 1 client: {result.one.aggregate:.1f} steps/s", flush=True)
        second = new_training_client(client)
        result.two = measure_steps([first, second], data, args.warmup_steps, args.steps)
        per_client = ", ".join(f"{r:.1f}" for r in result.two.per_client())
        print(
            f"[{mode}] pipelined, 2 clients: {result.two.aggregate:.1f} steps/s aggregate "
            f"({per_client} per client)",
            flush=True,
        )
        if mode != "embedded":
            ids = {first.model_id: "client 1", second.model_id: "client 2"}
            result.placement = {ids[m]: w for m, w in placement(server).items() if m in ids}
            print(f"[{mode}] placement: {result.placement}", flush=True)
        result.sdk_try_again = TRY_AGAIN.count - try_again_before
        if result.sdk_try_again:
            print(
                f"[{mode}] the SDK got try_again {result.sdk_try_again} times: requests that "
                f"took longer than the long-poll ({args.long_poll:g} s)",
                flush=True,
            )
        run_poll_storm(result, args, url)


def polls_for(mode: str, args: argparse.Namespace) -> int:
    """The embedded server holds a poll per HTTP thread (128): 10,000 would queue for many
    long-polls, past the SDK's poll timeout, so it gets --embedded-polls."""
    return min(args.polls, args.embedded_polls) if mode == "embedded" else args.polls


def run_poll_storm(result: ModeResult, args: argparse.Namespace, url: str) -> None:
    mode, polls = result.mode, polls_for(result.mode, args)
    if polls <= 0:
        return
    try:
        asyncio.run(run_polls(result, url, polls, args.long_poll, args.poll_timeout))
    except Exception as e:  # reported, never fatal: this is what is being measured
        result.poll_error = f"{type(e).__name__}: {e}"
        print(f"[{mode}] the poll test failed: {result.poll_error}", flush=True)
        traceback.print_exc()


def describe(phase: PollPhase) -> str:
    errors = ", ".join(f"{k} x{v}" for k, v in phase.errors.most_common()) or "none"
    conns = "n/a" if phase.max_connections is None else str(phase.max_connections)
    text = (
        f"{phase.ok}/{phase.polls} ok ({phase.try_again} try_again, {phase.results} results), "
        f"errors: {errors}; all sent in {phase.sent_in:.1f} s, max in flight "
        f"{phase.max_in_flight}, max open connections {conns}"
    )
    if phase.drain is None:
        text += (
            f", {phase.on_time} held the long-poll on time, at most {phase.held_at_once} at once"
        )
        if phase.all_held_at is not None:
            text += (
                f", the server held all of them {phase.all_held_at:.1f} s after the first was sent"
            )
    else:
        text += (
            f", seq 1's submission answered in {phase.unblock_submit or 0.0:.1f} s, last result "
            f"{phase.drain:.1f} s after it was sent, {phase.repolls} re-polls"
        )
    text += (
        f"; all answered {phase.seconds:.1f} s after the first was sent, slowest poll "
        f"{phase.slowest:.1f} s, this client used "
        f"{phase.client_cpu:.2f} cores"
    )
    if phase.late:
        text += f", {phase.late} slower than the SDK's {SDK_POLL_TIMEOUT:.0f} s poll timeout"
    for kind, body in phase.error_bodies.items():
        text += f"\n    first {kind}: {body.decode(errors='replace')}"
    return text


# -- main ----------------------------------------------------------------------------------------


def raise_fd_limit(needed: int) -> str:
    """Raise the soft open-file limit (inherited by the servers started later) if it is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            return f"open files: soft limit {soft} raised to the hard limit {target} (< {needed})"
        return f"open files: soft limit raised from {soft} to {target}"
    return f"open files: soft limit {soft}, hard {hard}"


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}"


def report(results: list[ModeResult], args: argparse.Namespace) -> None:
    base = next((r for r in results if r.mode == "embedded" and r.latency is not None), None)

    def fig(r: ModeResult, get: Any) -> float | None:
        try:
            return get(r)
        except AttributeError:  # a measurement that did not happen
            return None

    def cell(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        ("forward p50 ms", lambda r: r.latency.p50, 1),
        ("forward p99 ms", lambda r: r.latency.p99, 1),
        ("forward mean ms", lambda r: r.latency.mean, 1),
        ("steps/s, 1 client", lambda r: r.one.aggregate, 1),
        ("steps/s, 2 clients (sum)", lambda r: r.two.aggregate, 1),
        ("SDK try_again answers", lambda r: None if r.latency is None else r.sdk_try_again, 0),
    ]
    if not args.polls_only:
        print()
        print(
            f"{args.requests} sequential forwards (8 tokens) after {args.warmup} warm-up; "
            f"{args.steps} pipelined steps per client (batch {args.batch} x {args.seq_len} "
            f"tokens) after {args.warmup_steps}; ratio = mode / embedded"
        )
        header = f"{'':<26}" + "".join(f"{r.mode:>10} {'ratio':>6}" for r in results)
        print(header)
        print("-" * len(header))
        for label, get, digits in rows:
            line = f"{label:<26}"
            for r in results:
                value = fig(r, get)
                base_value = fig(base, get) if base and digits else None
                line += f"{cell(value, digits):>10} {ratio(value, base_value):>6}"
            print(line)
    for r in results:
        if r.error:
            print(f"{r.mode} FAILED: {r.error}")
    for r in results:
        if r.placement:
            print(
                f"placement ({r.mode}): "
                + ", ".join(f"{c} on {w}" for c, w in sorted(r.placement.items()))
            )

    if args.polls > 0:
        print()
        print(
            f"concurrent retrieve_future polls (polls: how many in each mode), long_poll_seconds "
            f"{args.long_poll:g}, client timeout {args.poll_timeout:g} s"
        )
        header = (
            f"{'mode':<10} {'phase':<8} {'polls':>5} {'ok':>5} {'errors':>6} {'in flight':>9} "
            f"{'conns':>5} {'sent s':>6} {'on time':>7} {'held':>5} {'held s':>6} "
            f"{'drain s':>7} {'total s':>7} {'slowest':>7} {'>45 s':>5} {'client':>6}"
        )
        print(header)
        print("-" * len(header))
        for r in results:
            if r.poll_error is not None:
                print(f"{r.mode:<10} failed: {r.poll_error}")
            for name, p in (("hold", r.hold), ("release", r.release)):
                if p is None:
                    continue
                conns = "n/a" if p.max_connections is None else str(p.max_connections)
                on_time, held = (str(p.on_time), str(p.held_at_once)) if name == "hold" else "--"
                held_s = "-" if p.all_held_at is None else f"{p.all_held_at:.1f}"
                drain = "-" if p.drain is None else f"{p.drain:.1f}"
                print(
                    f"{r.mode:<10} {name:<8} {p.polls:>5} {p.ok:>5} {sum(p.errors.values()):>6} "
                    f"{p.max_in_flight:>9} {conns:>5} {p.sent_in:>6.1f} {on_time:>7} {held:>5} "
                    f"{held_s:>6} {drain:>7} {p.seconds:>7.1f} {p.slowest:>7.1f} {p.late:>5} "
                    f"{p.client_cpu:>6.2f}"
                )
        print(
            "ok: answered 200 with try_again (hold) or the result (release). conns: most "
            "established TCP connections to the API seen at once. sent s: until the last poll "
            "was sent. on time: hold polls answered try_again within 1.5 x the long-poll of "
            "being sent, i.e. held by the server, not queued behind another held poll; held: "
            "the most of those outstanding at one moment; held s: when the server held every "
            "poll (its try_again came one long-poll later), from the first poll sent. drain s: "
            "from sending seq 1 (which unblocks every request) to the last result. total s: from "
            "the first poll sent until every poll was answered. >45 s: polls the SDK would have "
            "timed out. client: CPU cores this benchmark process "
            "used meanwhile."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: fewer requests, steps and polls; noisy figures",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="which modes to run (default all; ratios need embedded)",
    )
    parser.add_argument(
        "--requests", type=int, help="timed sequential forwards (default 200; 40 with --quick)"
    )
    parser.add_argument("--warmup", type=int, help="untimed forwards first (default 20; 5)")
    parser.add_argument(
        "--steps", type=int, help="timed pipelined steps per client (default 100; 15 with --quick)"
    )
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (default 5; 2)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    parser.add_argument(
        "--polls",
        type=int,
        help="concurrent retrieve_future polls (default 10000; 200 with --quick; 0: none)",
    )
    parser.add_argument(
        "--embedded-polls",
        type=int,
        default=1000,
        help="at most this many polls against the embedded server, whose 128 HTTP threads hold "
        "one poll each (default 1000)",
    )
    parser.add_argument(
        "--polls-only",
        action="store_true",
        help="only the concurrent long-polls: no latency or pipelined steps",
    )
    parser.add_argument(
        "--long-poll",
        type=float,
        help="long_poll_seconds of the servers (TINKERD_LONG_POLL_SECONDS; "
        "default 5; 3 with --quick)",
    )
    parser.add_argument(
        "--poll-timeout",
        type=float,
        default=90.0,
        help="client timeout of one poll in seconds (default 90)",
    )
    parser.add_argument(
        "--api-workers",
        type=int,
        help="gunicorn API processes in the Redis modes (default: tinkerd's "
        "default, Settings.api_workers)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for every server process (repeatable)",
    )
    parser.add_argument(
        "--omp-default",
        action="store_true",
        help="leave the servers' OpenMP wait policy at its default (spinning) instead of "
        "OMP_WAIT_POLICY=PASSIVE: on a small box their idle threads then take the cores the "
        "API, Redis and this client need",
    )
    parser.add_argument("--server-log-level", default="WARNING")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.requests = args.requests or (40 if args.quick else 200)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.quick else 20)
    args.steps = args.steps or (15 if args.quick else 100)
    args.warmup_steps = (
        args.warmup_steps if args.warmup_steps is not None else (2 if args.quick else 5)
    )
    args.polls = args.polls if args.polls is not None else (200 if args.quick else 10_000)
    args.long_poll = args.long_poll or (3.0 if args.quick else 5.0)
    if min(args.requests, args.steps, args.batch, args.seq_len) < 1 or args.polls < 0:
        parser.error("--requests, --steps, --batch and --seq-len must be positive")
    if args.api_workers is None:
        from tinkerd.config import Settings

        args.api_workers = Settings().api_workers
    # The withheld seq 1 must stay missing for the whole test: no skipping of the gap.
    env = {"TINKERD_LONG_POLL_SECONDS": str(args.long_poll), "TINKERD_SEQ_GAP_SECONDS": "3600"}
    if not args.omp_default:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.update(item.split("=", 1) for item in args.server_env)

    # each poll holds a socket here (the servers raise their own limit at start)
    fd_note = raise_fd_limit(args.polls + 1024)
    omp = env.get("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "default"))
    print(
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}; {fd_note}; "
        f"OMP_WAIT_POLICY of the servers: {omp}; base model {BASE_MODEL}, LoRA rank {RANK}; "
        f"API processes in Redis modes: {args.api_workers}",
        flush=True,
    )

    work_dir = Path(tempfile.mkdtemp(prefix="tinkerd-bench-dispatch-"))
    results: list[ModeResult] = []
    failed = False
    try:
        for mode in [m for m in MODES if m in args.modes]:
            result = ModeResult(mode)
            results.append(result)
            try:
                run_mode(result, args, work_dir, env)
            except Exception as e:
                failed = True
                result.error = f"{type(e).__name__}: {e}"
                print(f"[{mode}] FAILED: {result.error}", file=sys.stderr, flush=True)
                traceback.print_exc()
    finally:
        if args.keep:
            print(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(
        f"load average afterwards {os.getloadavg()[0]:.2f} (everything shares "
        f"{os.cpu_count()} cores: the figures are noisy)"
    )
    report(results, args)
    for r in results:  # the cluster must hold every poll; the embedded server's errors are data
        phases = [p for p in (r.hold, r.release) if p is not None]
        if r.mode != "embedded" and (r.poll_error or any(p.errors for p in phases)):
            print(f"[{r.mode}] the cluster did not answer every poll", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
