"""`tinkerd export`: a checkpoint taken out of the server as a PEFT adapter directory, or merged
into its base model as a plain Hugging Face model directory.

The checkpoint comes from the server as a tar archive (`GET /api/v1/checkpoints/archive`); the
base model is loaded on this machine: the built-in tiny model is rebuilt into a cache directory
(it is deterministic, so it has the server's exact weights), a local model directory is read where
it is, and a hub name loads from the hub (or its local cache).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinkerd.base_models import TINY_MODEL
from tinkerd.storage import out_of_space, umask_modes

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TASK_TYPE = "CAUSAL_LM"  # checkpoint_io.TASK_TYPE (that module imports torch)
META_FILE = "tinkerd.json"  # storage.META_FILE
DTYPES = ("auto", "float32", "bfloat16", "float16")

Progress = Callable[[str], None]  # told each step as it starts


class ExportError(Exception):
    """Export cannot go on (a missing checkpoint, a base model not on this machine...)."""


def default_cache_dir() -> Path:
    """$TINKERD_CACHE_DIR, else $XDG_CACHE_HOME/tinkerd, else ~/.cache/tinkerd."""
    if os.environ.get("TINKERD_CACHE_DIR"):
        return Path(os.environ["TINKERD_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tinkerd"


def download_checkpoint(
    url: str, tinker_path: str, dest: Path, api_key: str, show_progress: bool = True
) -> Path:
    """Fetch a checkpoint's archive (without optimizer state) and unpack it into `dest`;
    returns the checkpoint's directory there."""
    import httpx
    from tqdm import tqdm

    archive = dest / "checkpoint.tar"
    try:
        with httpx.stream(
            "GET",
            f"{url.rstrip('/')}/api/v1/checkpoints/archive",
            params={"path": tinker_path},
            headers={"X-API-Key": api_key},
            timeout=httpx.Timeout(60.0, connect=5.0),
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise ExportError(_error_of(response))
            total = int(response.headers.get("Content-Length", 0)) or None
            with (
                open(archive, "wb") as f,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc="download",
                    disable=not show_progress or None,
                ) as bar,
            ):
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and archive.stat().st_size != total:
            raise ExportError(f"the download of {tinker_path} was cut short")
    except httpx.HTTPError as e:
        raise ExportError(f"cannot download {tinker_path} from {url}: {e}") from None
    except OSError as e:
        if out_of_space(e, dest):
            raise ExportError(f"no space left on device ({archive})") from None
        raise
    try:
        return _unpack(archive, dest / "checkpoint")
    except OSError as e:
        if out_of_space(e, dest):
            raise ExportError(f"no space left on device ({dest / 'checkpoint'})") from None
        raise


def _error_of(response: Any) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def _unpack(archive: Path, dest: Path) -> Path:
    """The archive's regular files, flattened into `dest` (names are checked: no paths)."""
    dest.mkdir()
    with tarfile.open(archive, "r:") as tar:
        for member in tar:
            name = Path(member.name).name
            if not member.isfile() or not name or name.startswith("."):
                continue
            source = tar.extractfile(member)
            assert source is not None
            with source, open(dest / name, "wb") as f:
                shutil.copyfileobj(source, f)
    missing = [name for name in (*ADAPTER_FILES, META_FILE) if not (dest / name).is_file()]
    if missing:
        raise ExportError(f"the checkpoint archive lacks {', '.join(missing)}")
    return dest


def checkpoint_base_model(checkpoint_dir: Path) -> str:
    """The base model a checkpoint was trained on, as its run named it."""
    return str(json.loads((checkpoint_dir / META_FILE).read_text())["base_model"])


def local_base_model(name: str, cache_dir: Path) -> str:
    """Where this machine loads base model `name` from: the built-in tiny model rebuilt into
    `cache_dir`, a local model directory, or a hub name."""
    if name == TINY_MODEL:
        from tinkerd.tiny_model import build_tiny_model

        return str(build_tiny_model(cache_dir / "models" / "tiny"))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name.startswith(("/", "~", ".")):
        raise ExportError(
            f"the base model directory {name} is not on this machine: copy it here, or pass "
            "--base-model DIR"
        )
    return name


def write_adapter(checkpoint_dir: Path, out: Path, base_location: str) -> None:
    """The PEFT adapter directory, naming `base_location` as its base model, so
    `AutoPeftModelForCausalLM.from_pretrained(out)` works on this machine. That needs the
    task type, which checkpoints written before tinkerd recorded it lack."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copyfile(checkpoint_dir / name, out / name)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_location
    config["task_type"] = config.get("task_type") or TASK_TYPE
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def merge_adapter(
    adapter_dir: Path,
    base_location: str,
    out: Path,
    dtype: str = "auto",
    progress: Progress = print,
) -> None:
    """Base model + adapter, merged (W + B·A·alpha/r, computed in float32), saved as a plain
    model directory with the base model's tokenizer.

    `dtype` is what the weights are saved as; "auto" keeps the base model's own dtype.
    With tied input and output embeddings and an adapter on lm_head, the two are untied first:
    merging into the shared matrix would change the input embeddings too."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"loading base model {base_location}")
    base = AutoModelForCausalLM.from_pretrained(base_location, dtype=torch.float32)
    saved_dtype = _saved_dtype(base.config, dtype)
    adapter_targets = json.loads((adapter_dir / "adapter_config.json").read_text())
    output = base.get_output_embeddings()
    if output is not None and output.weight is base.get_input_embeddings().weight:
        targets = adapter_targets.get("target_modules") or []
        if isinstance(targets, str):  # a regular expression
            targets = ["lm_head"] if "lm_head" in targets else []
        if any(t == "lm_head" or str(t).endswith(".lm_head") for t in targets):
            tied = output.weight  # a Parameter; Module.__getattr__ is typed to return a Module too
            assert isinstance(tied, torch.Tensor)
            output.weight = torch.nn.Parameter(tied.detach().clone())
            base.config.tie_word_embeddings = False
            text_config = base.config.get_text_config()
            text_config.tie_word_embeddings = False
    progress("merging the adapter")
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    model.to(saved_dtype)
    progress(f"saving the merged model ({str(saved_dtype).removeprefix('torch.')})")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(base_location).save_pretrained(str(out))


def _saved_dtype(config: Any, dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return getattr(torch, dtype, torch.float32)


def export_checkpoint(
    checkpoint_dir: Path,
    out: Path,
    *,
    merge: bool,
    base_model: str | None = None,
    cache_dir: Path | None = None,
    dtype: str = "auto",
    progress: Progress = print,
) -> Path:
    """Write an unpacked checkpoint to `out`: its PEFT adapter, or (merge) the merged model.
    `base_model` overrides the base model the checkpoint names (a copy elsewhere on this
    machine). `out` is written through a temporary directory beside it, then renamed."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty directory")
    name = base_model or checkpoint_base_model(checkpoint_dir)
    location = local_base_model(name, cache_dir or default_cache_dir())
    progress(f"base model {name}: {location}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if merge:
            merge_adapter(checkpoint_dir, location, tmp, dtype, progress)
        else:
            write_adapter(checkpoint_dir, tmp, location)
        umask_modes(tmp)  # mkdtemp's 0o700 and safetensors' 0o600 were for the unfinished copy
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as e:
        full = out_of_space(e, out.parent)  # asked first: removing the temporary frees room
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise ExportError(f"no space left on device ({out})") from None
        raise
    return out
