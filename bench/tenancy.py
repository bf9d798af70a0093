"""What do API keys cost per request, and what do priorities and limits buy?

A server with keys checks every request's X-API-Key (a SHA-256 and a dict lookup, the key set
re-read from keys.json at most once a second) and, for a key with `max_queued`, counts its
unsettled requests; its worker runs the steps of higher-priority keys first, aging the waiting
ones (`tasks.AGING_SECONDS`) so that nothing starves. This script measures, on the built-in tiny
model (`tinkerd/tiny`, LoRA rank 8), each against a baseline run in the same process:

1. per-request cost of the key check: p50/p99 latency of a minimal forward-only
   `TrainingClient.forward([datum], "cross_entropy")` on 8 tokens, sent one after another after
   a warm-up, against an OPEN server (no keys) and against a server with --keys keys (50),
   called with one of them that has a `max_queued` (256), so the queue count is on the path
   too. Both servers run at once and the requests alternate between them in blocks, so drift in
   the machine's load falls on both alike; the ratio is keyed / open. The check itself is also
   timed in this process, without HTTP: `KeyRing.find` of a valid key, and a re-read of
   keys.json;
2. priority under contention: two keys, each with its own training client, run pipelined
   forward_backward + optim_step steps (step k+1 submitted before waiting on step k) in two
   threads at once for --duration seconds, with a batch (32 x 128 tokens, about 200 ms a step
   on 2 cores) big enough that the one worker is the bottleneck: a key's next step must be
   queued by the time its last one is done, or the other key's steps run meanwhile (with 8 x 64,
   a step of about 40 ms, on a 2-core box that another process kept busy, the low key below got
   a step every few seconds). Reported: each key's steps/s, the ratio between them and the
   longest time the second key went without a completed step (from the start of the window to
   its end). The baseline is two keys of equal priority (5 and 5, a ratio near 1); then 8 and
   2, where the low key waits for its turn until aging lifts it level with the high one:
   (8 - 2) x AGING_SECONDS = 12 s, plus a step;
3. the cost of a queue limit: the same pipelined loop alone, for --throttle-duration seconds
   each, with a key without limits and with keys of `max_queued` 4 (room for the loop's two
   steps of two requests each) and 2 (not: a request past the limit is answered 429 with
   Retry-After 1 s, which the SDK waits out). The keys take turns in --throttle-rounds slices
   (the order reversed every other round); the 429s counted in /metrics are printed.

Figures 2 and 3 run on the keyed server of figure 1 (its models stay loaded, idle). The servers
run with OMP_WAIT_POLICY=PASSIVE, as in bench/dispatch.py: the client, the API and the worker
share this machine's cores, and torch's OpenMP threads otherwise spin while they wait.

    .venv/bin/python bench/tenancy.py            # the full run (about 2 minutes on 2 cores)
    .venv/bin/python bench/tenancy.py --quick    # a smoke run: fewer requests, shorter windows
    .venv/bin/python bench/tenancy.py --duration 60 --batch 16
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatch import TRY_AGAIN, Latency, make_datum, training_batch
from live_server import ServerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TINKER_TELEMETRY", "0")

BASE_MODEL = "tinkerd/tiny"
RANK = 8
OPEN_KEY = "tml-bench"  # an open server takes any key the SDK accepts
LEARNING_RATE = 1e-4
LATENCY_KEY_MAX_QUEUED = 256
# figure 2's pairs of keys: (name, priority) each; the equal pair is the baseline
PAIRS = ((("even-a", 5), ("even-b", 5)), (("high", 8), ("low", 2)))


@dataclass
class Contention:
    """Two keys' pipelined loops at once for `seconds`."""

    names: tuple[str, str]
    priorities: tuple[int, int]
    seconds: float
    done: tuple[list[float], list[float]]  # completion times of each key's steps, from 0

    def rate(self, i: int) -> float:
        return sum(t <= self.seconds for t in self.done[i]) / self.seconds

    def longest_gap(self, i: int) -> float:
        """The longest stretch of the window in which key `i` completed no step."""
        times = [0.0, *[t for t in self.done[i] if t <= self.seconds], self.seconds]
        return max(b - a for a, b in zip(times, times[1:], strict=False))


