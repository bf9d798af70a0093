"""`tinkerd export` and the checkpoint archive it downloads: a PEFT adapter that peft loads, and a
merged model whose logits are base + adapter's, computed independently with transformers + peft."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tinkerd import export
from tinkerd.cli import main

TEXTS = ["The cat sees the dog near the river.", "12 + 7 = 19", "The bird flies over the house."]
INPUTS = torch.tensor([[588, 465, 476, 410, 343, 17, 459, 377, 4, 12]])  # (1, T)


def train_and_save(service_client, base_model: str, name: str) -> tuple[str, str]:
    """A few steps at a high learning rate, so the adapter is far from its zero start; returns
    the paths of its training and sampler checkpoints."""
    from tinker import types

    training = service_client.create_lora_training_client(base_model=base_model, rank=4, seed=1)
    training = training.result()
    tokenizer = training.get_tokenizer()
    batch = []
    for text in TEXTS:
        tokens = tokenizer.encode(text)
        batch.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
            )
        )
    for _ in range(3):
        training.forward_backward(batch, "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return (
        training.save_state(name).result().path,
        training.save_weights_for_sampler(name).result().path,
    )


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUTS).logits[0]  # (T, V)


def reference_logits(base_dir: Path | str, adapter_dir: Path | None) -> torch.Tensor:
    """Base model (+ the server's own checkpoint directory), loaded the way a user would."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return logits(model.eval())


def checkpoint_dir(server, tinker_path: str) -> Path:
    run, kind, name = tinker_path.removeprefix("tinker://").split("/")
    return server.settings.data_dir / "runs" / run / kind / name


def run_export(server, *args: str) -> int:
    return main(["export", *args, "--url", server.url])


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, so that "normal permissions" are 0o644 files and 0o755 directories."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    """Permission bits of a directory and of everything in it, by name ("." for itself)."""
    out = {".": stat.S_IMODE(directory.stat().st_mode)}
    out.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()})
    return out


def assert_normal_modes(directory: Path) -> None:
    for name, mode in modes(directory).items():
        want = 0o755 if (directory / name).is_dir() else 0o644
        assert mode == want, f"{directory / name}: {oct(mode)}, want {oct(want)}"


@pytest.fixture(scope="module")
def local_checkpoints(server, tiny_model_dir):
    import tinker

    client = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
    try:
        yield train_and_save(client, str(tiny_model_dir), "export-local")
    finally:
        client.close("success").result()


def test_adapter_export_loads_with_peft(server, tiny_model_dir, local_checkpoints, tmp_path):
    state, _ = local_checkpoints
    out = tmp_path / "adapter"
    assert run_export(server, state, str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # no optimizer state, no tinkerd metadata
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    exported = logits(PeftModel.from_pretrained(base, str(out)).eval())
    theirs = reference_logits(tiny_model_dir, checkpoint_dir(server, state))
    torch.testing.assert_close(exported, theirs, atol=0, rtol=0)
    assert (exported - reference_logits(tiny_model_dir, None)).abs().max() > 1e-2  # trained


def test_adapter_export_loads_with_auto_peft(
    server, tiny_model_dir, local_checkpoints, tmp_path, umask_022
):
    """AutoPeftModelForCausalLM finds the base model (offline: the local path the config names)
    from the task type, which the server's checkpoints record too."""
    state, sampler = local_checkpoints
    for path in (state, sampler):
        config = json.loads((checkpoint_dir(server, path) / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM"
    out = tmp_path / "adapter"
    assert run_export(server, state, str(out)) == 0
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert_normal_modes(out)

    model = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    expected = reference_logits(tiny_model_dir, checkpoint_dir(server, state))
    torch.testing.assert_close(logits(model.eval()), expected, atol=0, rtol=0)


def test_old_checkpoint_without_task_type_exports_with_it(
    server, tiny_model_dir, local_checkpoints, tmp_path
):
    """A checkpoint written before tinkerd recorded the task type ("task_type": null) still
    exports as an adapter that AutoPeftModelForCausalLM loads."""
    old = tmp_path / "old-checkpoint"
    old.mkdir()
    for name in (*export.ADAPTER_FILES, export.META_FILE):
        (old / name).write_bytes((checkpoint_dir(server, local_checkpoints[0]) / name).read_bytes())
    config = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**config, "task_type": None}))

    out = tmp_path / "adapter"
    export.export_checkpoint(old, out, merge=False, progress=lambda _: None)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    model = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    expected = reference_logits(tiny_model_dir, old)
    torch.testing.assert_close(logits(model.eval()), expected, atol=0, rtol=0)


