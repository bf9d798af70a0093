"""Stopping and starting again on the same data directory, with real processes.

A clean stop (SIGTERM) of `tinkerd serve`, or of every worker of a cluster at once, keeps each
model exactly as it was (weights, AdamW state, gradients of a forward_backward not yet stepped),
and the next start answers the same model ids: the same SDK TrainingClient trains on, with the
losses of a twin that was never interrupted. Workers stopping together never hand their models
to each other. And several processes building the built-in tiny model into one fresh data
directory at once all succeed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import tinker
from tinker import types

from tinkerd.checkpoint_io import GRADIENTS
from tinkerd.cluster.handoff import arrived, leave
from tinkerd.cluster.keys import LOST, PLACEMENT, STOPPED, WORKERS, incoming_key, worker_key
from tinkerd.cluster.state import live_workers
from tinkerd.local_cluster import APIProcess, Cluster, free_port

pytestmark = pytest.mark.timeout(300)

TOKENS = [5, 17, 42, 99, 300, 7, 8, 61, 23, 400, 12]
ADAM = types.AdamParams(learning_rate=0.01)


def datum(tokens: list[int] = TOKENS) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def step(tc: tinker.TrainingClient) -> float:
    loss = tc.forward_backward([datum()], "cross_entropy").result(timeout=120)
    tc.optim_step(ADAM).result(timeout=120)
    return loss.metrics["loss:sum"]


def first_half(tc: tinker.TrainingClient) -> list[float]:
    """Two steps, then a forward_backward whose gradients wait for a step."""
    losses = [step(tc), step(tc)]
    pending = tc.forward_backward([datum()], "cross_entropy")
    return [*losses, pending.result(timeout=120).metrics["loss:sum"]]


def second_half(tc: tinker.TrainingClient) -> list[float]:
    """The pending step, then two more."""
    tc.optim_step(ADAM).result(timeout=120)
    return [step(tc), step(tc)]


def create(service: tinker.ServiceClient, seed: int = 3) -> tinker.TrainingClient:
    future = service.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=seed)
    return future.result()


def serve(data: Path, port: int, log: Path) -> APIProcess:
    args = ["--data-dir", str(data), "--device", "cpu", "--log-level", "INFO"]
    return APIProcess(args, log, port, env={"HF_HUB_OFFLINE": "1"}).wait_ready()


def test_a_clean_stop_of_serve_keeps_every_model_for_the_next_start(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    server = serve(data, port, tmp_path / "first.log")
    try:
        service = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
        twin = service.create_lora_training_client(
            base_model="tinkerd/tiny", rank=8, seed=3
        ).result()
        expected = first_half(twin) + second_half(twin)  # never interrupted
        tc = create(service)
        losses = first_half(tc)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == 0, server.log_tail()
    finally:
        server.stop()

    manifests = [json.loads(p.read_text()) for p in (data / "stopped").glob("*.json")]
    assert {m["model_id"] for m in manifests} == {tc.model_id, twin.model_id}
    saved = next(m for m in manifests if m["model_id"] == tc.model_id)["checkpoint"]
    saved_dir = data / "runs" / saved.removeprefix("tinker://")
    meta = json.loads((saved_dir / "tinkerd.json").read_text())
    assert meta["expires_at"] is None  # nothing a clean stop saves expires
    assert (saved_dir / GRADIENTS).is_file()  # the forward_backward not yet stepped

    server = serve(data, port, tmp_path / "second.log")  # the same address: the SDK goes on
    try:
        losses += second_half(tc)  # the same TrainingClient, its model id and seq_ids
        assert losses == pytest.approx(expected, rel=1e-5)
        run = httpx.get(f"{server.url}/api/v1/training_runs/{tc.model_id}", timeout=10).json()
        assert run["status"] == "active", run
        assert list((data / "stopped").glob("*.json")) == []  # claimed
        assert not saved_dir.exists()  # consumed once the model lives again
        service.close("success").result(timeout=30)
    finally:
        server.stop()


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


def register(client: redis.Redis, name: str, draining: bool = False) -> None:
    """A worker's registration, as its heartbeat writes it."""
    client.set(worker_key(name), json.dumps({"name": name, "draining": draining}), px=60_000)
    client.sadd(WORKERS, name)


