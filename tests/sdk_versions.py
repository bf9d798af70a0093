"""Calling the SDK the same way across versions, for the tests that older SDKs also run
(tests/test_old_sdks.py): 0.38 answers futures of clients where 0.25-0.31 answer the clients,
and has `close()` and a RestClient of its own, which they lack."""

from __future__ import annotations

from typing import Any

import pytest
import tinker
from tinker import types


def ready(value: Any, timeout: float = 60) -> Any:
    """The client (or value) an SDK call made: 0.38 answers a future of it, older SDKs it."""
    return value.result(timeout=timeout) if hasattr(value, "result") else value


def close(client: tinker.ServiceClient) -> None:
    """Finish a ServiceClient's session; before 0.26 there is no close(): the session is left to
    go idle, as it was then."""
    if hasattr(client, "close"):
        ready(client.close("success"))


def rest_client(url: str, api_key: str) -> Any:
    """A RestClient: made directly where the SDK exports one (0.38), from a ServiceClient in
    older ones."""
    if hasattr(tinker, "RestClient"):
        return tinker.RestClient(base_url=url, api_key=api_key)
    return tinker.ServiceClient(base_url=url, api_key=api_key).create_rest_client()


def server_capabilities(url: str, api_key: str) -> types.GetServerCapabilitiesResponse:
    """get_server_capabilities: a RestClient's where there is one, else a ServiceClient's."""
    if hasattr(tinker, "RestClient"):
        return ready(rest_client(url, api_key).get_server_capabilities())
    return tinker.ServiceClient(base_url=url, api_key=api_key).get_server_capabilities()


def needs(owner: Any, name: str) -> Any:
    """`owner.name`, or a skip naming the SDK version that lacks it."""
    if not hasattr(owner, name):
        version = getattr(tinker, "__version__", "?")
        what = getattr(owner, "__name__", type(owner).__name__)
        pytest.skip(f"tinker {version} has no {what}.{name}")
    return getattr(owner, name)
