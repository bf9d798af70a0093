"""Checkpoints through the official SDK over HTTP: save_state / save_weights_for_sampler write
standard PEFT directories, training resumes exactly from them, and bad names, bad paths, failed
writes and foreign checkpoints are refused without changing anything."""

from __future__ import annotations

import errno
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tinkerd.storage import CheckpointPath

pytestmark = pytest.mark.timeout(120)

WAIT = 60
RANK, SEED = 8, 0
LR = 0.05
SEQS = [[5, 17, 42, 99, 300, 7, 64, 12], [9, 8, 7, 6, 5], [101, 202, 303, 404, 505, 606]]


# -- helpers ---------------------------------------------------------------------------------


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


DATA = [datum(s) for s in SEQS]


def new_client(service_client, model_dir, **lora):
    lora = {"rank": RANK, "seed": SEED, **lora}
    return service_client.create_lora_training_client(base_model=str(model_dir), **lora).result(
        timeout=WAIT
    )


def train(tc, steps: int, lr: float = LR) -> list[float]:
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


def state(server, tc) -> dict[str, torch.Tensor]:
    return server.backend.adapter_state(tc.model_id)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0.0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def checkpoint_dir(server, path: str) -> Path:
    return server.store.directory(CheckpointPath.parse(path))


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def user_error(future, *fragments: str, status: int | None = None) -> str:
    """The SDK's error for a refused request: a 4xx at submit, or a failed future (category
    user). Returns the message."""
    with pytest.raises((tinker.APIStatusError, tinker.RequestFailedError)) as info:
        future.result(timeout=WAIT)
    error = info.value
    if isinstance(error, tinker.APIStatusError):
        assert 400 <= error.status_code < 500, error
        if status is not None:
            assert error.status_code == status, error
        assert isinstance(error.body, dict) and error.body["category"] == "user", error.body
        message = error.body["error"]
    else:
        assert status is None, f"expected a {status} at submit, got a failed future: {error}"
        assert error.category == "user", error
        message = error.message
    for fragment in fragments:
        assert fragment in message, message
    return message


def load_state(tc, path: str, optimizer: bool):
    with warnings.catch_warnings():  # load_state* is deprecated in the SDK, but still works
        warnings.simplefilter("ignore")
        if optimizer:
            return tc.load_state_with_optimizer(path)
        return tc.load_state(path)