@dataclass
class Throttle:
    """One key's pipelined loop alone, over all its slices."""

    name: str
    max_queued: int | None
    training: Any
    steps: int = 0
    seconds: float = 0.0
    refused: float = 0.0  # 429s the server answered meanwhile (all routes, from /metrics)

    @property
    def rate(self) -> float:
        return self.steps / self.seconds


# -- the SDK side --------------------------------------------------------------------------------


def connect(url: str, key: str) -> tuple[Any, Any]:
    """A ServiceClient with `key` and a fresh LoRA training client on it."""
    import tinker

    client = tinker.ServiceClient(base_url=url, api_key=key)
    training = client.create_lora_training_client(base_model=BASE_MODEL, rank=RANK, seed=0)
    return client, training.result()


def pipelined_until(training: Any, data: list[Any], start: float, stop: float) -> list[float]:
    """Pipelined steps (each submitted before waiting on the previous one) until `stop`; the
    completion time of each, relative to `start`, as this client saw it."""
    from tinker import types

    adam = types.AdamParams(learning_rate=LEARNING_RATE)
    done: list[float] = []
    previous: tuple[Any, Any] | None = None
    while True:
        current = None
        if time.perf_counter() < stop:
            current = (training.forward_backward(data, "cross_entropy"), training.optim_step(adam))
        if previous is not None:
            previous[0].result()
            previous[1].result()
            done.append(time.perf_counter() - start)
        if current is None:
            return done
        previous = current


def run_at_once(trainings: list[Any], data: list[Any], seconds: float) -> list[list[float]]:
    """Each training client's pipelined loop in its own thread, from a common start."""
    barrier = threading.Barrier(len(trainings) + 1)
    done: list[list[float]] = [[] for _ in trainings]
    failures: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        try:
            done[i] = pipelined_until(trainings[i], data, start, start + seconds)
        except BaseException as e:  # re-raised in the main thread
            failures.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(trainings))]
    for thread in threads:
        thread.start()
    barrier.wait()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return done


def warm_up(training: Any, data: list[Any], steps: int) -> None:
    from tinker import types

    for _ in range(steps):
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=LEARNING_RATE)).result()


def interleaved_latency(
    trainings: dict[str, Any], warmup: int, requests: int, block: int
) -> dict[str, Latency]:
    """Sequential forward-only requests, each timed from the SDK call to its result, to each
    server in turn, `block` at a time (which server goes first alternating from round to
    round), so that both see the same machine."""
    datum = make_datum(8, seed=1)
    for training in trainings.values():
        for _ in range(warmup):
            training.forward([datum], "cross_entropy").result()
    times: dict[str, list[float]] = {name: [] for name in trainings}
    order = list(trainings.items())
    while any(len(t) < requests for t in times.values()):
        for name, training in order:
            for _ in range(min(block, requests - len(times[name]))):
                start = time.perf_counter()
                training.forward([datum], "cross_entropy").result()
                times[name].append(time.perf_counter() - start)
        order.reverse()
    return {name: Latency(t) for name, t in times.items()}


def check_in_process(data_dir: Path, secret: str, calls: int = 20_000) -> tuple[float, float]:
    """What the key check costs in the API process, without HTTP: microseconds per
    `KeyRing.find` of a valid key, and milliseconds per re-read of keys.json (once a second)."""
    from tinkerd.keys import FileKeys, KeyRing

    ring = KeyRing(FileKeys(data_dir))
    start = time.perf_counter()
    for _ in range(calls):
        assert ring.find(secret) is not None
    find = (time.perf_counter() - start) / calls
    reads = 50
    start = time.perf_counter()
    for _ in range(reads):
        ring.store.all()
    return 1e6 * find, 1e3 * (time.perf_counter() - start) / reads


# -- the servers ---------------------------------------------------------------------------------


