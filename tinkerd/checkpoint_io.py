"""The torch side of checkpoints: a LoRA adapter as a standard PEFT directory, plus optimizer state.

`adapter_config.json` + `adapter_model.safetensors` load with `peft.PeftModel.from_pretrained` on
the base model; `optimizer.pt` beside them holds the AdamW state of a training checkpoint.

Tensors are serialized in memory, then written with a plain file write: on a full disk that
fails with ENOSPC, which the store reports as such, where torch's own writer says only
"unexpected pos 43520 vs 43412". A LoRA adapter and its optimizer state are small.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from tinkerd.base_models import resolve_base_model
from tinkerd.storage import CheckpointPath, CheckpointStore
from tinkerd.types import UserError

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Recorded in adapter_config.json so that AutoPeftModelForCausalLM can load it (it refuses none);
# the server's own PeftModel is built without one, so reading a checkpoint drops it again.
TASK_TYPE = "CAUSAL_LM"
OPTIMIZER_STATE = "optimizer.pt"
GRADIENTS = "gradients.pt"  # only in a hand-off between workers, taken between fwd/bwd and step


def write_adapter(peft: PeftModel, adapter_name: str, base_location: str, directory: Path) -> None:
    """Write adapter `adapter_name` of `peft` as a PEFT directory that names its base model."""
    state = get_peft_model_state_dict(peft, adapter_name=adapter_name, save_embedding_layers=False)
    write_adapter_state(state, peft.peft_config[adapter_name], base_location, directory)


def write_adapter_state(
    state: dict[str, torch.Tensor], config: PeftConfig, base_location: str, directory: Path
) -> None:
    """A PEFT directory from an adapter's state dict (PEFT's keys) and its LoRA config: fp32
    weights, and a config that names its base model (any engine's adapter, written alike)."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    (directory / ADAPTER_WEIGHTS).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
    config = copy.deepcopy(config)
    config.base_model_name_or_path = base_location
    config.inference_mode = True
    config.task_type = TASK_TYPE
    config.save_pretrained(str(directory))


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through memory, so that a full disk raises ENOSPC (see above)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getbuffer())


def write_optimizer(optimizer: torch.optim.Optimizer, steps: int, directory: Path) -> None:
    _torch_save({"optimizer": optimizer.state_dict(), "steps": steps}, directory / OPTIMIZER_STATE)


def write_gradients(params: list[torch.nn.Parameter], directory: Path) -> None:
    """The gradients accumulated since the last optim_step (None where there are none)."""
    write_gradient_list([None if p.grad is None else p.grad.detach() for p in params], directory)


def write_gradient_list(grads: list[torch.Tensor | None], directory: Path) -> None:
    """Gradients in the adapter's parameter order (None where there are none)."""
    _torch_save([None if g is None else g.cpu() for g in grads], directory / GRADIENTS)


def read_gradients(directory: Path, device: torch.device) -> list[torch.Tensor | None] | None:
    path = directory / GRADIENTS
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=True)


def read_adapter_config(directory: Path) -> PeftLoraConfig:
    """A checkpoint's LoRA config, without its task type (see TASK_TYPE): the adapter joins
    the server's plain PeftModel like those it creates."""
    config = PeftLoraConfig.from_pretrained(str(directory))
    config.task_type = None
    return config


def load_adapter(peft: PeftModel, adapter_name: str, directory: Path) -> None:
    """Copy a PEFT directory's weights into the existing adapter `adapter_name`, in place.

    Every tensor is checked against the adapter first, so a checkpoint that does not fit (other
    layers trained, another rank) is refused before any weight is changed."""
    current = get_peft_model_state_dict(
        peft, adapter_name=adapter_name, save_embedding_layers=False
    )
    state = read_adapter_state(directory, {k: tuple(v.shape) for k, v in current.items()})
    # torch's load_state_dict result (peft annotates it as a bare `namedtuple`, without fields)
    result: _IncompatibleKeys = set_peft_model_state_dict(peft, state, adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if f".{adapter_name}." in k and "lora_" in k]
    if unexpected or missing:
        raise UserError(
            f"checkpoint in {directory.name} does not fit this model's adapter "
            f"(unexpected {unexpected[:3]}, missing {missing[:3]})"
        )


def read_adapter_state(
    directory: Path, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """A PEFT directory's adapter weights, refused (a UserError) unless they are exactly the
    tensors `shapes` names: another LoRA rank or other trained layers never load halfway."""
    state = load_file(directory / ADAPTER_WEIGHTS)
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {shapes[k]}"
        for k in sorted(state.keys() & shapes.keys())
        if tuple(state[k].shape) != shapes[k]
    ]
    if state.keys() != shapes.keys() or wrong:
        raise UserError(
            f"checkpoint in {directory.name} does not fit this model's adapter (LoRA rank or "
            f"trained layers differ: unexpected {sorted(state.keys() - shapes.keys())[:3]}, "
            f"missing {sorted(shapes.keys() - state.keys())[:3]}, shapes {wrong[:3]})"
        )
    return state


def checkpoint_on_base(
    store: CheckpointStore, data_dir: Path, path: CheckpointPath, base_name: str, location: str
) -> Path:
    """The directory of checkpoint `path`, after checking that it exists and was trained on
    the base model at `location` (named `base_name` by its user)."""
    meta = store.meta(path)
    if resolve_base_model(meta.base_model, data_dir).location != location:
        raise UserError(
            f"checkpoint {path} was trained on base model {meta.base_model!r}, not {base_name!r}"
        )
    return store.directory(path)


def read_optimizer(directory: Path, device: torch.device) -> tuple[dict, int]:
    path = directory / OPTIMIZER_STATE
    if not path.is_file():
        raise UserError("this checkpoint has no optimizer state (sampler weights never do)")
    saved = torch.load(path, map_location=device, weights_only=True)
    return saved["optimizer"], int(saved.get("steps", 0))
