"""One checkpoint's REST beyond list and delete, on a server with keys: publishing (the one
crossing of tenant isolation, tested both ways), TTL, copies, external weights and the signed
URLs tinkerd serves for them, the older SDKs' archive route and unload_model."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from tinkerd.config import Settings
from tinkerd.keys import FileKeys, create_key
from tinkerd.serve import EmbeddedServer

pytestmark = pytest.mark.timeout(240)

TOKENS = [5, 17, 42, 99, 7, 23, 64, 12]
WAIT = 60


@dataclass
class Keyed:
    """A `tinkerd serve` with keys alice, bob and ops (an admin); shared by test_api_sessions."""

    url: str
    secrets: dict[str, str]
    server: EmbeddedServer

    def sdk(self, key: str) -> tinker.ServiceClient:
        return tinker.ServiceClient(base_url=self.url, api_key=self.secrets[key])

    def rest(self, key: str) -> tinker.RestClient:
        return tinker.RestClient(base_url=self.url, api_key=self.secrets[key])

    def call(self, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response:
        headers = {"X-API-Key": self.secrets[key]}
        url = f"{self.url}/api/v1/{path}"
        return httpx.request(method, url, headers=headers, timeout=60, **kwargs)

    def get(self, path: str, key: str) -> httpx.Response:
        return self.call("GET", path, key)


def keyed_server(data_dir: Path) -> Iterator[Keyed]:
    """The server of a module's `keyed` fixture, stopped when the module is done."""
    store = FileKeys(data_dir)
    names = ("alice", "bob", "ops")
    secrets = {name: create_key(store, name, admin=name == "ops")[0] for name in names}
    settings = Settings.load(port=0, data_dir=data_dir, device="cpu", long_poll_seconds=5.0)
    server = EmbeddedServer(settings).start()
    try:
        yield Keyed(server.url, secrets, server)
    finally:
        server.stop()


@dataclass
class Trained:
    """A run of alice's with a checkpoint of each kind, saved at the same step."""

    tc: tinker.TrainingClient
    state: str
    sampler: str
    external: str


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    yield from keyed_server(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def alice(keyed: Keyed) -> Iterator[Trained]:
    sc = keyed.sdk("alice")
    tc = sc.create_lora_training_client(base_model="tinkerd/tiny", rank=4, seed=0).result()
    tc.forward_backward([datum()], "cross_entropy").result(timeout=WAIT)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=WAIT)
    state = tc.save_state("state").result(timeout=WAIT).path
    sampler = tc.save_weights_for_sampler("sampler").result(timeout=WAIT).path
    external = tc.save_weights_external("external").result(timeout=WAIT).path
    yield Trained(tc, state, sampler, external)
    sc.close("success").result()


def datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )


def one(path: str) -> str:
    """The REST path of one checkpoint: training_runs/<run>/checkpoints/<kind>/<name>."""
    run, kind, name = path.removeprefix("tinker://").split("/")
    return f"training_runs/{run}/checkpoints/{kind}/{name}"


def listed(keyed: Keyed, key: str, path: str) -> dict[str, Any]:
    run = path.removeprefix("tinker://").split("/")[0]
    r = keyed.call("GET", f"training_runs/{run}/checkpoints", key)
    assert r.status_code == 200, r.text
    [found] = [c for c in r.json()["checkpoints"] if c["tinker_path"] == path]
    return found


def sample(client: tinker.SamplingClient) -> list[int]:
    params = types.SamplingParams(max_tokens=4, seed=7, temperature=0.0)
    out = client.sample(types.ModelInput.from_ints(TOKENS), 1, params).result(timeout=WAIT)
    return list(out.sequences[0].tokens)


def audit(keyed: Keyed, key: str, event_type: str = "all") -> list[dict[str, Any]]:
    r = keyed.call("GET", f"audit?event_type={event_type}", key)
    assert r.status_code == 200, r.text
    return r.json()["entries"]


# -- publishing ------------------------------------------------------------------------------------