def make_keys(data_dir: Path, count: int, max_queued: list[int]) -> dict[str, str]:
    """The keyed server's keys, in its data dir before it starts: name -> secret. Fillers bring
    the set to `count` keys, so the server's key ring is realistically full."""
    from tinkerd.keys import FileKeys, create_key

    store = FileKeys(data_dir)
    specs: dict[str, dict[str, Any]] = {
        "bench": {"max_queued": LATENCY_KEY_MAX_QUEUED},
        **{name: {"priority": priority} for pair in PAIRS for name, priority in pair},
        "unlimited": {},
        **{f"queue-{n}": {"max_queued": n} for n in max_queued},
        "ops": {"admin": True},  # reads /metrics
    }
    for i in range(count - len(specs)):
        specs[f"tenant-{i:03d}"] = {"priority": i % 11}
    return {name: create_key(store, name, **spec)[0] for name, spec in specs.items()}


def refusals(url: str, admin_key: str) -> float:
    """429s the server has answered so far, from /metrics (counted per route and status, not
    per key: only one key runs at a time here)."""
    request = urllib.request.Request(f"{url}/metrics", headers={"X-API-Key": admin_key})
    with urllib.request.urlopen(request, timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tinkerd_http_errors_total{") and 'status="429"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_servers(
    servers: dict[str, ServerProcess], work_dir: Path, env: dict[str, str], args: argparse.Namespace
) -> dict[str, str]:
    """Start the open and the keyed server together into `servers`; the keyed one's secrets."""
    for name in ("open", "keyed"):
        (work_dir / name).mkdir()
    secrets = make_keys(work_dir / "keyed" / "data", args.keys, args.max_queued)
    for name in ("open", "keyed"):
        servers[name] = ServerProcess(work_dir / name, [], args.server_log_level, env)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: s.wait_ready(), servers.values()))
    return secrets


def close_all(clients: list[Any]) -> None:
    """End the SDK sessions of `clients` (and their heartbeats)."""
    while clients:
        try:
            clients.pop().close("success").result()
        except Exception:  # noqa: BLE001 - its server is already gone
            pass


# -- main ----------------------------------------------------------------------------------------


