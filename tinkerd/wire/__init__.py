"""The SDK's wire formats <-> tinkerd's plain data.

Uses the protobuf schema that ships inside the official SDK (`tinker.proto.tinker_public_pb2`),
so the two can never drift: `pb` below. `decode` checks a request's protobuf or JSON into plain
data that is safe to queue (`tensors` its loss inputs), `encode` writes results as the SDK's
protobuf, `limits` holds what one request may carry.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def _sdk_schema() -> ModuleType:
    """The SDK's tinker_public_pb2, loaded without running `tinker/__init__.py`, which imports
    the whole SDK and with it torch where torch is installed: the API must not import torch.
    Registered under its own name, so a later `import tinker` reuses it."""
    name = "tinker.proto.tinker_public_pb2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("tinker")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the tinker SDK is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "proto" / "tinker_public_pb2.py"
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


pb: Any = _sdk_schema()