def test_another_key_reads_a_checkpoint_only_while_it_is_published(keyed: Keyed, alice: Trained):
    bob = keyed.sdk("bob")
    try:
        # before: every read of alice's checkpoints is the 404 of one that does not exist
        with pytest.raises(tinker.NotFoundError):
            bob.create_sampling_client(model_path=alice.sampler).result(timeout=WAIT)
        with pytest.raises(tinker.NotFoundError):
            bob.create_training_client_from_state(alice.state).result(timeout=WAIT)
        for path in (alice.sampler, alice.state):
            r = keyed.call("POST", "weights_info", "bob", json={"tinker_path": path})
            assert r.status_code == 404, r.text
        assert keyed.call("POST", f"{one(alice.sampler)}/publish", "bob").status_code == 404

        rest = keyed.rest("alice")
        for path in (alice.sampler, alice.state):
            rest.publish_checkpoint_from_tinker_path(path).result()
            assert listed(keyed, "alice", path)["public"] is True
        again = keyed.call("POST", f"{one(alice.sampler)}/publish", "alice")
        assert again.status_code == 409 and "already public" in again.json()["error"]

        # published: bob samples from it and trains from it, the same weights alice samples
        theirs = bob.create_sampling_client(model_path=alice.sampler).result(timeout=WAIT)
        mine = keyed.sdk("alice").create_sampling_client(model_path=alice.sampler).result(WAIT)
        assert sample(theirs) == sample(mine)
        copied = bob.create_training_client_from_state(alice.state).result(timeout=WAIT)
        assert copied.forward_backward([datum()], "cross_entropy").result(timeout=WAIT).metrics
        info = keyed.call("POST", "weights_info", "bob", json={"tinker_path": alice.state})
        assert info.status_code == 200 and info.json()["lora_rank"] == 4
        # ... but never lists, changes or deletes it
        run = alice.tc.model_id
        assert keyed.call("GET", f"training_runs/{run}/checkpoints", "bob").status_code == 404
        for method, suffix, body in (
            ("DELETE", "", None),
            ("DELETE", "/publish", None),
            ("PUT", "/ttl", {"ttl_seconds": 60}),
        ):
            r = keyed.call(method, one(alice.sampler) + suffix, "bob", json=body)
            assert r.status_code == 404, (method, suffix, r.text)

        # unpublished: gone for bob again, his open sampling session included
        rest.unpublish_checkpoint_from_tinker_path(alice.sampler).result()
        assert listed(keyed, "alice", alice.sampler)["public"] is False
        with pytest.raises(tinker.NotFoundError):
            bob.create_sampling_client(model_path=alice.sampler).result(timeout=WAIT)
        with pytest.raises(Exception, match="not found"):
            sample(theirs)
        again = keyed.call("DELETE", f"{one(alice.sampler)}/publish", "alice")
        assert again.status_code == 409 and "already private" in again.json()["error"]
        assert sample(mine)  # alice's own reads never depended on it

        reads = [e for e in audit(keyed, "bob", "checkpoints") if e["event"] == "checkpoint_read"]
        assert {(e["tinker_path"], e["purpose"]) for e in reads} == {
            (alice.sampler, "sample"),
            (alice.state, "load"),
        }
        published = [e["event"] for e in audit(keyed, "alice", "checkpoints")]
        assert published.count("checkpoint_publish") == 2 and "checkpoint_unpublish" in published
    finally:
        bob.close("success").result()
        keyed.call("DELETE", f"{one(alice.state)}/publish", "alice")  # raw: no 409 retries


# -- TTL -------------------------------------------------------------------------------------------


def test_a_checkpoint_ttl_is_set_removed_and_checked(keyed: Keyed, alice: Trained) -> None:
    path = alice.tc.save_state("ttl").result(timeout=WAIT).path
    rest = keyed.rest("alice")
    rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
    expires = listed(keyed, "alice", path)["expires_at"]
    assert expires is not None and abs(_seconds_from_now(expires) - 3600) < 60
    rest.set_checkpoint_ttl_from_tinker_path(path, None).result()
    assert listed(keyed, "alice", path)["expires_at"] is None
    for bad in ({"ttl_seconds": 0}, {"ttl_seconds": "day"}, {"ttl_seconds": 1e300}, {}):
        r = keyed.call("PUT", f"{one(path)}/ttl", "alice", json=bad)
        assert r.status_code == 400 and "ttl_seconds" in r.json()["error"], (bad, r.text)
    assert listed(keyed, "alice", path)["expires_at"] is None  # a refused change changes nothing
    rest.set_checkpoint_ttl_from_tinker_path(path, 1).result()
    time.sleep(1.2)
    r = keyed.call("POST", "weights_info", "alice", json={"tinker_path": path})
    assert r.status_code == 404 and "expired" in r.json()["error"]
    entries = [e for e in audit(keyed, "alice") if e["event"] == "checkpoint_ttl_set"]
    assert [e["event_details"]["ttl_seconds"] for e in entries[-3:]] == [3600, None, 1]