def test_exports_and_checkpoints_have_normal_permissions(
    server, service_client, local_checkpoints, tmp_path, umask_022
):
    """Files as a plain write makes them (0o644, directories 0o755 under umask 022), not the
    0o600 of safetensors' writer and mkdtemp's 0o700: others on the machine may load them."""
    merged, cache = tmp_path / "merged", tmp_path / "cache"
    assert run_export(server, local_checkpoints[1], str(merged), "--merge") == 0
    assert (merged / "model.safetensors").is_file()
    assert_normal_modes(merged)

    # the server's own checkpoints, written under the same umask
    training = service_client.create_lora_training_client(base_model="tinkerd/tiny", rank=2)
    path = training.result().save_state("modes").result().path
    assert_normal_modes(checkpoint_dir(server, path))

    # the built-in model, rebuilt where the exported adapter's config points
    assert run_export(server, path, str(tmp_path / "adapter"), "--cache-dir", str(cache)) == 0
    assert (cache / "models" / "tiny" / "model.safetensors").is_file()
    assert_normal_modes(cache / "models" / "tiny")


@pytest.mark.parametrize("kind", ["weights", "sampler_weights"])
def test_merged_export_equals_base_plus_adapter(
    server, tiny_model_dir, local_checkpoints, tmp_path, kind
):
    path = local_checkpoints[0 if kind == "weights" else 1]
    out = tmp_path / "merged"
    assert run_export(server, path, str(out), "--merge") == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32
    assert not any("lora" in name for name, _ in merged.named_parameters())
    expected = reference_logits(tiny_model_dir, checkpoint_dir(server, path))
    torch.testing.assert_close(logits(merged.eval()), expected, atol=1e-4, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(out)
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.encode(TEXTS[0]) == base_tokenizer.encode(TEXTS[0])
    assert tokenizer.chat_template == base_tokenizer.chat_template


def test_merged_export_of_the_builtin_model_rebuilds_it_exactly(server, service_client, tmp_path):
    """The client rebuilds tinkerd/tiny in its own cache: the same weights as the server's."""
    state, _ = train_and_save(service_client, "tinkerd/tiny", "export-tiny")
    out, cache = tmp_path / "merged", tmp_path / "cache"
    assert run_export(server, state, str(out), "--merge", "--cache-dir", str(cache)) == 0
    assert (cache / "models" / "tiny" / "config.json").is_file()
    server_tiny = server.settings.data_dir / "models" / "tiny"
    expected = reference_logits(server_tiny, checkpoint_dir(server, state))
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged.eval()), expected, atol=1e-4, rtol=0)

    adapter = tmp_path / "adapter"
    assert run_export(server, state, str(adapter), "--cache-dir", str(cache)) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(cache / "models" / "tiny")


def test_unknown_or_invalid_checkpoints_are_clear_errors(
    server, local_checkpoints, tmp_path, capsys
):
    out = tmp_path / "out"
    run = local_checkpoints[0].removeprefix("tinker://").split("/")[0]
    assert run_export(server, f"tinker://{run}/weights/missing", str(out)) == 1
    assert f"checkpoint tinker://{run}/weights/missing not found" in capsys.readouterr().err
    assert run_export(server, "tinker://nope:train:0/weights/x", str(out), "--merge") == 1
    assert "not found" in capsys.readouterr().err
    assert run_export(server, "tinker://just-a-run", str(out)) == 1
    assert "invalid checkpoint path" in capsys.readouterr().err
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_export(server, local_checkpoints[0], str(out)) == 1
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_archive_route_streams_the_checkpoint_as_tar(server, local_checkpoints):
    state, _ = local_checkpoints
    url = f"{server.url}/api/v1/checkpoints/archive"
    response = httpx.get(url, params={"path": state})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-tar"
    assert int(response.headers["content-length"]) == len(response.content)
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    name = state.rsplit("/", 1)[1]
    assert sorted(files) == [
        f"{name}/adapter_config.json",
        f"{name}/adapter_model.safetensors",
        f"{name}/tinkerd.json",
    ]
    directory = checkpoint_dir(server, state)
    for member, data in files.items():
        assert data == (directory / Path(member).name).read_bytes()

    with_optimizer = httpx.get(url, params={"path": state, "optimizer": "true"})
    with tarfile.open(fileobj=io.BytesIO(with_optimizer.content)) as tar:
        assert f"{name}/optimizer.pt" in tar.getnames()

    missing = httpx.get(url, params={"path": state + "-gone"})
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    for bad in ("tinker://x/weights/../y", "/etc/passwd", ""):
        response = httpx.get(url, params={"path": bad})
        assert response.status_code == 400, bad
        assert response.json()["category"] == "user"


def test_merge_unties_tied_embeddings(tmp_path):
    """An adapter on lm_head of a model whose input and output embeddings are one matrix:
    merged into that matrix it would change the input embeddings too."""
    from tinkerd.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    base_dir = tmp_path / "tied"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "lm_head"])
    peft_model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    expected = logits(peft_model.eval())

    out = tmp_path / "merged"
    export.merge_adapter(adapter_dir, str(base_dir), out, progress=lambda _: None)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=0)
    original = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.testing.assert_close(
        merged.model.embed_tokens.weight, original.model.embed_tokens.weight, atol=0, rtol=0
    )