def ratio(value: float, base: float) -> str:
    return "-" if base == 0 else f"{value / base:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; noisy figures")
    parser.add_argument(
        "--requests", type=int, help="timed forwards per server (default 300; 60 with --quick)"
    )
    parser.add_argument("--warmup", type=int, help="untimed forwards first (default 20; 5)")
    parser.add_argument(
        "--block", type=int, default=20, help="forwards to one server before the other (20)"
    )
    parser.add_argument("--keys", type=int, default=50, help="keys on the keyed server (50)")
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds each pair of keys trains at once (default 30; 15 with --quick)",
    )
    parser.add_argument(
        "--throttle-duration",
        type=float,
        help="seconds of each key's loop alone in figure 3, over all rounds (default 10; 4 "
        "with --quick)",
    )
    parser.add_argument(
        "--throttle-rounds",
        type=int,
        default=2,
        help="rounds that figure 3's keys take turns in, each a slice of --throttle-duration (2)",
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        nargs="*",
        default=[4, 2],
        help="limits to try in figure 3 (default 4 2; none skips it)",
    )
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (3)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step (32)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (128)")
    parser.add_argument(
        "--omp-default",
        action="store_true",
        help="leave the servers' OpenMP wait policy at its default (spinning)",
    )
    parser.add_argument("--server-log-level", default="WARNING")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.requests = args.requests or (60 if args.quick else 300)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.quick else 20)
    args.duration = args.duration or (15.0 if args.quick else 30.0)
    args.throttle_duration = args.throttle_duration or (4.0 if args.quick else 10.0)
    numbers = (args.requests, args.block, args.batch, args.seq_len, args.duration)
    if min(*numbers, args.throttle_duration, args.throttle_rounds) <= 0:
        parser.error("counts and durations must be positive")
    args.max_queued = sorted(set(args.max_queued), reverse=True)
    if min(args.max_queued, default=1) < 1:
        parser.error("--max-queued limits must be at least 1")
    if args.keys < 7 + len(args.max_queued):  # those make_keys names
        parser.error(f"--keys must be at least {7 + len(args.max_queued)}")
    env = {} if args.omp_default else {"OMP_WAIT_POLICY": "PASSIVE"}

    from tinkerd.tasks import AGING_SECONDS

    omp = env.get("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "default"))
    print(
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}; OMP_WAIT_POLICY of the "
        f"servers: {omp}; base model {BASE_MODEL}, LoRA rank {RANK}; AGING_SECONDS "
        f"{AGING_SECONDS:g}",
        flush=True,
    )
    work_dir = Path(tempfile.mkdtemp(prefix="tinkerd-bench-tenancy-"))
    servers: dict[str, ServerProcess] = {}
    clients: dict[str, list[Any]] = {"open": [], "keyed": []}  # server -> its SDK clients
    latency: dict[str, Latency] = {}
    in_process: tuple[float, float] | None = None
    contention: list[Contention] = []
    throttles: list[Throttle] = []
    failed = False
    try:
        started = time.perf_counter()
        secrets = start_servers(servers, work_dir, env, args)
        print(f"servers up in {time.perf_counter() - started:.1f} s", flush=True)

        def training_for(server: str, key: str) -> Any:
            client, training = connect(servers[server].url, key)
            clients[server].append(client)
            return training

        # 1. the key check
        trainings = {
            "open": training_for("open", OPEN_KEY),
            "keyed": training_for("keyed", secrets["bench"]),
        }
        latency = interleaved_latency(trainings, args.warmup, args.requests, args.block)
        for name, lat in latency.items():
            print(
                f"[latency] {name}: p50 {lat.p50:.1f} ms, p99 {lat.p99:.1f} ms, mean "
                f"{lat.mean:.1f} ms over {args.requests}",
                flush=True,
            )
        close_all(clients["open"])  # before its server goes, or the SDK's heartbeats complain
        servers.pop("open").stop()
        in_process = check_in_process(work_dir / "keyed" / "data", secrets["bench"])
        print(
            f"[in process] KeyRing.find {in_process[0]:.1f} us, keys.json re-read "
            f"{in_process[1]:.2f} ms",
            flush=True,
        )

        # 2. priorities under contention
        keyed = servers["keyed"]
        data = training_batch(args.batch, args.seq_len)
        for pair_keys in PAIRS:
            names = (pair_keys[0][0], pair_keys[1][0])
            priorities = (pair_keys[0][1], pair_keys[1][1])
            pair = [training_for("keyed", secrets[n]) for n in names]
            for training in pair:
                warm_up(training, data, args.warmup_steps)
            done = run_at_once(pair, data, args.duration)
            result = Contention(names, priorities, args.duration, (done[0], done[1]))
            contention.append(result)
            print(
                f"[priority {priorities[0]} vs {priorities[1]}] {names[0]} "
                f"{result.rate(0):.2f} steps/s, {names[1]} {result.rate(1):.2f} steps/s, "
                f"longest gap of {names[1]} {result.longest_gap(1):.1f} s",
                flush=True,
            )
            if len(done[1]) <= 10:
                times = ", ".join(f"{t:.1f}" for t in done[1])
                print(
                    f"[priority {priorities[0]} vs {priorities[1]}] {names[1]}'s steps done at "
                    f"{times} s",
                    flush=True,
                )

        # 3. queue limits, in rounds of a slice each (the order reversed every other round)
        limits = [(f"queue-{n}", n) for n in args.max_queued]
        limits = [("unlimited", None), *limits] if limits else []
        for name, limit in limits:
            training = training_for("keyed", secrets[name])
            warm_up(training, data, args.warmup_steps)
            throttles.append(Throttle(name, limit, training))
        for round_ in range(args.throttle_rounds):
            for t in throttles if round_ % 2 == 0 else throttles[::-1]:
                before = refusals(keyed.url, secrets["ops"])
                start = time.perf_counter()
                stop = start + args.throttle_duration / args.throttle_rounds
                t.steps += len(pipelined_until(t.training, data, start, stop))
                t.seconds += time.perf_counter() - start
                t.refused += refusals(keyed.url, secrets["ops"]) - before
        for t in throttles:
            print(
                f"[max_queued {t.max_queued or 'none'}] {t.rate:.2f} steps/s, {t.refused:.0f} 429s",
                flush=True,
            )
    except Exception as e:
        failed = True
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        traceback.print_exc()
        for name, server in servers.items():
            print(f"--- {name} server log ---\n{server.log_tail()}", file=sys.stderr)
    finally:
        for server_clients in clients.values():
            close_all(server_clients)
        for server in servers.values():
            server.stop()
        if args.keep:
            print(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    print(f"load average afterwards {os.getloadavg()[0]:.2f}")
    report(args, latency, in_process, contention, throttles, AGING_SECONDS)
    return 1 if failed else 0


def report(
    args: argparse.Namespace,
    latency: dict[str, Latency],
    in_process: tuple[float, float] | None,
    contention: list[Contention],
    throttles: list[Throttle],
    aging: float,
) -> None:
    if latency:
        open_, keyed = latency["open"], latency["keyed"]
        print(
            f"\n1. key check: {args.requests} sequential forwards (8 tokens) per server after "
            f"{args.warmup} warm-up, alternating in blocks of {args.block}; ratio = keyed / open"
        )
        header = f"{'':<10} {'open':>8} {f'keyed ({args.keys})':>12} {'ratio':>6}"
        print(header)
        print("-" * len(header))
        for label in ("p50", "p99", "mean"):
            a, b = getattr(open_, label), getattr(keyed, label)
            print(f"{label + ' ms':<10} {a:>8.1f} {b:>12.1f} {ratio(b, a):>6}")
    if in_process:
        print(
            f"the check itself, in process: {in_process[0]:.1f} us per KeyRing.find of a valid "
            f"key among {args.keys}; re-reading keys.json (at most once a second) "
            f"{in_process[1]:.2f} ms"
        )
    if contention:
        print(
            f"\n2. two keys training at once for {args.duration:g} s, pipelined, batch "
            f"{args.batch} x {args.seq_len}; ratio = first / second"
        )
        header = (
            f"{'priorities':<11} {'steps/s':>8} {'steps/s':>8} {'ratio':>7} {'sum':>6} "
            f"{'second: longest gap s':>22} {'bound s':>8}"
        )
        print(header)
        print("-" * len(header))
        for c in contention:
            bound = (c.priorities[0] - c.priorities[1]) * aging
            print(
                f"{f'{c.priorities[0]} vs {c.priorities[1]}':<11} {c.rate(0):>8.2f} "
                f"{c.rate(1):>8.2f} {ratio(c.rate(0), c.rate(1)):>7} "
                f"{c.rate(0) + c.rate(1):>6.2f} {c.longest_gap(1):>22.1f} {bound:>8.1f}"
            )
        print(
            "longest gap: the longest stretch of the window without a completed step of the "
            "second key; bound: (difference in priority) x AGING_SECONDS, the wait after which "
            "aging lifts it level with the first (plus a step)"
        )
        for c in contention:
            bound = (c.priorities[0] - c.priorities[1]) * aging
            # aging gives the second key a step per `bound` s, and it may finish the two it
            # submitted at the start before the first key's queue fills
            if bound > 0 and c.rate(1) * c.seconds > c.seconds / (0.8 * bound) + 2:
                print(
                    f"note ({c.priorities[0]} vs {c.priorities[1]}): {c.names[1]} got more steps "
                    "than aging alone would give it, so the worker was not always contended: "
                    f"{c.names[0]}'s next step was not always queued when a cycle began (a busy "
                    "machine slows the client); a bigger --batch makes the worker the bottleneck"
                )
    if throttles:
        base = throttles[0]
        print(
            f"\n3. one key's pipelined loop alone for {args.throttle_duration:g} s; "
            "ratio = limited / unlimited"
        )
        header = f"{'max_queued':<11} {'steps/s':>8} {'ratio':>6} {'429s':>6}"
        print(header)
        print("-" * len(header))
        for t in throttles:
            limit = "none" if t.max_queued is None else str(t.max_queued)
            print(f"{limit:<11} {t.rate:>8.2f} {ratio(t.rate, base.rate):>6} {t.refused:>6.0f}")
    if TRY_AGAIN.count:
        print(f"(the SDK got try_again {TRY_AGAIN.count} times: polls longer than the long-poll)")


if __name__ == "__main__":
    sys.exit(main())