def _seconds_from_now(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp() - time.time()


# -- external weights and signed URLs --------------------------------------------------------------


def test_external_weights_download_through_signed_urls(keyed: Keyed, alice: Trained) -> None:
    entry = listed(keyed, "alice", alice.external)
    assert entry["checkpoint_type"] == "external" and entry["checkpoint_id"].startswith(
        "external_weights/"
    )
    urls = keyed.rest("alice").get_external_weights_urls(alice.external).result()
    assert set(urls.urls) == {"adapter_config.json", "adapter_model.safetensors"}
    assert urls.expires.timestamp() > time.time() + 3000
    downloaded = {name: httpx.get(url, timeout=30) for name, url in urls.urls.items()}  # no key
    assert all(r.status_code == 200 for r in downloaded.values())
    # the same adapter as the sampler checkpoint saved at the same step
    sampler_dir = keyed.server.store.directory(_parsed(alice.sampler))
    assert (
        downloaded["adapter_model.safetensors"].content
        == (sampler_dir / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads(downloaded["adapter_config.json"].content)
    assert config["r"] == 4 and config["peft_type"] == "LORA"

    url = urls.urls["adapter_config.json"]
    token = url.split("/downloads/")[1].split("/")[0]
    forged = url.replace(token, token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
    assert httpx.get(forged, timeout=30).status_code == 403
    other = url.rsplit("/", 1)[0] + "/optimizer.pt"
    assert httpx.get(other, timeout=30).status_code == 404
    assert (
        keyed.call("GET", f"{one(alice.external)}/external_weights_urls", "bob").status_code == 404
    )
    # published, bob gets URLs too; they stop working when it is unpublished, URLs or not
    keyed.rest("alice").publish_checkpoint_from_tinker_path(alice.external).result()
    bobs = keyed.rest("bob").get_external_weights_urls(alice.external).result().urls
    assert httpx.get(bobs["adapter_config.json"], timeout=30).status_code == 200
    keyed.rest("alice").unpublish_checkpoint_from_tinker_path(alice.external).result()
    assert httpx.get(bobs["adapter_config.json"], timeout=30).status_code == 404
    assert httpx.get(url, timeout=30).status_code == 200  # alice's own still work
    r = keyed.call("GET", f"{one(alice.state)}/external_weights_urls", "alice")
    assert r.status_code == 400 and "external_weights" in r.json()["error"]


def test_a_signed_url_expires_and_names_what_it_grants(tmp_path: Path) -> None:
    from tinkerd import downloads

    grant = downloads.Grant("external", "tinker://m/external_weights/x", "alice", False, 100.0)
    token = downloads.sign(tmp_path, grant)
    assert downloads.verify(tmp_path, token, now=99.0) == grant
    with pytest.raises(downloads.Forbidden, match="expired"):
        downloads.verify(tmp_path, token, now=100.0)
    _, _, mac = token.partition(".")
    longer = {**dataclasses.asdict(grant), "expires": 1e12}  # the same grant, stretched
    body = base64.urlsafe_b64encode(json.dumps(longer).encode()).decode().rstrip("=")
    with pytest.raises(downloads.Forbidden, match="not valid"):
        downloads.verify(tmp_path, f"{body}.{mac}", now=0)
    (tmp_path / "other").mkdir()
    elsewhere = downloads.sign(tmp_path / "other", grant)  # another server's secret
    with pytest.raises(downloads.Forbidden, match="not valid"):
        downloads.verify(tmp_path, elsewhere, now=0)
    assert os.stat(tmp_path / downloads.SECRET_FILE).st_mode & 0o777 == 0o600


def test_the_older_sdks_archive_route(keyed: Keyed, alice: Trained) -> None:
    """SDK 0.31's get_checkpoint_archive_url takes a 200 {url, expires}; the tar at the URL
    holds the adapter files and checkpoint_complete at its root, never the optimizer state."""
    r = keyed.call("GET", f"{one(alice.state)}/archive", "alice")
    assert r.status_code == 200, r.text
    body = r.json()
    tar = httpx.get(body["url"], timeout=30)
    assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        names = archive.getnames()
    assert sorted(names) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint_complete",
    ]
    assert keyed.call("GET", f"{one(alice.state)}/archive", "bob").status_code == 404


# -- copies ----------------------------------------------------------------------------------------


def test_copies_are_runs_of_the_copying_key(keyed: Keyed, alice: Trained) -> None:
    copy = keyed.rest("alice").copy_weights(alice.state, "archive").result()
    run, kind, name = copy.removeprefix("tinker://").split("/")
    assert run.startswith("copy:") and (kind, name) == ("weights", "state")
    assert "copy" not in keyed.rest("alice").list_sessions().result().sessions  # no session
    source_dir = keyed.server.store.directory(_parsed(alice.state))
    copy_dir = keyed.server.store.directory(_parsed(copy))
    weights = "adapter_model.safetensors"
    assert os.stat(copy_dir / weights).st_ino == os.stat(source_dir / weights).st_ino  # linked
    assert listed(keyed, "alice", copy)["public"] is False
    r = keyed.call(
        "POST", "load_weights", "alice", json={"model_id": run, "seq_id": 1, "path": copy}
    )
    assert r.status_code == 404  # a copy cannot be trained on
    usage = keyed.call("GET", "billing/usage/checkpoints/current?project_id=archive", "alice")
    assert usage.json()["data"][0]["checkpoint_count"] == 1

    with pytest.raises(tinker.NotFoundError):  # not published: bob cannot copy it
        keyed.rest("bob").copy_weights(alice.sampler, "theirs").result()
    keyed.rest("alice").publish_checkpoint_from_tinker_path(alice.sampler).result()
    try:
        theirs = keyed.rest("bob").copy_weights(alice.sampler, "theirs").result()
    finally:
        keyed.rest("alice").unpublish_checkpoint_from_tinker_path(alice.sampler).result()
    bob_run = theirs.removeprefix("tinker://").split("/")[0]
    assert listed(keyed, "bob", theirs)["checkpoint_type"] == "sampler"  # bob's, and it stays
    assert keyed.call("GET", f"training_runs/{bob_run}", "alice").status_code == 404


def _parsed(path: str):
    from tinkerd.storage import CheckpointPath

    return CheckpointPath.parse(path)


# -- unload_model ----------------------------------------------------------------------------------


def test_unload_model_frees_a_model_and_keeps_its_run(keyed: Keyed) -> None:
    sc = keyed.sdk("alice")
    try:
        tc = sc.create_lora_training_client(base_model="tinkerd/tiny", rank=4).result()
        path = tc.save_state("before-unload").result(timeout=WAIT).path
        assert (
            keyed.call("POST", "unload_model", "bob", json={"model_id": tc.model_id}).status_code
            == 404
        )
        r = keyed.call("POST", "unload_model", "alice", json={"model_id": tc.model_id})
        assert r.status_code == 200, r.text
        result = _settle(keyed, r.json()["request_id"])
        assert result["model_id"] == tc.model_id
        assert (
            keyed.call("POST", "get_info", "alice", json={"model_id": tc.model_id}).status_code
            == 404
        )
        assert tc.model_id not in keyed.server.backend.held()["models"]
        assert keyed.call("GET", f"training_runs/{tc.model_id}", "alice").status_code == 200
        resumed = sc.create_training_client_from_state(path).result(timeout=WAIT)
        assert resumed.forward([datum()], "cross_entropy").result(timeout=WAIT).metrics
    finally:
        sc.close("success").result()


def _settle(keyed: Keyed, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        r = keyed.call("POST", "retrieve_future", "alice", json={"request_id": request_id})
        if r.json().get("type") != "try_again":
            return r.json()
    raise AssertionError(f"{request_id} never settled")
