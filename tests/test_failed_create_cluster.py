"""A create that fails on a cluster worker leaves no run behind: the worker process forgets the
model in the records that every API process reads (Redis) and removes its run.json."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker

from tinkerd.local_cluster import Cluster

pytestmark = pytest.mark.timeout(240)

HUB_NAME = "meta-llama/Llama-3-8B"
UNREACHABLE = (
    f"base model '{HUB_NAME}' could not be loaded: not a local directory and the Hugging Face "
    "hub is not reachable"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster"), workers=1, api_workers=1).running() as c:
        yield c


def test_a_failed_create_on_a_worker_leaves_no_run(cluster: Cluster) -> None:
    sc = tinker.ServiceClient(base_url=cluster.url, api_key="tml-test")
    try:
        started = time.monotonic()
        with pytest.raises(tinker.RequestFailedError) as info:
            sc.create_lora_training_client(base_model=HUB_NAME, rank=8).result(timeout=60)
        assert time.monotonic() - started < 30
        assert info.value.message.startswith(f"Request failed: {UNREACHABLE} for ")
    finally:
        sc.close("success").result()
    headers = {"X-API-Key": "tml-test"}
    runs = httpx.get(f"{cluster.url}/api/v1/training_runs", headers=headers).json()
    assert HUB_NAME not in [r["base_model"] for r in runs["training_runs"]]
    caps = httpx.get(f"{cluster.url}/api/v1/get_server_capabilities", headers=headers).json()
    assert HUB_NAME not in [m["model_name"] for m in caps["supported_models"]]
    models = httpx.get(f"{cluster.url}/v1/models", headers=headers).json()
    assert HUB_NAME not in [m["id"] for m in models["data"]]
    run_files = Path(cluster.data_dir, "runs").glob("*/run.json")
    assert not [f for f in run_files if HUB_NAME in f.read_text()]
