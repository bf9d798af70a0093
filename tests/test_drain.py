"""SIGTERM drains `tinkerd serve` (a real process): new work is refused with a 503, the running
and queued requests finish and their results reach the clients waiting on them, a checkpoint
being saved is complete on disk, work that can never run (waiting for a seq_id that never came)
fails with a clear server error, and the process exits cleanly. No future stays pending."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
import tinker
from test_bad_input import HEADERS, PROTO, datum, fwdbwd_proto  # noqa: I001 - a sibling
from tinker import types

from tinkerd.local_cluster import serve_process

pytestmark = pytest.mark.timeout(240)


def test_sigterm_drains_embedded_server(tmp_path: Path) -> None:
    with serve_process(tmp_path) as server:
        service = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
        tc = service.create_lora_training_client(base_model="tinkerd/tiny", rank=8, seed=0).result()
        tokens = [(13 * i) % 800 + 3 for i in range(257)]
        batch = [datum(tokens)] * 32  # some work per request, so that SIGTERM finds a queue
        tc.forward_backward([datum()], "cross_entropy").result(timeout=60)  # warmed up

        # a request that can never run: it waits for seq_ids nobody sends
        stranded = httpx.post(
            f"{server.url}/api/v1/forward_backward",
            content=fwdbwd_proto(tc.model_id, 5000, [datum()]),
            headers={**HEADERS, "Content-Type": PROTO},
            timeout=30,
        ).json()["request_id"]

        futures = []
        for _ in range(4):
            futures.append(tc.forward_backward(batch, "cross_entropy"))
            futures.append(tc.optim_step(types.AdamParams(learning_rate=0.01)))
        saved = tc.save_state("before-shutdown")
        futures.append(tc.forward_backward(batch, "cross_entropy"))
        time.sleep(0.5)  # the SDK has sent them
        server.proc.send_signal(signal.SIGTERM)

        # new work is refused while the queue drains (503, JSON)
        refused = httpx.post(
            f"{server.url}/fwdbwd", json={"model_id": "late", "data": [[5, 6, 7]]}, timeout=30
        )
        assert refused.status_code == 503, refused.text
        assert refused.json()["category"] == "server"
        assert "shutting down" in refused.json()["error"]

        for future in futures:  # every queued request finished, results delivered
            future.result(timeout=120)
        path = saved.result(timeout=120).path
        assert path.startswith("tinker://")

        left = httpx.post(
            f"{server.url}/api/v1/retrieve_future",
            json={"request_id": stranded},
            headers=HEADERS,
            timeout=30,
        ).json()
        assert left["category"] == "server" and "shut down" in left["error"], left

        server.proc.wait(60)
        assert server.proc.returncode == 0, server.log_tail()

    checkpoints = list((tmp_path / "data" / "runs").rglob("before-shutdown*"))
    assert checkpoints, list((tmp_path / "data").rglob("*"))
    files = [p for c in checkpoints for p in c.rglob("*") if p.is_file()] + [
        c for c in checkpoints if c.is_file()
    ]
    assert files and all(p.stat().st_size > 0 for p in files)
    assert not [p for c in checkpoints for p in c.rglob("*.tmp*")]  # nothing half-written
