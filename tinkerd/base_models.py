"""Base model names -> where to load them from, without loading anything (the API uses this).

A base model is the built-in tiny model (`tinkerd/tiny`, built on first use, no downloads), a
local Hugging Face model directory, or a hub name, loaded where the hub is reachable.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tinkerd.types import UserError

TINY_MODEL = "tinkerd/tiny"
TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads a flag variable
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class BaseModelSource:
    name: str  # as the user gave it; reported back as model_name
    location: str  # an absolute directory, or a hub name
    builtin: bool = False

    @property
    def tokenizer_id(self) -> str:
        """What the SDK's get_tokenizer loads: the local directory itself when there is one."""
        return self.location


def resolve_base_model(name: object, data_dir: Path) -> BaseModelSource:
    if not isinstance(name, str) or not name.strip():
        raise UserError("base_model must be a non-empty string")
    if name == TINY_MODEL:
        return BaseModelSource(name, str((data_dir / "models" / "tiny").resolve()), builtin=True)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"base_model directory {name!r} has no config.json")
        return BaseModelSource(name, str(path.resolve()))
    if name.startswith(("/", ".", "~")) or not _HUB_NAME.match(name):
        raise UserError(f"base_model {name!r} is neither a model directory nor a hub model name")
    return BaseModelSource(name, name)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers, asked once (False under HF_HUB_OFFLINE). Loading a
    hub name with the hub out of reach otherwise spends ~50 s in the hub client's retries
    before it fails."""
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE:
        return False
    try:
        httpx.head(constants.ENDPOINT, timeout=timeout)
    except httpx.HTTPError:
        return False
    return True
