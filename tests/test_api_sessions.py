"""RestClient's sessions, audit log and checkpoint storage usage on a server with keys: each
key sees its own (404 for another's), an admin key sees every key's."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from test_api_checkpoints import Keyed, keyed_server  # noqa: I001 - a sibling test module
from tinker import types

from tinkerd.config import Settings
from tinkerd.serve import EmbeddedServer

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:RestClient.search_sessions is experimental"),
]

TOKENS = [5, 17, 42, 99, 7, 23, 64, 12]
WAIT = 60


@dataclass
class Session:
    sc: tinker.ServiceClient
    session_id: str
    tc: tinker.TrainingClient
    checkpoint: str


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    yield from keyed_server(tmp_path_factory.mktemp("sessions"))


def start(keyed: Keyed, key: str, name: str, **metadata: str) -> Session:
    sc = tinker.ServiceClient(
        metadata or None, base_url=keyed.url, api_key=keyed.secrets[key], display_name=name
    )
    tc = sc.create_lora_training_client(base_model="tinkerd/tiny", rank=4, seed=0).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )
    tc.forward_backward([datum], "cross_entropy").result(timeout=WAIT)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=WAIT)
    path = tc.save_state("step-1").result(timeout=WAIT).path
    return Session(sc, tc.model_id.split(":")[0], tc, path)


@pytest.fixture(scope="module")
def sessions(keyed: Keyed) -> Iterator[dict[str, Session]]:
    found = {
        "alice": start(keyed, "alice", "nightly sweep run", team="lm"),
        "bob": start(keyed, "bob", "bob's run"),
    }
    found["alice"].tc.save_weights_and_get_sampling_client().result(timeout=WAIT)
    yield found
    for s in found.values():
        s.sc.close("success").result()


def test_each_key_lists_its_own_sessions_and_an_admin_every_one(keyed: Keyed, sessions) -> None:
    alice, bob = sessions["alice"], sessions["bob"]
    assert alice.session_id in keyed.rest("alice").list_sessions().result().sessions
    assert alice.session_id not in keyed.rest("bob").list_sessions().result().sessions
    every = keyed.rest("ops").list_sessions(limit=100).result().sessions
    assert {alice.session_id, bob.session_id} <= set(every)

    got = keyed.rest("alice").get_session(alice.session_id).result()
    assert got.training_run_ids == [alice.tc.model_id]
    assert len(got.sampler_ids) == 1 and got.sampler_ids[0].startswith(alice.session_id)
    assert got.user_metadata == {"team": "lm"} and got.display_name == "nightly sweep run"
    with pytest.raises(tinker.NotFoundError):
        keyed.rest("bob").get_session(alice.session_id).result()
    assert keyed.rest("ops").get_session(alice.session_id).result().training_run_ids
    with pytest.raises(tinker.NotFoundError):
        keyed.rest("alice").assign_session_project(bob.session_id, "theirs").result()


def test_session_search_filters_and_pages(keyed: Keyed, sessions) -> None:
    extra = [start(keyed, "alice", f"page {i}") for i in range(2)]
    try:
        rest = keyed.rest("alice")
        search = types.SessionSearchRequest
        found = rest.search_sessions(search(display_name="SWEEP nightly")).result().sessions
        assert [s.session_id for s in found] == [sessions["alice"].session_id]
        summary = found[0]
        assert summary.checkpoints_count == 1 and summary.checkpoint_storage_bytes > 0
        assert summary.status is not None and summary.status.type == "active"
        by_metadata = rest.search_sessions(search(user_metadata={"team": "lm"})).result()
        assert [s.session_id for s in by_metadata.sessions] == [sessions["alice"].session_id]
        # newest first, a page at a time; bob's session is never among alice's
        pages, request = [], search(limit=2)
        while True:
            page = rest.search_sessions(request).result()
            pages.append([s.session_id for s in page.sessions])
            if page.next_cursor is None:
                break
            request = request.model_copy(update={"cursor": page.next_cursor})
        newest = [extra[1].session_id, extra[0].session_id, sessions["alice"].session_id]
        assert pages == [newest[:2], newest[2:]]
        extra[0].sc.close("success").result()
        finished = types.ClientFinishedSessionStatusQuery(reasons=["success"])
        done = rest.search_sessions(search(statuses=[finished])).result().sessions
        assert [s.session_id for s in done] == [extra[0].session_id]
        every = keyed.rest("ops").search_sessions(
            search(owner=types.AccessibleSearchOwner(), limit=200)
        )
        assert sessions["bob"].session_id in {s.session_id for s in every.result().sessions}
        r = httpx.post(
            f"{keyed.url}/api/v1/sessions/search",
            json={"owner": {"type": "user", "owner_urns": 5}},
            headers={"X-API-Key": keyed.secrets["alice"]},
            timeout=30,
        )
        assert r.status_code == 400 and "owner_urns" in r.json()["error"]
    finally:
        extra[1].sc.close("success").result()


def test_a_session_trace_is_downloaded_through_a_signed_url(keyed: Keyed, sessions) -> None:
    alice = sessions["alice"]
    url = keyed.rest("alice").export_session_trace(alice.session_id).result()
    trace = httpx.get(url, timeout=30)  # no API key
    assert trace.status_code == 200
    events = trace.json()["traceEvents"]
    processes = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert alice.tc.model_id in processes
    steps = [e for e in events if e["name"] == "forward_backward"]
    assert steps and steps[0]["args"]["loss"] > 0 and steps[0]["ts"] > 1e15  # microseconds
    with pytest.raises(tinker.NotFoundError):
        keyed.rest("bob").export_session_trace(alice.session_id).result()
    assert httpx.get(url.replace("/downloads/", "/downloads/x"), timeout=30).status_code == 403


def test_storage_usage_by_project_and_key(keyed: Keyed, sessions) -> None:
    alice, bob = sessions["alice"], sessions["bob"]
    keyed.rest("alice").assign_session_project(alice.session_id, "research").result()
    mine = keyed.rest("alice").get_current_checkpoint_storage_usage("research").result().data
    assert [(d.project_id, d.user_name) for d in mine] == [("research", "alice")]
    assert mine[0].checkpoint_count == 1 and mine[0].size_bytes > 0
    assert mine[0].size_gigabytes == pytest.approx(mine[0].size_bytes / 1e9)
    assert keyed.rest("alice").get_current_checkpoint_storage_usage("other").result().data == []
    everything = keyed.rest("alice").get_current_checkpoint_storage_usage().result().data
    assert {d.user_name for d in everything} == {"alice"}
    every = keyed.rest("ops").get_current_checkpoint_storage_usage().result().data
    assert {(d.project_id, d.user_name) for d in every} >= {("research", "alice"), (None, "bob")}
    summary = (
        keyed.rest("alice")
        .search_sessions(types.SessionSearchRequest(project_ids=["research"]))
        .result()
        .sessions
    )
    assert [s.session_id for s in summary] == [alice.session_id]
    assert bob.session_id not in {s.session_id for s in summary}


def test_the_audit_log_is_per_key_and_whole_for_an_admin(keyed: Keyed, sessions) -> None:
    alice, bob = sessions["alice"], sessions["bob"]
    keyed.rest("alice").delete_checkpoint_from_tinker_path(
        alice.tc.save_state("doomed").result(timeout=WAIT).path
    ).result()

    def events(key: str, **params: str) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        r = keyed.get(f"audit?{query}", key)
        assert r.status_code == 200, r.text
        return r.json()["entries"]

    mine = events("alice")
    kinds = [e["event"] for e in mine]
    for event in ("session_create", "training_run_create", "checkpoint_save", "checkpoint_delete"):
        assert event in kinds, (event, kinds)
    assert {e["event_details"]["key"] for e in mine} == {"alice"}
    saved = [e for e in mine if e["event"] == "checkpoint_save"]
    assert (alice.checkpoint, alice.tc.model_id) in {
        (e["tinker_path"], e["model_id"]) for e in saved
    }
    assert not any(e["event_details"].get("model_id") == bob.tc.model_id for e in mine)
    assert {e["event"] for e in events("alice", event_type="checkpoints")} <= {
        "checkpoint_save",
        "checkpoint_delete",
    }
    assert {e["event_details"]["key"] for e in events("ops")} >= {"alice", "bob"}
    via_sdk = keyed.rest("alice").get_audit_log().result().entries
    assert [e.event for e in via_sdk] == kinds
    # the simple JSON API's adapters are training runs too
    simple = {"X-API-Key": keyed.secrets["bob"]}
    httpx.post(f"{keyed.url}/add_lora", json={"model_id": "tiny", "rank": 4}, headers=simple)
    httpx.post(f"{keyed.url}/remove_lora", json={"model_id": "tiny"}, headers=simple)
    adapters = [e for e in events("bob") if e["event_details"].get("adapter") == "tiny"]
    assert [e["event"] for e in adapters] == ["training_run_create", "training_run_unload"]
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    assert events("alice", day=yesterday) == []
    assert keyed.get("audit?day=tuesday", "alice").status_code == 400
    assert keyed.get("audit?event_type=everything", "alice").status_code == 400


def test_key_changes_are_audited_for_admins(keyed: Keyed) -> None:
    from tinkerd.cli import main

    assert main(["keys", "create", "carol", "--data-dir", str(keyed.server.settings.data_dir)]) == 0
    assert main(["keys", "revoke", "carol", "--data-dir", str(keyed.server.settings.data_dir)]) == 0
    r = keyed.get("audit?event_type=organizations", "ops")
    changes = [e for e in r.json()["entries"] if e["event"].startswith("api_key")]
    assert [(e["event"], e["event_details"]["name"]) for e in changes] == [
        ("api_key_create", "carol"),
        ("api_key_revoke", "carol"),
    ]
    assert changes[0]["event_details"]["key"].startswith("operator:")
    alice_sees = keyed.get("audit?event_type=organizations", "alice").json()["entries"]
    assert not [e for e in alice_sees if e["event"].startswith("api_key")]


def test_sessions_of_runs_from_before_a_restart_are_listed(tmp_path: Path) -> None:
    """`tinkerd serve` keeps sessions in memory: after a restart a session is known by its runs
    on disk (with its runs, no samplers), as are its audit entries (in the data directory)."""
    settings = Settings.load(port=0, data_dir=tmp_path, device="cpu", long_poll_seconds=5.0)
    server = EmbeddedServer(settings).start()
    try:
        sc = tinker.ServiceClient(base_url=server.url, api_key="tml-any")
        model_id = (
            sc.create_lora_training_client(base_model="tinkerd/tiny", rank=4).result().model_id
        )
        sc.close("success").result()
    finally:
        server.stop()
    server = EmbeddedServer(settings).start()
    try:
        rest = tinker.RestClient(base_url=server.url, api_key="tml-any")
        session_id = model_id.split(":")[0]
        assert session_id in rest.list_sessions().result().sessions
        assert rest.get_session(session_id).result().training_run_ids == [model_id]
        events = [e.event for e in rest.get_audit_log().result().entries]
        assert events[:2] == ["session_create", "training_run_create"]
    finally:
        server.stop()
