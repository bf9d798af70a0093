"""A real full disk (a small tmpfs) under every write path, and creates that fail.

Each write that runs out of room answers "no space left on device (<path>)", keeps what was there
before, and leaves no temporary file; a create either writes its run.json or leaves nothing.
A create on a base model that cannot be loaded fails in seconds with one line, and leaves no run.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from tinkerd import checkpoint_io
from tinkerd.registry import ModelRecord, Registry
from tinkerd.storage import CheckpointMeta, CheckpointPath, CheckpointStore, DiskFull
from tinkerd.types import LoraConfig

pytestmark = pytest.mark.timeout(180)

WAIT = 60
HUB_NAME = "meta-llama/Llama-3-8B"
UNREACHABLE = (
    f"base model '{HUB_NAME}' could not be loaded: not a local directory and the Hugging Face "
    "hub is not reachable"
)


# -- a small filesystem to fill -----------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a disk that really fills, without touching the box's own disks."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(fs: Path, leave: int = 0) -> Path:
    """A file that takes all but about `leave` bytes of `fs`'s free space."""
    filler = fs / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb") as f:
        while (free := shutil.disk_usage(fs).free) > leave:
            try:
                f.write(b"\0" * min(1 << 20, free - leave))
                f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    return filler


def hidden(root: Path) -> list[str]:
    """Temporary entries (their names start with '.') anywhere under `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


# -- checkpoint files ---------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def trained_adapter() -> tuple:
    """A real PEFT adapter (128 KiB of weights) and its AdamW, one step in (256 KiB of state)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    peft = get_peft_model(Net(), PeftLoraConfig(r=64, target_modules=["proj"]), adapter_name="m0")
    params = [p for n, p in peft.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    peft(torch.randn(4, 256)).sum().backward()
    optimizer.step()
    return peft, optimizer


def torch_save_straight(optimizer: torch.optim.Optimizer, steps: int, directory: Path) -> None:
    """What checkpoint_io did before: torch's own writer, whose short write on a full disk says
    only "[enforce fail at inline_container.cc] unexpected pos N vs M"."""
    torch.save({"optimizer": optimizer.state_dict(), "steps": steps}, directory / "optimizer.pt")


@pytest.mark.parametrize("write_optimizer", [checkpoint_io.write_optimizer, torch_save_straight])
def test_a_save_with_room_for_the_weights_only_says_so(small_fs: Path, write_optimizer) -> None:
    """Room for the adapter but not the optimizer: DiskFull naming the checkpoint, the old
    checkpoint of that name intact, no temporary left, the room given back."""
    store = CheckpointStore(small_fs / "runs")
    peft, optimizer = trained_adapter()
    path = CheckpointPath("s:train:0", "weights", "step")

    def contents(directory: Path) -> None:
        checkpoint_io.write_adapter(peft, "m0", "base", directory)
        write_optimizer(optimizer, 1, directory)

    def meta() -> CheckpointMeta:
        return CheckpointMeta(str(path), path.kind, path.model_id, "base", {"rank": 64})

    store.write(path, meta(), contents)
    final = store.directory(path)
    before = {f.name: f.read_bytes() for f in final.iterdir()}
    weights = len(before[checkpoint_io.ADAPTER_WEIGHTS])
    assert len(before[checkpoint_io.OPTIMIZER_STATE]) > 1.5 * weights
    peft(torch.randn(4, 256)).sum().backward()
    optimizer.step()  # new weights: the overwrite would change every file

    fill(small_fs, leave=weights + 48 * 1024)  # the adapter and its config fit, not the rest
    free = shutil.disk_usage(small_fs).free
    with pytest.raises(DiskFull) as info:
        store.write(path, meta(), contents, overwrite=True)
    assert str(info.value) == f"no space left on device ({final})"
    assert info.value.status == 507 and info.value.category == "server"
    assert {f.name: f.read_bytes() for f in final.iterdir()} == before
    assert hidden(small_fs / "runs") == []
    del info  # its traceback may hold torch's writer, with a removed file still open
    gc.collect()
    assert shutil.disk_usage(small_fs).free == free


def test_a_full_disk_registers_no_run_and_a_retry_writes_run_json(small_fs: Path) -> None:
    """Creating a run writes its run.json before anything announces it: on a full disk the
    create fails (DiskFull) and leaves no run; the same create once there is room writes it,
    and a restart lists the run."""
    root = small_fs / "runs"
    registry = Registry(CheckpointStore(root))
    filler = fill(small_fs)
    model_id = "sess:train:0"

    def record() -> ModelRecord:
        return ModelRecord(model_id, "sess", "tinkerd/tiny", "tok", LoraConfig(rank=4))

    with pytest.raises(DiskFull, match=r"^no space left on device \(.*/run\.json\)$"):
        registry.add_model(record())
    assert registry.runs() == [] and registry.models() == []
    assert list(root.iterdir()) == []  # no run directory, no temporary run.json
    with pytest.raises(DiskFull):  # a retry on a disk still full: the same answer
        registry.add_model(record())
    assert registry.runs() == []

    filler.unlink()
    registry.add_model(record())
    assert (root / model_id / "run.json").is_file()
    assert [r.model_id for r in Registry(CheckpointStore(root)).runs()] == [model_id]


def test_export_on_a_full_disk_says_so_and_leaves_nothing(small_fs: Path, tmp_path: Path) -> None:
    from tinkerd.export import ExportError, export_checkpoint

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    peft, _ = trained_adapter()
    checkpoint_io.write_adapter(peft, "m0", "base", checkpoint)
    (checkpoint / "tinkerd.json").write_text(json.dumps({"base_model": str(tmp_path)}))
    fill(small_fs, leave=16 * 1024)
    out = small_fs / "exported"
    with pytest.raises(ExportError, match=rf"^no space left on device \({out}\)$"):
        export_checkpoint(checkpoint, out, merge=False, progress=lambda _: None)
    assert not out.exists() and hidden(small_fs) == []


# -- killed saves' temporaries ------------------------------------------------------------------


def test_sweep_removes_stale_temporaries_but_not_a_live_save(tmp_path: Path) -> None:
    import fcntl

    store = CheckpointStore(tmp_path / "runs", stale_seconds=60)
    kind_dir = tmp_path / "runs" / "s:train:0" / "weights"
    kind_dir.mkdir(parents=True)
    old = time.time() - 120

    def temporary(name: str, age: float) -> Path:
        entry = kind_dir / f".tmp-{name}-{uuid.uuid4().hex}"
        entry.mkdir()
        (entry / "adapter_model.safetensors").write_bytes(b"x")
        os.utime(entry, (age, age))
        return entry

    killed = temporary("killed", old)
    young = temporary("young", time.time())
    live = temporary("live", old)
    lock = os.open(live / ".lock", os.O_CREAT | os.O_WRONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a live save holds it
    os.utime(live, (old, old))
    run_tmp = kind_dir.parent / f".run.json.{uuid.uuid4().hex}"
    run_tmp.write_text("{")
    os.utime(run_tmp, (old, old))
    try:
        store.sweep_temporary()
        assert not killed.exists() and not run_tmp.exists()
        assert young.exists() and live.exists()
    finally:
        os.close(lock)
    store.sweep_temporary()  # its writer is gone (the lock is free): swept
    assert not live.exists() and young.exists()


def test_a_running_server_sweeps_killed_saves(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Not only at start: the TTL sweeper clears a killed save's temporary directory once it is
    `temp_stale_seconds` old."""
    from tinkerd.config import Settings
    from tinkerd.serve import EmbeddedServer

    settings = Settings.load(
        port=0,
        data_dir=tmp_path / "data",
        device="cpu",
        checkpoint_sweep_seconds=0.2,
        temp_stale_seconds=1.0,
    )
    srv = EmbeddedServer(settings).start()
    try:
        weights = settings.data_dir / "runs" / "s:train:0" / "weights"
        leftover = weights / f".tmp-x-{uuid.uuid4().hex}"
        leftover.mkdir(parents=True)
        deadline = time.monotonic() + 20
        while leftover.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not leftover.exists()
    finally:
        srv.stop()


# -- the whole path, through the SDK -------------------------------------------------------------


def test_sdk_on_a_full_disk(small_fs: Path, tiny_model_dir: Path) -> None:
    """A create while the disk is full answers 507 and registers nothing, so the SDK's retry,
    once there is room, writes run.json, and the run's checkpoints survive a restart. A save
    with room for the weights only fails with one clear line and keeps the old checkpoint; with
    room again the same save works."""
    import tinker
    from tinker import types

    from tinkerd.config import Settings
    from tinkerd.serve import EmbeddedServer

    settings = Settings.load(port=0, data_dir=small_fs / "data", device="cpu")
    srv = EmbeddedServer(settings).start()
    runs = settings.data_dir / "runs"
    try:
        sc = tinker.ServiceClient(base_url=srv.url, api_key="tml-test")
        filler = fill(small_fs)

        def room_again_once_refused() -> None:  # while the SDK retries
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and not any(
                "create_model" in k and "507" in k for k in srv.monitor.counters()
            ):
                time.sleep(0.05)
            filler.unlink()

        threading.Thread(target=room_again_once_refused, daemon=True).start()
        tc = sc.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0).result(
            timeout=WAIT
        )
        assert (runs / tc.model_id / "run.json").is_file()

        tokens = [5, 17, 42, 99, 300, 7]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 5},
        )

        def step() -> None:
            tc.forward_backward([datum], "cross_entropy").result(timeout=WAIT)
            tc.optim_step(types.AdamParams(learning_rate=0.05)).result(timeout=WAIT)

        step()
        path = tc.save_state("step").result(timeout=WAIT).path
        final = runs / tc.model_id / "weights" / "step"
        before = {f.name: f.read_bytes() for f in final.iterdir()}
        step()
        fill(small_fs, leave=len(before[checkpoint_io.ADAPTER_WEIGHTS]) + 48 * 1024)
        with pytest.raises(tinker.RequestFailedError) as info:
            tc.save_state("step", overwrite=True).result(timeout=WAIT)
        assert f"no space left on device ({final})" in str(info.value)
        assert {f.name: f.read_bytes() for f in final.iterdir()} == before
        assert hidden(runs) == []
        for f in small_fs.glob("filler-*"):
            f.unlink()
        assert tc.save_state("step", overwrite=True).result(timeout=WAIT).path == path
        sc.close("success").result()
    finally:
        srv.stop()
    restarted = Registry(CheckpointStore(runs))  # what a restart reads
    assert tc.model_id in [r.model_id for r in restarted.runs()]
    assert [m.tinker_path for m in CheckpointStore(runs).list(tc.model_id)] == [path]


# -- creates that fail ---------------------------------------------------------------------------


def listed(server, api_key: str = "tml-test") -> dict[str, list[str]]:
    """Where a model shows: runs, the server's capabilities, /v1/models."""
    headers = {"X-API-Key": api_key}
    runs = httpx.get(f"{server.url}/api/v1/training_runs?limit=1000", headers=headers).json()
    caps = httpx.get(f"{server.url}/api/v1/get_server_capabilities", headers=headers).json()
    models = httpx.get(f"{server.url}/v1/models", headers=headers).json()
    return {
        "runs": [r["base_model"] for r in runs["training_runs"]],
        "capabilities": [m["model_name"] for m in caps["supported_models"]],
        "models": [m["id"] for m in models["data"]],
    }


def test_a_create_that_fails_fails_fast_and_leaves_no_run(server, service_client) -> None:
    """A hub name with no hub (HF_HUB_OFFLINE here): one line, category user, in seconds; no
    run listed, nothing advertised, no run.json."""
    import tinker

    started = time.monotonic()
    with pytest.raises(tinker.RequestFailedError) as info:
        service_client.create_lora_training_client(base_model=HUB_NAME, rank=8).result(timeout=WAIT)
    assert time.monotonic() - started < 10
    assert info.value.message.startswith(f"Request failed: {UNREACHABLE} for ")
    assert info.value.category.value == "user"
    for where, names in listed(server).items():
        assert HUB_NAME not in names, where
    for run_json in (server.settings.data_dir / "runs").glob("*/run.json"):
        assert HUB_NAME not in run_json.read_text()


def test_a_failed_create_sent_again_fails_the_same(server) -> None:
    """The SDK sends a create again when its answer was lost: the model that failed stays
    gone, and the create answers the same error at once."""
    api = f"{server.url}/api/v1"
    headers = {"X-API-Key": "tml-test"}
    session = httpx.post(f"{api}/create_session", json={}, headers=headers).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": HUB_NAME}
    future = httpx.post(f"{api}/create_model", json=body, headers=headers).json()
    deadline = time.monotonic() + WAIT
    while (
        result := httpx.post(
            f"{api}/retrieve_future", json={"request_id": future["request_id"]}, headers=headers
        ).json()
    ).get("type") == "try_again" and time.monotonic() < deadline:
        pass
    assert result == {"error": UNREACHABLE, "category": "user"}
    again = httpx.post(f"{api}/create_model", json=body, headers=headers)
    assert again.status_code == 400, again.text
    assert again.json() == {"error": UNREACHABLE, "category": "user"}
    assert HUB_NAME not in listed(server)["runs"]
    info = httpx.post(f"{api}/get_info", json={"model_id": future["model_id"]}, headers=headers)
    assert info.status_code == 404


def test_tinkerd_create_on_an_unloadable_model_prints_one_line(server) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [
            Path(sys.executable).with_name("tinkerd"),
            "create",
            "--url",
            server.url,
            "--model",
            HUB_NAME,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TINKER_API_KEY": "tml-test"},
    )
    assert time.monotonic() - started < 60  # interpreter start-up included, on a busy box
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"tinkerd create: error: {UNREACHABLE}"
    assert HUB_NAME not in listed(server)["runs"]


def test_a_hub_out_of_reach_fails_in_seconds(tmp_path: Path) -> None:
    """Without HF_HUB_OFFLINE, a hub that does not answer (here: a closed port) costs one quick
    probe, not ~50 s of the hub client's retries."""
    script = (
        "from tinkerd.hf_backend import HFBackend\n"
        "from tinkerd.types import CreateModel, LoraConfig, UserError\n"
        f"backend = HFBackend({str(tmp_path)!r}, 'cpu')\n"
        "try:\n"
        f"    backend.create_model('m', CreateModel({HUB_NAME!r}, LoraConfig()))\n"
        "except UserError as e:\n"
        "    print(e.message)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",)}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    took = time.monotonic() - started
    assert done.stdout.strip() == UNREACHABLE, done.stderr[-2000:]
    assert took < 30, took  # the hub client's own retries took 50 s here
