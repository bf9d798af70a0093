"""REST for training runs and checkpoints through the SDK's RestClient: listing, paging,
weights_info, delete, TTL expiry and the sweeper; and checkpoints and run records that survive a
`tinkerd serve` restart and a kill -9."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tinkerd.local_cluster import serve_process
from tinkerd.storage import CheckpointPath

pytestmark = pytest.mark.timeout(180)

WAIT = 60
KEY = "tml-test"
TINKERD = Path(sys.executable).with_name("tinkerd")
SEQS = [[5, 17, 42, 99, 300, 7, 64, 12], [9, 8, 7, 6, 5], [101, 202, 303, 404, 505, 606]]
DATA = [
    types.Datum(
        model_input=types.ModelInput.from_ints(s[:-1]),
        loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)},
    )
    for s in SEQS
]


# -- helpers ---------------------------------------------------------------------------------


def train(tc, steps: int, lr: float = 0.02) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(DATA, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=lr))
        losses.append(fb.result(timeout=WAIT).metrics["loss:sum"])
        opt.result(timeout=WAIT)
    return losses


def forward_logprobs(tc) -> list[np.ndarray]:
    out = tc.forward(DATA, "cross_entropy").result(timeout=WAIT)
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]


def not_found(future, *fragments: str) -> str:
    """A clear 404: the SDK raises NotFoundError with a JSON user error naming the problem."""
    with pytest.raises(tinker.NotFoundError) as info:
        future.result(timeout=WAIT)
    body = info.value.body
    assert isinstance(body, dict) and body["category"] == "user", body
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body["error"]


def load_state(tc, path: str, optimizer: bool = True):
    with warnings.catch_warnings():  # deprecated in the SDK, but still served
        warnings.simplefilter("ignore")
        return tc.load_state_with_optimizer(path) if optimizer else tc.load_state(path)


@pytest.fixture
def rest(server) -> tinker.RestClient:
    return tinker.RestClient(base_url=server.url, api_key=KEY)


def new_client(service_client, model_dir, **kwargs):
    kwargs = {"rank": 8, "seed": 0, **kwargs}
    return service_client.create_lora_training_client(base_model=str(model_dir), **kwargs).result(
        timeout=WAIT
    )


# -- training runs ---------------------------------------------------------------------------


def test_training_runs_are_listed_a_page_at_a_time(
    server, service_client, tiny_model_dir, rest
) -> None:
    mine = [
        new_client(service_client, tiny_model_dir, rank=r, user_metadata={"n": str(r)})
        for r in (2, 4, 6)
    ]
    first = rest.list_training_runs().result(timeout=WAIT)
    total = first.cursor.total_count
    assert total >= 3 and (first.cursor.offset, first.cursor.limit) == (0, 20)

    seen: list[str] = []
    for offset in range(0, total, 2):
        page = rest.list_training_runs(limit=2, offset=offset).result(timeout=WAIT)
        assert (page.cursor.offset, page.cursor.limit, page.cursor.total_count) == (
            offset,
            2,
            total,
        )
        assert len(page.training_runs) == min(2, total - offset)
        seen += [r.training_run_id for r in page.training_runs]
    assert len(seen) == len(set(seen)) == total  # no run twice, none left out
    assert seen[-3:] == [tc.model_id for tc in mine]  # oldest first, so ours come last
    past_end = rest.list_training_runs(limit=5, offset=total).result(timeout=WAIT)
    assert past_end.training_runs == [] and past_end.cursor.total_count == total

    run = rest.get_training_run(mine[1].model_id).result(timeout=WAIT)
    assert run.training_run_id == mine[1].model_id
    assert run.base_model == str(tiny_model_dir)
    assert run.is_lora and run.lora_rank == 4
    assert run.user_metadata == {"n": "4"}
    assert run.last_checkpoint is None and run.last_sampler_checkpoint is None


@pytest.mark.parametrize("query", ["limit=0", "limit=-1", "offset=-1", "limit=x", "offset=1.5"])
def test_bad_paging_is_a_user_error(server, query: str) -> None:
    for endpoint in ("training_runs", "checkpoints"):
        r = httpx.get(f"{server.url}/api/v1/{endpoint}?{query}", headers={"X-API-Key": KEY})
        assert r.status_code == 400, r.text
        assert r.json()["category"] == "user" and "limit" in r.json()["error"]


def test_unknown_training_run(server, rest) -> None:
    not_found(rest.get_training_run("no-such-run"), "no-such-run")
    not_found(rest.list_checkpoints("no-such-run"), "no-such-run")
    not_found(rest.get_training_run_by_tinker_path("tinker://no-such-run/weights/x"))


# -- checkpoints -----------------------------------------------------------------------------


def test_checkpoints_are_listed_with_their_metadata(
    server, service_client, tiny_model_dir, rest
) -> None:
    tc = new_client(service_client, tiny_model_dir, rank=4, train_unembed=False)
    train(tc, 1)
    t0 = time.time()
    first = tc.save_state("list-a", ttl_seconds=3600, user_metadata={"step": "1"}).result(
        timeout=WAIT
    )
    second = tc.save_weights_for_sampler("list-b").result(timeout=WAIT)
    third = tc.save_state("list-c").result(timeout=WAIT)

    listed = rest.list_checkpoints(tc.model_id).result(timeout=WAIT).checkpoints
    assert [c.tinker_path for c in listed] == [first.path, second.path, third.path]
    a, b, c = listed
    assert (a.checkpoint_id, a.checkpoint_type) == ("weights/list-a", "training")
    assert (b.checkpoint_id, b.checkpoint_type) == ("sampler_weights/list-b", "sampler")
    assert a.user_metadata == {"step": "1"} and b.user_metadata is None
    assert a.expires_at is not None
    assert 3500 < a.expires_at.timestamp() - t0 < 3700
    assert b.expires_at is None and c.expires_at is None
    for ckpt in listed:
        assert abs(ckpt.time.timestamp() - t0) < 60
        directory = server.store.directory(CheckpointPath.parse(ckpt.tinker_path))
        sizes = {f.name: f.stat().st_size for f in directory.iterdir()}
        # Every file counts (tinkerd.json, holding the size itself, only about).
        assert sum(sizes.values()) - 50 <= ckpt.size_bytes <= sum(sizes.values())
        assert ckpt.size_bytes > sizes["adapter_model.safetensors"]
        assert not ckpt.public
    assert a.size_bytes > b.size_bytes  # the optimizer state is in training checkpoints only

    run = rest.get_training_run(tc.model_id).result(timeout=WAIT)
    assert run.last_checkpoint.tinker_path == third.path
    assert run.last_sampler_checkpoint.tinker_path == second.path
    assert rest.get_training_run_by_tinker_path(first.path).result().training_run_id == tc.model_id

    info = rest.get_weights_info_by_tinker_path(second.path).result(timeout=WAIT)
    assert info.base_model == str(tiny_model_dir) and info.is_lora
    assert (info.lora_rank, info.train_attn, info.train_mlp, info.train_unembed) == (
        4,
        True,
        True,
        False,
    )

    # GET checkpoints: every run's, newest first, paged.
    everything = rest.list_user_checkpoints().result(timeout=WAIT)
    total = everything.cursor.total_count
    assert total == len(everything.checkpoints) >= 3
    assert [c.tinker_path for c in everything.checkpoints[:3]] == [
        third.path,
        second.path,
        first.path,
    ]
    times = [c.time for c in everything.checkpoints]
    assert times == sorted(times, reverse=True)
    page = rest.list_user_checkpoints(limit=2, offset=1).result(timeout=WAIT)
    assert [c.tinker_path for c in page.checkpoints] == [second.path, first.path]
    assert (page.cursor.offset, page.cursor.limit, page.cursor.total_count) == (1, 2, total)


def test_deleted_checkpoint_is_gone_everywhere(
    server, service_client, training_client, rest
) -> None:
    tc = training_client
    weights = tc.save_state("delete-me").result(timeout=WAIT).path
    sampler = tc.save_weights_for_sampler("delete-me-too").result(timeout=WAIT).path
    keep = tc.save_state("keep-me").result(timeout=WAIT).path
    directory = server.store.directory(CheckpointPath.parse(weights))
    assert directory.is_dir()

    rest.delete_checkpoint_from_tinker_path(weights).result(timeout=WAIT)
    rest.delete_checkpoint(tc.model_id, "sampler_weights/delete-me-too").result(timeout=WAIT)
    assert not directory.exists()
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]

    listed = [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    assert keep in listed and weights not in listed and sampler not in listed
    every = [c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints]
    assert weights not in every and sampler not in every
    run = rest.get_training_run(tc.model_id).result(timeout=WAIT)
    assert run.last_checkpoint.tinker_path == keep
    assert run.last_sampler_checkpoint is None or run.last_sampler_checkpoint.tinker_path != sampler

    for path in (weights, sampler):
        not_found(load_state(tc, path, optimizer=False), "not found")
        not_found(service_client.create_training_client_from_state(path), "not found")
        not_found(service_client.create_sampling_client(model_path=path), "not found")
        not_found(rest.get_weights_info_by_tinker_path(path), "not found")
        not_found(rest.delete_checkpoint_from_tinker_path(path), "not found")
    # The name is free again, and the client and the kept checkpoint still work.
    train(tc, 1)
    assert tc.save_state("delete-me").result(timeout=WAIT).path == weights
    load_state(tc, keep).result(timeout=WAIT)


def test_bad_delete_requests(server, training_client) -> None:
    base = f"{server.url}/api/v1/training_runs/{training_client.model_id}/checkpoints"
    for suffix, status in (
        ("other/x", 400),
        ("weights/%2E%2E", 400),
        ("weights/.hidden", 400),
        ("weights/nope", 404),
    ):
        r = httpx.delete(f"{base}/{suffix}", headers={"X-API-Key": KEY})
        assert r.status_code == status, (suffix, r.text)
        assert r.json()["category"] == "user"


def test_expired_checkpoints_are_swept(tmp_path, tiny_model_dir) -> None:
    """With a 1 s TTL, the sweeper removes a checkpoint from disk on its own, without anyone
    asking for it; it is then refused (404) and no longer listed. Others stay."""
    from tinkerd.config import Settings
    from tinkerd.serve import EmbeddedServer

    settings = Settings.load(
        host="127.0.0.1",
        port=0,
        data_dir=tmp_path / "data",
        device="cpu",
        long_poll_seconds=5.0,
        checkpoint_sweep_seconds=0.2,
    )
    srv = EmbeddedServer(settings).start()
    client = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
    try:
        rest = tinker.RestClient(base_url=srv.url, api_key=KEY)
        tc = new_client(client, tiny_model_dir)
        t0 = time.monotonic()
        short = tc.save_state("short", ttl_seconds=1).result(timeout=WAIT).path
        sampler = tc.save_weights_for_sampler("short-sampler", ttl_seconds=1).result().path
        long = tc.save_state("long", ttl_seconds=3600).result(timeout=WAIT).path
        dirs = [srv.store.directory(CheckpointPath.parse(p)) for p in (short, sampler, long)]
        assert all(d.is_dir() for d in dirs)

        # Only the file system is watched here: the API never touches these checkpoints.
        while any(d.exists() for d in dirs[:2]) and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert not dirs[0].exists() and not dirs[1].exists()
        assert time.monotonic() - t0 >= 0.9  # not before their time
        assert dirs[2].is_dir()

        not_found(load_state(tc, short), "not found")
        not_found(client.create_training_client_from_state(short))
        not_found(client.create_sampling_client(model_path=sampler))
        not_found(rest.get_weights_info_by_tinker_path(short))
        listed = [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
        assert listed == [long]
        load_state(tc, long).result(timeout=WAIT)
    finally:
        client.close("success").result()
        srv.stop()


# -- restarts --------------------------------------------------------------------------------


@contextmanager
def tinkerd_serve(data_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`tinkerd serve` as a process on `data_dir`; stopped with SIGTERM unless already dead."""
    with serve_process(data_dir.parent, ["--data-dir", str(data_dir)]) as server:
        yield server.url, server.proc


