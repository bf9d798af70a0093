"""The `tinkerd` command line against `tinkerd serve` running as a real process: every client
subcommand, their errors, and `--help` of each."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tinkerd.cli import main
from tinkerd.local_cluster import free_port, serve_process

ROOT = Path(__file__).resolve().parents[1]
TINKERD = Path(sys.executable).with_name("tinkerd")
COMMANDS = [
    "serve",
    "worker",
    "create",
    "list",
    "sample",
    "save",
    "delete",
    "checkpoints",
    "status",
    "loss-functions",
    "export",
]


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory):
    """`tinkerd serve` in a subprocess."""
    tmp = tmp_path_factory.mktemp("cli")
    with serve_process(tmp, env={"TINKERD_DATA_DIR": str(tmp / "data")}) as server:
        yield server.url, tmp / "data"


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def tinkerd(url: str, *args: str, cache_dir: Path | None = None) -> Ran:
    """`tinkerd ARGS` as a process: the real entry point, paying its start-up (~3 s here with
    the SDK, which imports torch)."""
    env = {**os.environ, "TINKERD_URL": url, "TINKER_TELEMETRY": "0", "HF_HUB_OFFLINE": "1"}
    if cache_dir is not None:
        env["TINKERD_CACHE_DIR"] = str(cache_dir)
    result = subprocess.run(
        [str(TINKERD), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return Ran(result.returncode, result.stdout, result.stderr)


@pytest.fixture
def cli(cli_server, capsys: pytest.CaptureFixture):
    """`tinkerd ARGS --url URL` run in this process: the same code path, without a start-up
    per command."""
    url, _ = cli_server

    def run(*args: str) -> Ran:
        capsys.readouterr()
        code = main([*args] if "--url" in args else [*args, "--url", url])
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def ok(result: Ran) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def fails(result: Ran, message: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr[-3000:])
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_example_trains_builtin_tiny_model(cli_server) -> None:
    url, data_dir = cli_server
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--url", url] + ["--steps", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TINKER_TELEMETRY": "0"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loss fell from" in out.stdout
    # The built-in model was created on first use, in the data dir the environment named.
    assert (data_dir / "models" / "tiny" / "config.json").is_file()
    assert (data_dir / "models" / "tiny" / "tokenizer.json").is_file()


def test_help_lists_serve_options() -> None:
    out = subprocess.run([str(TINKERD), "serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--host", "--port", "--data-dir"):
        assert flag in out.stdout


def test_help_lists_every_command() -> None:
    out = subprocess.run([str(TINKERD), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\b", out.stdout, re.M), command


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: tinkerd {command}")
    if command not in ("serve", "worker"):
        assert "--url" in text


def test_client_commands_against_a_live_server(cli_server, cli, tmp_path: Path) -> None:
    url, data_dir = cli_server
    assert "ok" in ok(tinkerd(url, "status"))  # as a process; the rest runs in this one

    run = ok(tinkerd(url, "create", "--model", "tinkerd/tiny", "--rank", "4", "--seed", "0"))
    run = run.strip()
    assert re.fullmatch(r"[0-9a-f]+:train:\d+", run), run

    assert run in ok(cli("list"))
    runs = json.loads(ok(cli("list", "--json")))
    [listed] = [r for r in runs if r["training_run_id"] == run]
    assert listed["base_model"] == "tinkerd/tiny"
    assert listed["lora_rank"] == 4
    assert (listed["status"], listed["worker"]) == ("active", "local")

    # save: training state, then sampler weights; a name in use is a clear error.
    assert ok(cli("save", run, "first")).strip() == f"tinker://{run}/weights/first"
    fails(cli("save", run, "first"), "already exists")
    sampler = f"tinker://{run}/sampler_weights/snap"
    assert ok(cli("save", run, "snap", "--sampler", "--ttl", "3600")).strip() == sampler
    assert (data_dir / "runs" / run / "weights" / "first" / "adapter_model.safetensors").is_file()
    fails(cli("save", run, "../x"), "invalid checkpoint name")
    fails(cli("save", "nope:train:0", "x"), "unknown training run")

    table = ok(cli("checkpoints", run))
    assert f"tinker://{run}/weights/first" in table and sampler in table
    found = {c["tinker_path"]: c for c in json.loads(ok(cli("checkpoints", run, "--json")))}
    assert found[sampler]["checkpoint_type"] == "sampler"
    assert found[sampler]["expires_at"] is not None
    assert sampler in ok(cli("checkpoints"))

    # sample: the untrained adapter (B = 0) samples exactly what its base model samples.
    args = ["sample", "The cat sees", "--max-tokens", "12", "--seed", "3"]
    base_text = ok(tinkerd(url, *args, "--model", "tinkerd/tiny"))
    assert base_text.strip()
    assert ok(cli(*args, "--checkpoint", f"tinker://{run}/weights/first")) == base_text
    assert ok(cli(*args)) == base_text  # the server's default model
    assert ok(cli(*args, "--num-samples", "2")).count("--- sample") == 2
    fails(cli(*args, "--checkpoint", f"tinker://{run}/weights/nope"), "not found")

    status = json.loads(ok(cli("status", "--json")))
    assert status["status"] == "ok" and status["queue_depth"] == 0
    assert status["runs"]["active"] >= 1 and status["workers"]["local"] >= 1
    assert "tinkerd/tiny" in status["models"]
    assert "workers" in ok(cli("status"))

    losses = ok(cli("loss-functions"))
    for name in ("cross_entropy", "importance_sampling", "ppo"):
        assert name in losses
    names = [loss["name"] for loss in json.loads(ok(cli("loss-functions", "--json")))]
    assert {"cross_entropy", "importance_sampling", "ppo"} <= set(names)

    out = tmp_path / "adapter"
    ok(tinkerd(url, "export", f"tinker://{run}/weights/first", str(out), cache_dir=tmp_path))
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    # delete: never without confirmation; one checkpoint, then all the run's checkpoints.
    fails(cli("delete", run), "--yes")
    assert f"deleted {sampler}" in ok(cli("delete", sampler, "--yes"))
    assert f"deleted tinker://{run}/weights/first" in ok(cli("delete", run, "--yes"))
    assert "no checkpoints" in ok(cli("checkpoints", run))
    assert not (data_dir / "runs" / run / "weights" / "first").exists()
    assert run in ok(cli("list"))  # the run itself stays listed


def test_client_errors_are_one_clear_line(cli_server, cli) -> None:
    url, _ = cli_server
    fails(tinkerd(url, "create", "--model", "/no/such/model"), "neither a model directory")
    fails(cli("checkpoints", "nope:train:0"), "unknown training run")
    nobody = f"http://127.0.0.1:{free_port()}"
    for args in (["list"], ["status"], ["create", "--model", "tinkerd/tiny"], ["sample", "x"]):
        fails(cli(*args, "--url", nobody), f"cannot reach tinkerd at {nobody}")


def test_save_of_a_run_from_before_a_restart_is_a_clear_error(cli_server, cli) -> None:
    """After a restart a run is listed but not loaded: saving it names the way back."""
    from tinkerd.app import create_app
    from tinkerd.config import Settings
    from tinkerd.registry import Registry
    from tinkerd.storage import CheckpointStore
    from tinkerd.tasks import Scheduler

    _, data_dir = cli_server
    run = ok(cli("create", "--model", "tinkerd/tiny", "--rank", "2")).strip()
    store = CheckpointStore(data_dir / "runs", shared=True)  # the live server's files: hands off
    app = create_app(Settings.load(data_dir=data_dir), Scheduler(), Registry(store), store)
    client = app.test_client()  # a restarted API: it lists the run, no worker holds it
    response = client.post(f"/api/v1/training_runs/{run}/save", json={"name": "x"})
    assert response.status_code == 400
    assert "create_training_client_from_state" in response.get_json()["error"]
    assert client.post("/api/v1/training_runs/nope/save", json={"name": "x"}).status_code == 404


def test_sample_cuts_the_stop_string_as_the_server_does(cli_server, cli) -> None:
    """`tinkerd sample --stop S` prints the text up to S, without it: the same text /sample
    returns for the same request (the sampler's last token completes S)."""
    import httpx

    url, _ = cli_server
    args = ["sample", "The cat sees", "--max-tokens", "16", "--seed", "5", "--temperature", "1"]
    full = ok(cli(*args, "--model", "tinkerd/tiny")).removesuffix("\n")
    words = full.split()
    assert len(words) >= 3, full
    stop = f" {words[2]}"  # a stop string in the middle of the unstopped text
    expected = full[: full.find(stop)]
    printed = ok(cli(*args, "--model", "tinkerd/tiny", "--stop", stop))
    assert printed == expected + "\n"
    assert stop not in printed

    body = {"prompt": "The cat sees", "max_tokens": 16, "seed": 5, "temperature": 1.0}
    response = httpx.post(f"{url}/sample", json={**body, "stop": [stop]}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == expected


def test_save_of_a_name_in_use_names_the_overwrite_flag(cli) -> None:
    run = ok(cli("create", "--model", "tinkerd/tiny", "--rank", "2")).strip()
    path = ok(cli("save", run, "twice")).strip()
    fails(cli("save", run, "twice"), f"checkpoint {path} already exists")
    fails(cli("save", run, "twice"), "--overwrite")
    assert ok(cli("save", run, "twice", "--overwrite")).strip() == path
    sampler = ok(cli("save", run, "snap", "--sampler")).strip()
    fails(cli("save", run, "snap", "--sampler"), "--overwrite")
    assert ok(cli("save", run, "snap", "--sampler", "--overwrite")).strip() == sampler
