"""Shared fixtures: a tiny local model, a live tinkerd on a free loopback port, SDK clients.

With TINKERD_TEST_URL set, the SDK modules that import no tinkerd (tests/test_api_tinker.py) run
against that server instead, from another venv with an older SDK: tests/test_old_sdks.py starts
them so, against its own in-process server and tiny model (TINKERD_TEST_MODEL_DIR).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REMOTE_URL = os.environ.get("TINKERD_TEST_URL")


@dataclass
class RemoteServer:
    """A server another process runs (`tests/test_old_sdks.py`): only its URL is known here."""

    url: str


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local Hugging Face model directory: random tiny Llama + locally trained tokenizer."""
    if REMOTE_URL:
        return Path(os.environ["TINKERD_TEST_MODEL_DIR"])
    from tinkerd.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `in_process` looks or reaches inside the server object: skipped when the
    server runs in another process (an older SDK's run, TINKERD_TEST_URL)."""
    if REMOTE_URL and item.get_closest_marker("in_process"):
        pytest.skip("looks inside the server, which runs in another process in this run")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """tinkerd serve (API + worker) in this process, over real HTTP on a free port.

    In-process so that tests can read the worker's adapter weights for parity checks.
    """
    if REMOTE_URL:
        yield RemoteServer(REMOTE_URL)
        return
    from tinkerd.config import Settings
    from tinkerd.serve import EmbeddedServer

    settings = Settings.load(
        host="127.0.0.1",
        port=0,
        data_dir=tmp_path_factory.mktemp("data"),
        device="cpu",
        long_poll_seconds=5.0,
    )
    srv = EmbeddedServer(settings).start()
    yield srv
    srv.stop()


@pytest.fixture
def service_client(server) -> Iterator:
    import tinker
    from sdk_versions import close

    client = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
    yield client
    close(client)


@pytest.fixture
def training_client(service_client, tiny_model_dir):
    from sdk_versions import ready

    return ready(
        service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0)
    )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server on a free loopback port for the cluster tests. Without redis-server
    installed this errors (RedisServer raises): the cluster tests never skip."""
    from tinkerd.local_cluster import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's redis-server, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def client(redis_url: str):
    """A Redis client (as the cluster makes them) on this test's emptied Redis."""
    from tinkerd.cluster.state import connect

    c = connect(redis_url)
    yield c
    c.close()
