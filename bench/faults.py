"""What survives what: faults injected into a live cluster while the SDK trains.

A local cluster (`tinkerd.local_cluster.Cluster`: a real redis-server, two `tinkerd worker`s and
`tinkerd serve --redis` under gunicorn) trains the built-in tiny model through the official SDK
while this script breaks it, one fault per trial:

- `worker-kill`: SIGKILL the worker that holds the model while 30 steps are queued. By design
  the model's memory is gone: its requests fail naming the worker, and its last `save_state`
  restores elsewhere with the same loss. A new worker replaces the dead one.
- `worker-term`: SIGTERM that worker instead: it hands the model over; nothing may fail.
- `redis-restart`: stop redis-server (it keeps an append-only file) for 3 s while a step is
  submitted, then start it again; the step completes.
- `redis-empty`: Redis forgets everything (FLUSHALL) between two steps; the workers still hold
  the models, so the same training client goes on.
- `api-kill`: SIGKILL the API process while 30 steps are queued and start it again on the same
  port; the futures survive.

Counted per fault: futures submitted, settled with a result, failed (and whether failing was the
expected outcome), hung (not settled within --settle-limit seconds of the fault: the figure that
must be 0), the slowest settle after the fault, and lost or repeated steps: each trial's losses
are compared with a twin model (same seed, same data, same operations) trained afterwards with no
fault, to 1e-5. At the end every checkpoint that `save_state` reported saved is listed through
`RestClient.list_checkpoints` and loaded again: lost checkpoints must be 0.

    .venv/bin/python bench/faults.py        # every fault, 2 trials each (~5 min on 2 cores)
    .venv/bin/python bench/faults.py --trials 8 --faults worker-kill api-kill
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TINKER_TELEMETRY", "0")
warnings.filterwarnings("ignore", category=FutureWarning)

FAULTS = ("worker-kill", "worker-term", "redis-restart", "redis-empty", "api-kill")
TOKENS = [5, 17, 42, 99, 300, 7, 8, 61, 23, 400, 12] * 12
BASE_MODEL = "tinkerd/tiny"
ENV = {
    "TINKERD_WORKER_TTL_SECONDS": "8",
    "TINKERD_LONG_POLL_SECONDS": "5",
    "OMP_WAIT_POLICY": "PASSIVE",
}


@dataclass
class Tally:
    """What the trials of one fault gave."""

    trials: int = 0
    submitted: int = 0
    ok: int = 0
    failed_expected: int = 0
    failed_unexpected: int = 0
    hung: int = 0
    slowest_settle: float = 0.0
    lost_or_repeated_steps: int = 0
    notes: list[str] = field(default_factory=list)


def datum(types: Any) -> Any:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )


class Bench:
    def __init__(self, cluster: Any, settle_limit: float) -> None:
        import tinker
        from tinker import types

        self.tinker, self.types = tinker, types
        self.cluster = cluster
        self.settle_limit = settle_limit
        self.client = tinker.ServiceClient(base_url=cluster.url, api_key="tml-bench")
        self.adam = types.AdamParams(learning_rate=1e-2)
        self.batch = [datum(types)] * 8  # 8 x 131 tokens: a step takes tens of ms
        self.seed = 100
        self.saved: list[str] = []

    # -- pieces --------------------------------------------------------------------------------

    def new_model(self, seed: int) -> Any:
        return self.client.create_lora_training_client(
            base_model=BASE_MODEL, rank=8, seed=seed
        ).result()

    def queue_steps(self, tc: Any, n: int) -> list[Any]:
        """n forward_backward + optim_step pairs, submitted without waiting (as the cookbook does);
        the forward_backward futures carry the losses."""
        steps = []
        for _ in range(n):
            steps.append(tc.forward_backward(self.batch, "cross_entropy"))
            steps.append(tc.optim_step(self.adam))
        return steps

    def owner(self, model_id: str) -> str:
        import redis

        from tinkerd.cluster.keys import PLACEMENT

        client = redis.Redis.from_url(self.cluster.redis.url, decode_responses=True)
        try:
            return str(client.hget(PLACEMENT, model_id))
        finally:
            client.close()

    def settle(
        self,
        futures: list[Any],
        fault_at: float,
        tally: Tally,
        failure_expected: Callable[[str], bool],
    ) -> list[Any]:
        """Waits for every future; returns results (None for a failure or a hang)."""
        results: list[Any] = []
        tally.submitted += len(futures)
        for future in futures:
            remaining = max(0.1, fault_at + self.settle_limit - time.monotonic())
            try:
                results.append(future.result(timeout=remaining))
                tally.ok += 1
            except (concurrent.futures.TimeoutError, TimeoutError):
                tally.hung += 1
                results.append(None)
                continue
            except Exception as e:  # a settled failure: expected or not
                message = f"{type(e).__name__}: {e}"
                if failure_expected(message):
                    tally.failed_expected += 1
                else:
                    tally.failed_unexpected += 1
                    tally.notes.append(message[:200])
                results.append(None)
            tally.slowest_settle = max(tally.slowest_settle, time.monotonic() - fault_at)
        return results

    def losses(self, results: list[Any]) -> list[float | None]:
        return [None if r is None else r.metrics["loss:sum"] for r in results[::2]]

    def compare_with_twin(
        self, seed: int, plan: list[int], got: list[float | None], tally: Tally
    ) -> None:
        """Replays the same operations on a fresh model with no fault; every loss must match."""
        twin = self.new_model(seed)
        expected: list[float] = []
        for n in plan:
            expected += self.losses([f.result(timeout=120) for f in self.queue_steps(twin, n)])
        for a, b in zip(got, expected, strict=True):
            if a is None or abs(a - b) > 1e-5 * max(1.0, abs(b)):
                tally.lost_or_repeated_steps += 1

    def save(self, tc: Any, name: str) -> None:
        self.saved.append(tc.save_state(name).result(timeout=120).path)

    # -- faults --------------------------------------------------------------------------------

    def worker_kill(self, tally: Tally) -> None:
        self.seed += 1
        tc = self.new_model(self.seed)
        [f.result() for f in self.queue_steps(tc, 2)]
        self.save(tc, f"kill-{self.seed}")
        expected = tc.forward(self.batch, "cross_entropy").result().metrics["loss:sum"]
        victim = self.owner(tc.model_id)
        futures = self.queue_steps(tc, 30)
        time.sleep(0.3)
        self.cluster.workers[victim].kill()
        fault_at = time.monotonic()
        self.settle(futures, fault_at, tally, lambda m: victim in m and "lost" in m)
        self.cluster.add_worker()
        restored = self.client.create_training_client_from_state(self.saved[-1]).result()
        loss = restored.forward(self.batch, "cross_entropy").result().metrics["loss:sum"]
        if abs(loss - expected) > 1e-5 * max(1.0, abs(expected)):
            tally.notes.append(f"restored loss {loss} != {expected} before the kill")
            tally.lost_or_repeated_steps += 1

    def worker_term(self, tally: Tally) -> None:
        self.seed += 1
        tc = self.new_model(self.seed)
        stopping = self.owner(tc.model_id)
        futures = self.queue_steps(tc, 30)
        time.sleep(0.3)
        self.cluster.workers[stopping].proc.terminate()
        fault_at = time.monotonic()
        results = self.settle(futures, fault_at, tally, lambda m: False)
        after = self.settle(self.queue_steps(tc, 2), fault_at, tally, lambda m: False)
        self.compare_with_twin(self.seed, [30, 2], self.losses(results) + self.losses(after), tally)
        self.save(tc, f"term-{self.seed}")
        self.cluster.workers[stopping].proc.wait(120)
        self.cluster.add_worker()

    def redis_restart(self, tally: Tally) -> None:
        self.seed += 1
        tc = self.new_model(self.seed)
        before = [f.result() for f in self.queue_steps(tc, 2)]
        self.cluster.redis.stop()
        fault_at = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self.queue_steps, tc, 2)  # the SDK retries its 503s
            time.sleep(3)
            self.cluster.redis.start()
            try:
                futures = pending.result(timeout=self.settle_limit)
            except Exception as e:
                tally.failed_unexpected += 1
                tally.notes.append(f"submit during the outage: {type(e).__name__}: {e}"[:200])
                return
        results = self.settle(futures, fault_at, tally, lambda m: False)
        self.compare_with_twin(self.seed, [2, 2], self.losses(before + results), tally)
        self.save(tc, f"redis-{self.seed}")

    def redis_empty(self, tally: Tally) -> None:
        import redis

        self.seed += 1
        tc = self.new_model(self.seed)
        before = [f.result() for f in self.queue_steps(tc, 2)]
        client = redis.Redis.from_url(self.cluster.redis.url)
        client.flushall()
        client.close()
        fault_at = time.monotonic()
        results = self.settle(self.queue_steps(tc, 3), fault_at, tally, lambda m: False)
        self.compare_with_twin(self.seed, [2, 3], self.losses(before + results), tally)
        try:
            self.save(tc, f"empty-{self.seed}")
        except Exception as e:
            tally.failed_unexpected += 1
            tally.notes.append(f"save after the flush: {type(e).__name__}: {e}"[:200])

    def api_kill(self, tally: Tally) -> None:
        self.seed += 1
        tc = self.new_model(self.seed)
        futures = self.queue_steps(tc, 30)
        port = self.cluster.api.port
        self.cluster.api.kill()
        fault_at = time.monotonic()
        self.cluster.start_api(port=port)
        results = self.settle(futures, fault_at, tally, lambda m: False)
        self.compare_with_twin(self.seed, [30], self.losses(results), tally)
        self.save(tc, f"api-{self.seed}")

    def lost_checkpoints(self) -> tuple[int, list[str]]:
        """Every checkpoint `save_state` reported saved: listed, and loadable."""
        rest = self.client.create_rest_client()
        listing = rest.list_user_checkpoints(limit=1000).result(timeout=60)
        listed = {c.tinker_path for c in listing.checkpoints}
        lost = []
        for path in self.saved:
            try:
                if path not in listed:
                    raise LookupError("not listed")
                restored = self.client.create_training_client_from_state(path).result()
                restored.forward(self.batch, "cross_entropy").result(timeout=120)
            except Exception as e:
                lost.append(f"{path}: {type(e).__name__}: {e}"[:200])
        return len(self.saved), lost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--trials", type=int, default=2, help="trials of each fault")
    parser.add_argument(
        "--settle-limit",
        type=float,
        default=120.0,
        help="a future not settled this long after its fault counts as hung",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)

    from tinkerd.local_cluster import Cluster

    work_dir = Path(tempfile.mkdtemp(prefix="tinkerd-faults-"))
    cluster = Cluster(work_dir, workers=2, api_workers=2, log_level="WARNING", env=ENV)
    tallies = {name: Tally() for name in args.faults}
    started = time.monotonic()
    try:
        cluster.start()
        bench = Bench(cluster, args.settle_limit)
        for trial in range(args.trials):
            for name in args.faults:
                tally = tallies[name]
                tally.trials += 1
                t0 = time.monotonic()
                try:
                    getattr(bench, name.replace("-", "_"))(tally)
                except Exception as e:  # reported: this is what is measured
                    tally.failed_unexpected += 1
                    tally.notes.append(f"trial aborted: {type(e).__name__}: {e}"[:300])
                print(
                    f"[{name} #{trial + 1}] {time.monotonic() - t0:.1f} s: ok {tally.ok}, failed "
                    f"{tally.failed_expected} (+{tally.failed_unexpected} unexpected), hung "
                    f"{tally.hung}, lost/repeated steps {tally.lost_or_repeated_steps}",
                    flush=True,
                )
        saved, lost = bench.lost_checkpoints()
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)

    print(f"\n{'fault':<14}{'trials':>7}{'futures':>8}{'ok':>6}{'failed':>8}{'unexpected':>11}"
          f"{'hung':>6}{'slowest settle':>16}{'lost/repeated steps':>21}")  # fmt: skip
    for name, t in tallies.items():
        print(f"{name:<14}{t.trials:>7}{t.submitted:>8}{t.ok:>6}{t.failed_expected:>8}"
              f"{t.failed_unexpected:>11}{t.hung:>6}{t.slowest_settle:>14.1f} s"
              f"{t.lost_or_repeated_steps:>21}")  # fmt: skip
        for note in t.notes:
            print(f"    {note}")
    print(f"checkpoints saved {saved}, lost {len(lost)}; {time.monotonic() - started:.0f} s in all")
    for line in lost:
        print(f"    {line}")
    bad = sum(t.hung + t.failed_unexpected + t.lost_or_repeated_steps for t in tallies.values())
    return 1 if bad or lost else 0


if __name__ == "__main__":
    sys.exit(main())