def test_a_stopping_worker_waits_for_a_hand_over_to_it_and_hands_to_no_stopping_one(
    client: redis.Redis,
) -> None:
    for name in ("a", "b"):
        register(client, name)
    assert leave(client, "a", lambda: register(client, "a", draining=True), 30) == "b"
    assert int(client.get(incoming_key("b"))) == 1  # reserved: b must not leave meanwhile

    left: list[str | None] = []
    b = threading.Thread(
        target=lambda: left.append(leave(client, "b", lambda: register(client, "b", True), 30))
    )
    b.start()
    time.sleep(1.5)
    assert left == [] and not live_workers(client)["b"]["draining"]  # b waits, still open
    arrived(client, "b")  # a's models are in b's queue now
    b.join(10)
    assert left == [None]  # a is stopping: b keeps everything (`keep`)
    assert live_workers(client)["b"]["draining"]


def stop_together(client: redis.Redis, names: list[str]) -> dict[str, tuple[str | None, bool]]:
    """Each worker of `names` leaves at the same moment, in a thread of its own: the target
    each picked, and whether that target was stopping when picked."""
    picked: dict[str, tuple[str | None, bool]] = {}
    start = threading.Barrier(len(names))

    def stop(me: str) -> None:
        start.wait()
        target = leave(client, me, lambda: register(client, me, draining=True), 30)
        stopping = target is not None and live_workers(client)[target]["draining"]
        picked[me] = (target, stopping)
        if target is not None:
            time.sleep(0.05)  # the hand-over
            arrived(client, target)

    threads = [threading.Thread(target=stop, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return picked


def test_workers_stopping_at_once_never_hand_over_to_each_other(client: redis.Redis) -> None:
    for _ in range(20):
        client.flushdb()
        for name in ("a", "b", "c"):
            register(client, name)
        picked = stop_together(client, ["a", "b", "c"])
        assert len(picked) == 3
        assert not any(stopping for _, stopping in picked.values()), picked
        targets = {me: target for me, (target, _) in picked.items()}
        # the models gather on one worker, the last to stop, which hands to nobody
        assert list(targets.values()).count(None) == 1, targets
        for me, target in targets.items():
            assert target is None or targets[target] != me, targets


def test_a_whole_cluster_stopped_at_once_keeps_its_models_for_the_next_start(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path, workers=2, env={"TINKERD_WORKER_TTL_SECONDS": "8"})
    try:
        cluster.start()
        service = tinker.ServiceClient(base_url=cluster.url, api_key="tml-test")
        twins = {seed: create(service, seed) for seed in (3, 4)}  # never interrupted
        expected = {seed: first_half(t) + second_half(t) for seed, t in twins.items()}
        clients = {seed: create(service, seed) for seed in (3, 4)}
        losses = {seed: first_half(tc) for seed, tc in clients.items()}
        rdb = redis.Redis.from_url(cluster.redis.url, decode_responses=True)
        holders = {rdb.hget(PLACEMENT, tc.model_id) for tc in clients.values()}
        assert holders == set(cluster.workers), holders  # one on each worker

        stopping = list(cluster.workers.values())
        for worker in stopping:  # SIGTERM to both at once, as run_server.sh's Ctrl-C does
            worker.proc.send_signal(signal.SIGTERM)
        for worker in stopping:
            assert worker.proc.wait(120) == 0, worker.log_tail()
        ids = {tc.model_id for tc in clients.values()}
        assert ids <= set(rdb.hkeys(STOPPED)), cluster.logs()
        assert not ids & set(rdb.hkeys(LOST)) and not ids & set(rdb.hkeys(PLACEMENT))
        run = httpx.get(f"{cluster.url}/api/v1/training_runs/{clients[3].model_id}", timeout=10)
        assert run.json()["status"] == "stopped", run.text

        for _ in stopping:
            cluster.add_worker()  # new workers, new names: the same data directory
        for seed, tc in clients.items():
            losses[seed] += second_half(tc)  # the same TrainingClients go on
            assert losses[seed] == pytest.approx(expected[seed], rel=1e-5)
        assert not ids & set(rdb.hkeys(STOPPED))
        assert list((cluster.data_dir / "stopped").glob("*.json")) == []
        service.close("success").result(timeout=30)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