def reference_logprobs(model_dir: Path, adapter_dir: Path | None) -> list[torch.Tensor]:
    """Plain transformers + PEFT: the saved adapter (if any) on the base model, one sequence
    at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    out = []
    with torch.no_grad():
        for s in SEQS:
            logits = model(input_ids=torch.tensor([s[:-1]])).logits[0].float()
            out.append(logits.log_softmax(-1).gather(-1, torch.tensor(s[1:])[:, None])[:, 0])
    return out


# -- saving ----------------------------------------------------------------------------------


def test_save_state_writes_a_peft_dir_with_the_servers_weights(
    server, service_client, tiny_model_dir
) -> None:
    tc = new_client(service_client, tiny_model_dir)
    train(tc, 2)
    saved = tc.save_state("peft-parity", ttl_seconds=3600).result(timeout=WAIT)
    assert saved.path == f"tinker://{tc.model_id}/weights/peft-parity"

    directory = checkpoint_dir(server, saved.path)
    assert directory.is_relative_to(server.settings.data_dir / "runs" / tc.model_id)
    files = {p.name for p in directory.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files

    ours = forward_logprobs(tc)
    theirs = reference_logprobs(tiny_model_dir, directory)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    # Not vacuous: training moved the adapter off its zero-initialised lora_B, so the saved
    # adapter changes the base model's logprobs by far more than the tolerance.
    base = reference_logprobs(tiny_model_dir, None)
    moved = [float((torch.from_numpy(o) - b).abs().max()) for o, b in zip(ours, base, strict=True)]
    assert max(moved) > 1e-3
    config = json.loads((directory / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == tiny_model_dir.resolve()
    assert (config["peft_type"], config["r"]) == ("LORA", RANK)


def test_sampler_weights_are_a_peft_dir_without_optimizer(
    server, service_client, tiny_model_dir
) -> None:
    tc = new_client(service_client, tiny_model_dir)
    train(tc, 1)
    saved = tc.save_weights_for_sampler("for-sampling").result(timeout=WAIT)
    assert saved.path == f"tinker://{tc.model_id}/sampler_weights/for-sampling"
    directory = checkpoint_dir(server, saved.path)
    files = {p.name for p in directory.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "optimizer.pt" not in files

    ours = forward_logprobs(tc)
    for got, want in zip(ours, reference_logprobs(tiny_model_dir, directory), strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)

    # The sampler path samples, and scores prompts as the training model does.
    sampler = service_client.create_sampling_client(model_path=saved.path).result(timeout=WAIT)
    prompt = types.ModelInput.from_ints(SEQS[0])
    lps = sampler.compute_logprobs(prompt).result(timeout=WAIT)
    assert lps[0] is None
    np.testing.assert_allclose(np.array(lps[1:]), ours[0], rtol=1e-4, atol=1e-4)


def test_saving_twice_needs_overwrite(server, service_client, tiny_model_dir) -> None:
    tc = new_client(service_client, tiny_model_dir)
    first = tc.save_state("twice").result(timeout=WAIT).path
    directory = checkpoint_dir(server, first)
    first_bytes = (directory / "adapter_model.safetensors").read_bytes()

    train(tc, 1)
    user_error(tc.save_state("twice"), "already exists", "overwrite")
    # The refused save changed nothing on disk, and the client keeps working.
    assert (directory / "adapter_model.safetensors").read_bytes() == first_bytes
    trained = state(server, tc)

    again = tc.save_state("twice", overwrite=True).result(timeout=WAIT).path
    assert again == first
    assert (directory / "adapter_model.safetensors").read_bytes() != first_bytes
    # The replacement holds the new weights: a model loaded from it has them.
    loaded = service_client.create_training_client_from_state(again).result(timeout=WAIT)
    assert_same(state(server, loaded), trained)
    listed = [
        c.tinker_path
        for c in tinker.RestClient(base_url=server.url, api_key="tml-test")
        .list_checkpoints(tc.model_id)
        .result()
        .checkpoints
    ]
    assert listed.count(first) == 1
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]

    # Sampler weights have no overwrite in the SDK: a second save under the name is refused.
    tc.save_weights_for_sampler("twice").result(timeout=WAIT)
    user_error(tc.save_weights_for_sampler("twice"), "already exists")


# -- resuming --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_a(server, tiny_model_dir):
    """Run A: 3 steps, save_state, then one more step. Its checkpoint, the weights saved in it,
    and the weights after the extra step (W_A)."""
    client = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
    tc = new_client(client, tiny_model_dir)
    train(tc, 3)
    path = tc.save_state("resume-me").result(timeout=WAIT).path
    saved = state(server, tc)
    train(tc, 1)
    yield path, saved, state(server, tc)
    client.close("success").result()


def test_resume_with_optimizer_from_state_is_exact(server, service_client, run_a) -> None:
    path, saved, w_a = run_a
    tc = service_client.create_training_client_from_state_with_optimizer(path).result(timeout=WAIT)
    assert_same(state(server, tc), saved)
    train(tc, 1)
    assert_same(state(server, tc), w_a, atol=1e-6)


def test_load_state_with_optimizer_into_a_live_model_is_exact(
    server, service_client, tiny_model_dir, run_a
) -> None:
    path, saved, w_a = run_a
    tc = new_client(service_client, tiny_model_dir, seed=7)  # other weights, same shapes
    train(tc, 2)  # and Adam state of its own, which the load must replace
    load_state(tc, path, optimizer=True).result(timeout=WAIT)
    assert_same(state(server, tc), saved)
    train(tc, 1)
    assert_same(state(server, tc), w_a, atol=1e-6)


def test_resume_without_optimizer_starts_a_fresh_adam(server, service_client, run_a) -> None:
    path, saved, w_a = run_a
    tc = service_client.create_training_client_from_state(path).result(timeout=WAIT)
    assert_same(state(server, tc), saved)
    train(tc, 1)
    after = state(server, tc)
    # A fresh Adam's first step moves every weight by about lr, unlike the step with the
    # restored moments, so the result is clearly not W_A (and it did move).
    assert max_diff(after, w_a) > 1e-3
    assert max_diff(after, saved) > 1e-3


def test_load_state_without_optimizer_into_a_live_model(
    server, service_client, tiny_model_dir, run_a
) -> None:
    path, saved, w_a = run_a
    tc = new_client(service_client, tiny_model_dir, seed=7)
    train(tc, 2)
    load_state(tc, path, optimizer=False).result(timeout=WAIT)
    assert_same(state(server, tc), saved)
    train(tc, 1)
    assert max_diff(state(server, tc), w_a) > 1e-3


def test_model_from_state_takes_id_and_lora_config_from_checkpoint(server, tiny_model_dir) -> None:
    client = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
    try:
        source = new_client(client, tiny_model_dir, rank=4, train_mlp=False, train_unembed=False)
        train(source, 1)
        path = source.save_state("small-lora").result(timeout=WAIT).path
        tc = client.create_training_client_from_state_with_optimizer(path).result(timeout=WAIT)
        session_id = client.holder.get_session_id()
        assert tc.model_id == f"{session_id}:train:1"  # seq 0 was `source`
        info = tc.get_info()
        assert info.model_id == tc.model_id
        assert info.model_data.model_name == str(tiny_model_dir)
        assert info.lora_rank == 4
        assert_same(state(server, tc), state(server, source))
        assert not any("mlp" in k or "lm_head" in k for k in state(server, tc))
        # It trains like its source would.
        train(source, 1)
        train(tc, 1)
        assert_same(state(server, tc), state(server, source), atol=1e-6)
        # The REST view agrees.
        rest = tinker.RestClient(base_url=server.url, api_key="tml-test")
        run = rest.get_training_run(tc.model_id).result(timeout=WAIT)
        assert run.lora_rank == 4 and run.base_model == str(tiny_model_dir)
        weights = rest.get_weights_info_by_tinker_path(path).result(timeout=WAIT)
        assert (weights.lora_rank, weights.train_mlp, weights.train_attn) == (4, False, True)
        assert weights.train_unembed is False
    finally:
        client.close("success").result()


# -- names and paths -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "/abs", "", ".hidden", "a\\b", "x" * 200])
def test_bad_checkpoint_names_are_refused(server, training_client, name: str) -> None:
    data_dir = server.settings.data_dir
    before = tree(data_dir.parent)
    user_error(training_client.save_state(name), "invalid checkpoint name")
    user_error(training_client.save_weights_for_sampler(name), "invalid checkpoint name")
    assert tree(data_dir.parent) - before == set()  # nothing new, anywhere near
    # The same client still saves under a good name.
    ok = training_client.save_state("good-name").result(timeout=WAIT)
    assert checkpoint_dir(server, ok.path).is_dir()


@pytest.mark.parametrize(
    "path",
    [
        "weights/x",
        "tinker://",
        "tinker://a/b",
        "tinker://a/weights/x/y",
        "tinker://a/other_kind/x",
        "tinker://../weights/x",
        "tinker://./weights/x",
        "tinker://a/weights/..",
        "tinker://a/weights/",
        "http://a/weights/x",
    ],
)
def test_malformed_paths_are_refused(server, service_client, training_client, path) -> None:
    before = state(server, training_client)
    clear = re.compile(r"checkpoint path|checkpoint name|model id")
    message = user_error(load_state(training_client, path, optimizer=False), status=400)
    assert clear.search(message), message
    message = user_error(service_client.create_training_client_from_state(path), status=400)
    assert clear.search(message), message
    assert_same(state(server, training_client), before)


def test_unknown_checkpoints_are_not_found(server, service_client, training_client) -> None:
    before = state(server, training_client)
    for path in (
        f"tinker://{training_client.model_id}/weights/never-saved",
        "tinker://no-such-run/weights/x",
        f"tinker://{training_client.model_id}/sampler_weights/never-saved",
    ):
        user_error(load_state(training_client, path, optimizer=True), "not found", status=404)
        user_error(service_client.create_training_client_from_state(path), status=404)
        user_error(service_client.create_sampling_client(model_path=path), status=404)
    assert_same(state(server, training_client), before)
    train(training_client, 1)  # still serving this client


def test_sampler_checkpoint_has_no_optimizer_state(server, service_client, training_client) -> None:
    path = training_client.save_weights_for_sampler("no-optimizer").result(timeout=WAIT).path
    train(training_client, 1)
    before = state(server, training_client)
    user_error(load_state(training_client, path, optimizer=True), "no optimizer state")
    user_error(
        service_client.create_training_client_from_state_with_optimizer(path),
        "no optimizer state",
    )
    assert_same(state(server, training_client), before)
    # Without the optimizer it loads: sampler weights are a valid starting point.
    load_state(training_client, path, optimizer=False).result(timeout=WAIT)
    assert max_diff(state(server, training_client), before) > 0


def test_expired_checkpoint_is_refused(server, service_client, training_client) -> None:
    import time

    path = training_client.save_state("short-lived", ttl_seconds=1).result(timeout=WAIT).path
    load_state(training_client, path, optimizer=True).result(timeout=WAIT)  # fine while fresh
    time.sleep(1.2)
    before = state(server, training_client)
    user_error(load_state(training_client, path, optimizer=True), "expired", status=404)
    user_error(service_client.create_training_client_from_state(path), status=404)
    assert_same(state(server, training_client), before)
    assert not checkpoint_dir(server, path).exists()
    # An expired name may be reused without overwrite.
    training_client.save_state("short-lived").result(timeout=WAIT)


# -- foreign checkpoints ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    from tinkerd.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other") / "tiny-32", hidden_size=32)


def test_checkpoint_of_another_base_model_is_refused(
    server, service_client, training_client, tiny_model_dir, other_base
) -> None:
    other = new_client(service_client, other_base)
    train(other, 1)
    path = other.save_state("other-base").result(timeout=WAIT).path

    before, logprobs = state(server, training_client), forward_logprobs(training_client)
    user_error(load_state(training_client, path, optimizer=True), "trained on")
    user_error(load_state(training_client, path, optimizer=False), "trained on")
    user_error(
        service_client.create_training_client_from_state(path, base_model=str(tiny_model_dir)),
        "trained on",
    )
    assert_same(state(server, training_client), before)
    for got, want in zip(forward_logprobs(training_client), logprobs, strict=True):
        np.testing.assert_array_equal(got, want)
    # Without a base_model override it is a model of the other base, as it should be.
    tc = service_client.create_training_client_from_state(path).result(timeout=WAIT)
    assert tc.get_info().model_data.model_name == str(other_base)
    assert_same(state(server, tc), state(server, other))


def test_same_base_model_under_another_spelling_loads(
    server, service_client, tiny_model_dir
) -> None:
    """The base model is compared by where it lives, not by how the user spelled it."""
    source = new_client(service_client, f"{tiny_model_dir}/")
    train(source, 1)
    path = source.save_state("spelled-with-slash").result(timeout=WAIT).path
    target = new_client(service_client, tiny_model_dir, seed=5)
    load_state(target, path, optimizer=True).result(timeout=WAIT)
    assert_same(state(server, target), state(server, source))
    tc = service_client.create_training_client_from_state(
        path, base_model=str(tiny_model_dir)
    ).result(timeout=WAIT)
    assert_same(state(server, tc), state(server, source))


def test_checkpoint_of_another_lora_shape_changes_nothing(
    server, service_client, tiny_model_dir
) -> None:
    """Same base, but adapters that do not fit: other layers trained, or another rank."""
    target = new_client(service_client, tiny_model_dir)
    train(target, 1)
    before = state(server, target)
    for name, lora in (
        ("attn-only", {"train_mlp": False, "train_unembed": False}),
        ("rank-4", {"rank": 4}),
    ):
        source = new_client(service_client, tiny_model_dir, seed=3, **lora)
        train(source, 1)
        path = source.save_state(name).result(timeout=WAIT).path
        for optimizer in (False, True):
            user_error(load_state(target, path, optimizer), "does not fit")
            assert_same(state(server, target), before)
    train(target, 1)
    assert max_diff(state(server, target), before) > 0


# -- failed writes ---------------------------------------------------------------------------


def test_failed_write_leaves_no_checkpoint_and_the_server_serving(
    server, service_client, training_client, monkeypatch
) -> None:
    from tinkerd import checkpoint_io

    real = checkpoint_io.write_optimizer

    def disk_full(optimizer, steps, directory: Path) -> None:
        real(optimizer, steps, directory)  # half the checkpoint is on disk when it fails
        (directory / "optimizer.pt").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "write_optimizer", disk_full)
    run_dir = server.settings.data_dir / "runs" / training_client.model_id
    before = tree(run_dir)
    with pytest.raises(tinker.RequestFailedError) as info:
        training_client.save_state("disk-full").result(timeout=WAIT)
    assert re.search("no space left", info.value.message, re.I), info.value.message
    path = f"tinker://{training_client.model_id}/weights/disk-full"

    # Nothing that lists or loads, and no temporary directory left behind.
    assert tree(run_dir) - before <= {"weights"}
    rest = tinker.RestClient(base_url=server.url, api_key="tml-test")
    listed = rest.list_checkpoints(training_client.model_id).result(timeout=WAIT).checkpoints
    assert path not in [c.tinker_path for c in listed]
    user_error(load_state(training_client, path, optimizer=False), status=404)
    user_error(service_client.create_training_client_from_state(path), status=404)

    # The server and this client keep serving; with space again the same name saves.
    monkeypatch.setattr(checkpoint_io, "write_optimizer", real)
    train(training_client, 1)
    saved = training_client.save_state("disk-full").result(timeout=WAIT)
    assert saved.path == path
    service_client.create_training_client_from_state_with_optimizer(path).result(timeout=WAIT)


def test_failed_overwrite_keeps_the_old_checkpoint(
    server, service_client, training_client, monkeypatch
) -> None:
    from tinkerd import checkpoint_io

    path = training_client.save_state("keep-me").result(timeout=WAIT).path
    kept = state(server, training_client)
    train(training_client, 1)

    def disk_full(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "write_adapter", disk_full)
    with pytest.raises(tinker.RequestFailedError):
        training_client.save_state("keep-me", overwrite=True).result(timeout=WAIT)
    monkeypatch.undo()
    tc = service_client.create_training_client_from_state(path).result(timeout=WAIT)
    assert_same(state(server, tc), kept)


def test_failed_rename_during_overwrite_keeps_the_old_checkpoint(
    server, service_client, training_client, monkeypatch
) -> None:
    import tinkerd.storage

    path = training_client.save_state("rename-fails").result(timeout=WAIT).path
    kept = state(server, training_client)
    train(training_client, 1)
    real_rename = os.rename
    final = checkpoint_dir(server, path)

    def rename(src, dst) -> None:
        if Path(dst) == final and Path(src).name.startswith(".tmp-"):  # the new one, into place
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(tinkerd.storage.os, "rename", rename)
    with pytest.raises(tinker.RequestFailedError):
        training_client.save_state("rename-fails", overwrite=True).result(timeout=WAIT)
    monkeypatch.undo()
    assert not [p.name for p in final.parent.iterdir() if p.name.startswith(".")]
    tc = service_client.create_training_client_from_state(path).result(timeout=WAIT)
    assert_same(state(server, tc), kept)


def test_a_new_store_finishes_what_a_crash_interrupted(server, training_client, tmp_path) -> None:
    """A crash between an overwrite's two renames leaves the old checkpoint moved aside and no
    checkpoint in place; a crash mid-write leaves a temporary directory. A new store (a server
    restart) puts the old one back and clears the rest."""
    import shutil
    import uuid

    from tinkerd.storage import CheckpointStore

    path = training_client.save_state("crashed-overwrite").result(timeout=WAIT).path
    source = checkpoint_dir(server, path)
    root = tmp_path / "runs"
    kind_dir = root / training_client.model_id / "weights"
    kind_dir.mkdir(parents=True)
    shutil.copytree(source, kind_dir / f".old-crashed-overwrite-{uuid.uuid4().hex}")
    shutil.copytree(source, kind_dir / f".tmp-crashed-overwrite-{uuid.uuid4().hex}")
    shutil.copytree(source, kind_dir / f".tmp-half-written-{uuid.uuid4().hex}")
    shutil.copytree(source, kind_dir / f".del-deleted-{uuid.uuid4().hex}")
    (kind_dir / "kept").mkdir()
    shutil.copytree(source, kind_dir / f".old-kept-{uuid.uuid4().hex}")
    (kind_dir.parent / f".run.json.{uuid.uuid4().hex}").write_text("{")

    store = CheckpointStore(root)
    assert sorted(p.name for p in kind_dir.iterdir()) == ["crashed-overwrite", "kept"]
    assert not list(kind_dir.parent.glob(".run.json.*"))
    assert store.meta(CheckpointPath.parse(path)).has_optimizer
    assert [m.tinker_path for m in store.list(training_client.model_id)] == [path]