@contextmanager
def sdk(url: str) -> Iterator[tuple[tinker.ServiceClient, tinker.RestClient]]:
    client = tinker.ServiceClient(base_url=url, api_key="tml-x")
    try:
        yield client, tinker.RestClient(base_url=url, api_key="tml-x")
    finally:
        try:
            client.close("success").result(timeout=0.5)
        except Exception:  # the server may be gone on purpose
            pass


@contextmanager
def embedded(data_dir: Path) -> Iterator[str]:
    """tinkerd in this process (a quicker start than a new process) on `data_dir`."""
    from tinkerd.config import Settings
    from tinkerd.serve import EmbeddedServer

    settings = Settings.load(host="127.0.0.1", port=0, data_dir=data_dir, device="cpu")
    srv = EmbeddedServer(settings).start()
    try:
        yield srv.url
    finally:
        srv.stop()


def test_checkpoints_and_runs_survive_restart_and_kill_9(tmp_path, tiny_model_dir) -> None:
    data_dir = tmp_path / "data"
    # 1. Train and save, then stop the server with SIGTERM.
    with tinkerd_serve(data_dir) as (url, _), sdk(url) as (client, _):
        tc = new_client(client, tiny_model_dir, user_metadata={"run": "first"})
        losses = train(tc, 4)
        assert losses == sorted(losses, reverse=True)
        saved = tc.save_state("before-restart").result(timeout=WAIT).path
        sampler = tc.save_weights_for_sampler("sampler-before").result(timeout=WAIT).path
        logprobs = forward_logprobs(tc)
        run_id = tc.model_id

    # 2. A new server on the same data dir knows the run and its checkpoints, and training
    # resumes from them; kill -9 it right after a save completes.
    with tinkerd_serve(data_dir) as (url, proc), sdk(url) as (client, rest):
        runs = rest.list_training_runs().result(timeout=WAIT)
        assert [r.training_run_id for r in runs.training_runs] == [run_id]
        run = rest.get_training_run(run_id).result(timeout=WAIT)
        assert run.base_model == str(tiny_model_dir) and run.lora_rank == 8
        assert run.user_metadata == {"run": "first"}
        assert run.last_checkpoint.tinker_path == saved
        assert run.last_sampler_checkpoint.tinker_path == sampler
        listed = rest.list_checkpoints(run_id).result(timeout=WAIT).checkpoints
        assert [(c.tinker_path, c.checkpoint_type) for c in listed] == [
            (saved, "training"),
            (sampler, "sampler"),
        ]
        info = rest.get_weights_info_by_tinker_path(saved).result(timeout=WAIT)
        assert info.lora_rank == 8

        tc = client.create_training_client_from_state_with_optimizer(saved).result(timeout=WAIT)
        for got, want in zip(forward_logprobs(tc), logprobs, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        more = train(tc, 3)
        assert more[0] < losses[-1] and more == sorted(more, reverse=True)  # loss keeps falling
        after = forward_logprobs(tc)
        killed = tc.save_state("after-restart").result(timeout=WAIT).path
        proc.send_signal(9)  # SIGKILL, no chance to clean up
        proc.wait(10)

    # 3. The checkpoint saved right before the kill is there, complete, and loads.
    with embedded(data_dir) as url, sdk(url) as (client, rest):
        runs = {r.training_run_id for r in rest.list_training_runs().result().training_runs}
        assert runs == {run_id, tc.model_id}
        listed = [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
        assert listed == [killed]
        resumed = client.create_training_client_from_state_with_optimizer(killed).result(
            timeout=WAIT
        )
        for got, want in zip(forward_logprobs(resumed), after, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert train(resumed, 1)[0] < more[-1]
        sampling = client.create_sampling_client(model_path=sampler).result(timeout=WAIT)
        assert sampling.compute_logprobs(types.ModelInput.from_ints(SEQS[0])).result()[0] is None
    leftovers = [p for p in (data_dir / "runs").rglob(".*") if p.name != "run.json"]
    assert leftovers == []


# -- absurd numbers: refused at the edge, and never able to break a listing -------------------


def _cli(capsys: pytest.CaptureFixture, url: str, *args: str) -> str:
    """`tinkerd ARGS` in this process against `url`; its stdout (it must succeed)."""
    from tinkerd.cli import main

    capsys.readouterr()
    assert main([*args, "--url", url, "--api-key", KEY]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_absurd_ttls_are_refused_and_change_nothing(
    server, training_client, rest, capsys: pytest.CaptureFixture
) -> None:
    """A TTL whose expiry no time can hold (10**12 s is year 33715) used to be stored, and then
    every listing answered 500. Now a 400 names the field and its range, on every route that
    takes one, and the longest TTL allowed still lists."""
    from tinkerd.cli import main
    from tinkerd.storage import MAX_TTL_SECONDS

    tc = training_client
    for future in (
        tc.save_state("ttl-huge", ttl_seconds=10**12),
        tc.save_weights_for_sampler("ttl-huge-sampler", ttl_seconds=10**12),
    ):
        with pytest.raises(tinker.BadRequestError) as info:
            future.result(timeout=WAIT)
        body = info.value.body
        assert body["category"] == "user" and "'ttl_seconds' must be in" in body["error"]
        assert str(MAX_TTL_SECONDS) in body["error"]

    save = f"{server.url}/api/v1/training_runs/{tc.model_id}/save"
    headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
    for ttl in (
        "1e12",
        "1e300",
        "1e400",
        "Infinity",
        "-Infinity",
        "NaN",
        "0",
        "-5",
        '"1h"',
        "true",
    ):
        r = httpx.post(
            save, content=f'{{"name": "ttl-bad", "ttl_seconds": {ttl}}}', headers=headers
        )
        assert r.status_code == 400, (ttl, r.text)
        assert r.json()["category"] == "user" and "'ttl_seconds'" in r.json()["error"], ttl
    for ttl in ("inf", "nan", "1e12", "0", "-1", "soon"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:  # argparse: refused before anything is sent
            main(["save", tc.model_id, "ttl-cli", "--ttl", ttl, "--url", server.url])
        assert exit_info.value.code == 2
        assert "--ttl: must be a number of seconds in (0, 315360000]" in capsys.readouterr().err

    listed = [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    assert not [p for p in listed if "ttl-" in p]  # nothing was saved

    t0 = time.time()
    longest = tc.save_state("ttl-longest", ttl_seconds=MAX_TTL_SECONDS).result(timeout=WAIT)
    (ckpt,) = rest.list_checkpoints(tc.model_id).result(timeout=WAIT).checkpoints
    assert ckpt.tinker_path == longest.path
    assert abs(ckpt.expires_at.timestamp() - t0 - MAX_TTL_SECONDS) < 60
    assert longest.path in _cli(capsys, server.url, "checkpoints", tc.model_id)


def _corrupt(path: Path, **fields: object) -> None:
    """Write absurd values into a stored JSON record, as an older version or a hand edit did
    (json.dumps writes inf and nan as Infinity and NaN, which json.loads reads back)."""
    import json

    record = json.loads(path.read_text())
    record.update(fields)
    path.write_text(json.dumps(record))


def test_listings_render_stored_records_with_absurd_values(
    tmp_path, tiny_model_dir, capsys: pytest.CaptureFixture
) -> None:
    """Records already on disk with expiries and times no datetime holds (written before TTLs
    were checked) list everywhere: REST, the SDK's RestClient, `tinkerd list|checkpoints|status`.
    An expiry past year 9999 (or not a number) renders as none, a creation time as 1970."""
    data_dir = tmp_path / "data"
    with embedded(data_dir) as url, sdk(url) as (client, _):
        tc = new_client(client, tiny_model_dir, user_metadata={"n": "1"})
        names = ["far", "huge", "inf", "nan", "text"]
        paths = [tc.save_state(name).result(timeout=WAIT).path for name in names]
        paths.append(tc.save_weights_for_sampler("fine", ttl_seconds=3600).result().path)
        run_id = tc.model_id

    runs = data_dir / "runs"
    meta = {p: runs / run_id / p.split("/")[-2] / p.split("/")[-1] / "tinkerd.json" for p in paths}
    far, huge, inf, nan, text, fine = paths
    _corrupt(meta[far], expires_at=time.time() + 10**12)  # ttl_seconds=10**12: year 33715
    _corrupt(meta[huge], expires_at=1e300, created_at=1e300)
    _corrupt(meta[inf], expires_at=float("inf"), created_at=float("-inf"))
    _corrupt(meta[nan], expires_at=float("nan"), created_at=float("nan"), size_bytes=1e300)
    _corrupt(meta[text], expires_at="soon", user_metadata={"step": 1e308})
    _corrupt(runs / run_id / "run.json", last_request_time=1e300, created_at=float("nan"))

    with embedded(data_dir) as url, sdk(url) as (_, rest):
        for route in ("training_runs", f"training_runs/{run_id}", "checkpoints"):
            r = httpx.get(f"{url}/api/v1/{route}", headers={"X-API-Key": KEY})
            assert r.status_code == 200, (route, r.text)
        r = httpx.get(
            f"{url}/api/v1/training_runs/{run_id}/checkpoints", headers={"X-API-Key": KEY}
        )
        assert r.status_code == 200, r.text
        by_path = {c["tinker_path"]: c for c in r.json()["checkpoints"]}
        assert set(by_path) == set(paths)  # none expired, none hidden
        assert [by_path[p]["expires_at"] for p in (far, huge, inf, nan, text)] == [None] * 5
        assert by_path[fine]["expires_at"] is not None
        assert by_path[huge]["time"].startswith("1970-01-01")
        assert by_path[nan]["size_bytes"] is None
        assert by_path[text]["user_metadata"] == {"step": "1e+308"}

        listed = rest.list_checkpoints(run_id).result(timeout=WAIT).checkpoints
        assert {c.tinker_path for c in listed} == set(paths)
        everything = rest.list_user_checkpoints().result(timeout=WAIT).checkpoints
        assert {c.tinker_path for c in everything} == set(paths)
        (run,) = rest.list_training_runs().result(timeout=WAIT).training_runs
        assert run.training_run_id == run_id and run.user_metadata == {"n": "1"}
        assert abs(run.last_request_time.timestamp() - time.time()) < 600  # its checkpoints'

        assert run_id in _cli(capsys, url, "list")
        table = _cli(capsys, url, "checkpoints", run_id)
        assert all(p in table for p in paths) and table.count("never") == 5
        assert "1 inactive" in _cli(capsys, url, "status")
        # A checkpoint whose stored times are absurd still loads.
        client = tinker.ServiceClient(base_url=url, api_key=KEY)
        try:
            client.create_training_client_from_state(far).result(timeout=WAIT)
        finally:
            client.close("success").result()
