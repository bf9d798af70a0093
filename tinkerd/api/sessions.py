"""RestClient's sessions, audit log and checkpoint storage usage.

A key sees its own sessions (an admin key every key's), as everywhere else. A session is what
`create_session` made (its key, times, tags, metadata, display name and project label), or, for
one from before a restart of `tinkerd serve` (sessions live in memory there, in Redis in a
cluster), what its training runs on disk say of it. Its trace export is a Chrome trace-event
JSON file of its runs' events (ui.perfetto.dev opens it), behind a signed URL
(`tinkerd.downloads`).
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

from flask import Blueprint, jsonify, request

from tinkerd import audit as audit_log
from tinkerd import downloads
from tinkerd.api import audit, caller, download_grant, registry, service
from tinkerd.api.validation import get_optional_str, get_str, json_body, page
from tinkerd.registry import COPY_SESSION, SIMPLE_SESSION, ModelRecord, Registry, Session
from tinkerd.storage import iso_time, sort_time
from tinkerd.types import NotFound, UserError

bp = Blueprint("sessions", __name__, url_prefix="/api/v1")

EPOCH = datetime.fromtimestamp(0, UTC)
# A session heard from within this many seconds is "active" in a search (the SDK heartbeats
# every 10 s); older and unfinished, its status is unknown (None).
ACTIVE_SECONDS = 120.0
MAX_SEARCH_LIMIT = 200


def _sessions(reg: Registry) -> dict[str, Session]:
    """Every session `reg`'s key sees by id: its records, and the sessions of its training runs
    that the records no longer hold (from before a restart of `tinkerd serve`)."""
    found = {s.session_id: s for s in reg.sessions()}
    for run in reg.runs():
        if run.session_id not in found and run.session_id not in (SIMPLE_SESSION, COPY_SESSION):
            found[run.session_id] = Session(
                run.session_id, [], {}, created_at=run.created_at, last_heartbeat=0.0,
                owner=run.owner,
            )  # fmt: skip
    return found


def _session(reg: Registry, session_id: str) -> Session:
    try:
        return reg.session(session_id)
    except NotFound:
        found = _sessions(reg).get(session_id)
        if found is None:
            raise
        return found


def _micros(iso: str) -> int:
    """An ISO time as whole microseconds since 1970: the exact order of what listings show."""
    return (datetime.fromisoformat(iso) - EPOCH) // timedelta(microseconds=1)


def _order(session: Session) -> tuple[int, str]:
    return _micros(iso_time(session.created_at)), session.session_id


def _newest_first(sessions: list[Session]) -> list[Session]:
    return sorted(sessions, key=_order, reverse=True)


def _labels(metadata: Any) -> dict[str, str] | None:
    """Stored user_metadata as the SDK's dict[str, str] (None when empty or not an object)."""
    if not isinstance(metadata, dict):
        return None
    return {str(k): str(v) for k, v in metadata.items()} or None


@bp.get("/sessions")
def list_sessions():
    limit, offset = page()
    ids = [s.session_id for s in _newest_first(list(_sessions(registry()).values()))]
    return jsonify({"sessions": ids[offset : offset + limit]})


@bp.get("/sessions/<session_id>")
def get_session(session_id: str):
    reg = registry()
    session = _session(reg, session_id)
    return jsonify(
        {
            "training_run_ids": [r.model_id for r in reg.runs() if r.session_id == session_id],
            "sampler_ids": sorted(
                s.sampler_id for s in reg.samplers() if s.session_id == session_id
            ),
            "user_metadata": _labels(session.user_metadata),
            "display_name": session.display_name,
        }
    )


@bp.put("/sessions/<session_id>/project")
def assign_session_project(session_id: str):
    """Label a session (and so its runs' checkpoints in storage usage) with a project id:
    tinkerd has no projects of its own, so any id is taken."""
    project_id = get_str(json_body(), "project_id")
    registry().set_project(session_id, project_id)
    audit("project_session_assign", session_id=session_id, project_id=project_id)
    return jsonify({})


@bp.get("/sessions/<session_id>/trace_export")
def export_session_trace(session_id: str):
    """The session's trace is built when its URL is fetched, so it is always "ready"."""
    _session(registry(), session_id)
    grant = download_grant("trace", session_id)
    url = downloads.url(request.url_root, service().settings.data_dir, grant, f"{session_id}.json")
    return jsonify({"status": "ready", "url": url})


def session_trace(reg: Registry, session_id: str) -> dict[str, Any]:
    """A Chrome trace-event document: one process per training run of the session, an instant
    event per run event (created, each forward_backward with its loss, optim steps, saves,
    loads, errors), times in microseconds."""
    session = _session(reg, session_id)
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"session {session_id}"}},
        {"name": "session created", "ph": "i", "s": "p", "pid": 0, "tid": 0,
         "ts": sort_time(session.created_at) * 1e6},
    ]  # fmt: skip
    runs = [r for r in reg.runs() if r.session_id == session_id]
    for pid, run in enumerate(runs, start=1):
        events.append(
            {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": run.model_id}}
        )
        for event in service().monitor.events(run.model_id):
            args = {k: v for k, v in event.items() if k not in ("time", "type")}
            events.append(
                {"name": str(event.get("type")), "ph": "i", "s": "t", "pid": pid, "tid": 0,
                 "ts": sort_time(event.get("time")) * 1e6, "args": args}
            )  # fmt: skip
    return {"traceEvents": events, "displayTimeUnit": "ms"}


@bp.post("/sessions/search")
def search_sessions():
    """RestClient.search_sessions: this key's sessions (`owner` "accessible" or "user": those
    an admin key sees too), filtered, newest first, a page at a time."""
    body = json_body()
    reg = registry()
    limit = body.get("limit", 50)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SEARCH_LIMIT:
        raise UserError(f"limit must be an integer in [1, {MAX_SEARCH_LIMIT}], got {limit!r}")
    _check_search(body)
    matches = [s for s in _sessions(reg).values() if _matches(s, body)]
    cursor = body.get("cursor")
    ordered = _newest_first(matches)
    if cursor is not None:
        after = _cursor_key(cursor)
        ordered = [s for s in ordered if _order(s) < after]
    shown = ordered[:limit]
    next_cursor = None
    if len(ordered) > limit:
        last = shown[-1]
        next_cursor = {
            "last_created_at": iso_time(last.created_at),
            "last_session_id": last.session_id,
        }
    runs = reg.runs()
    return jsonify({"sessions": [_summary(s, runs) for s in shown], "next_cursor": next_cursor})


def _cursor_key(cursor: Any) -> tuple[int, str]:
    try:
        when = datetime.fromisoformat(cursor["last_created_at"])
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return _micros(when.isoformat()), str(cursor["last_session_id"])
    except (TypeError, KeyError, ValueError, AttributeError):
        raise UserError("cursor must be a response's next_cursor, unchanged") from None


def _strings(body: dict[str, Any], key: str) -> list[str] | None:
    value = body.get(key)
    if value is not None and (
        not isinstance(value, list) or not all(isinstance(v, str) for v in value)
    ):
        raise UserError(f"{key} must be a list of strings")
    return value


def _check_search(body: dict[str, Any]) -> None:
    """A SessionSearchRequest's fields, type-checked before any session is looked at."""
    owner = body.get("owner") or {"type": "own"}
    if not isinstance(owner, dict) or owner.get("type") not in ("own", "accessible", "user"):
        raise UserError(f"owner must be {{type: own | accessible | user}}, got {owner!r}")
    if owner["type"] == "user":
        _strings(owner, "owner_urns")
    get_optional_str(body, "session_id")
    get_optional_str(body, "display_name")
    _strings(body, "project_ids")
    metadata = body.get("user_metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError("user_metadata must be an object of strings")
    statuses = body.get("statuses")
    if statuses is None:
        return
    if not isinstance(statuses, list) or not all(
        isinstance(q, dict) and isinstance(q.get("type"), str) for q in statuses
    ):
        raise UserError("statuses must be a list of {type, reasons?}")
    for query in statuses:
        _strings(query, "reasons")


def _matches(session: Session, body: dict[str, Any]) -> bool:
    """Whether `session` answers a (checked) SessionSearchRequest."""
    owner = body.get("owner") or {"type": "own"}
    if owner["type"] == "own" and session.owner != caller().name:
        return False
    if owner["type"] == "user" and session.owner not in (owner.get("owner_urns") or []):
        return False
    wanted_id, name = body.get("session_id"), body.get("display_name")
    if wanted_id is not None or name is not None:
        by_id = wanted_id is not None and session.session_id == wanted_id
        words = (name or "").lower().split()
        shown = (session.display_name or "").lower()
        by_name = name is not None and all(w in shown for w in words)
        if not (by_id or by_name):
            return False
    projects = body.get("project_ids")
    if projects is not None and session.project_id not in projects:
        return False
    labels = _labels(session.user_metadata) or {}
    if any(labels.get(k) != v for k, v in (body.get("user_metadata") or {}).items()):
        return False
    statuses = body.get("statuses")
    return statuses is None or any(_status_matches(session, q) for q in statuses)


def _status(session: Session) -> dict[str, Any] | None:
    """The SDK's SessionStatus: client_finished, active, or None (silent, not finished)."""
    if session.finished:
        reason = (
            session.finished
            if session.finished in ("success", "errored", "interrupted")
            else "success"
        )
        return {"type": "client_finished", "reason": {"type": reason}}
    if time.time() - session.last_heartbeat < ACTIVE_SECONDS:
        return {"type": "active"}
    return None


def _status_matches(session: Session, query: dict[str, Any]) -> bool:
    status = _status(session)
    if status is None or status["type"] != query.get("type"):
        return False
    reasons = query.get("reasons")
    return reasons is None or status["reason"]["type"] in reasons


def _summary(session: Session, runs: list[ModelRecord]) -> dict[str, Any]:
    store = service().store
    checkpoints = [
        m for r in runs if r.session_id == session.session_id for m in store.list(r.model_id)
    ]
    return {
        "session_id": session.session_id,
        "created_at": iso_time(session.created_at),
        "owner": session.owner,
        "project_id": session.project_id or "",
        "status": _status(session),
        "checkpoints_count": len(checkpoints),
        "display_name": session.display_name,
        "user_metadata": _labels(session.user_metadata),
        "checkpoint_storage_bytes": sum(
            m.size_bytes for m in checkpoints if type(m.size_bytes) is int
        ),
    }


# -- the audit log and storage usage ---------------------------------------------------------------


@bp.get("/audit")
def get_audit_log():
    """One UTC day (`day`, default today) of this key's audit entries (every key's for an admin
    key), of one resource (`event_type`: all, checkpoints, projects, teams, organizations)."""
    event_type = request.args.get("event_type", "all")
    if event_type != "all" and event_type not in audit_log.EVENT_TYPES:
        raise UserError(f"event_type must be all or one of {', '.join(audit_log.EVENT_TYPES)}")
    raw_day = request.args.get("day")
    try:
        day = date.fromisoformat(raw_day) if raw_day else datetime.now(UTC).date()
    except ValueError:
        raise UserError(f"day must be a date (YYYY-MM-DD), got {raw_day!r}") from None
    key = caller()
    entries = audit_log.entries(service().audit, day, event_type, None if key.admin else key.name)
    return jsonify({"entries": entries})


@bp.get("/billing/usage/checkpoints/current")
def checkpoint_storage_usage():
    """The checkpoints this key stores now (every key's for an admin key), by project label and
    key: their count and bytes. tinkerd bills nothing, so no rate or cost."""
    reg = registry()
    wanted = request.args.get("project_id")
    projects = {s.session_id: s.project_id for s in _sessions(reg).values()}
    groups: dict[tuple[str | None, str], list[int]] = {}
    for run in reg.runs():
        project = run.project_id or projects.get(run.session_id)
        if wanted is not None and project != wanted:
            continue
        for meta in service().store.list(run.model_id):
            size = meta.size_bytes if type(meta.size_bytes) is int and meta.size_bytes >= 0 else 0
            group = groups.setdefault((project, run.owner), [0, 0])
            group[0] += 1
            group[1] += size
    data = [
        {
            "project_id": project,
            "org_user_urn": f"tinkerd:key:{owner}" if owner else None,
            "user_name": owner or None,
            "checkpoint_count": count,
            "size_bytes": size,
            "size_gigabytes": size / 1e9,
            "estimated_monthly_cost_usd": None,
        }
        for (project, owner), (count, size) in sorted(
            groups.items(), key=lambda g: (g[0][0] or "", g[0][1])
        )
    ]
    return jsonify({"effective_rate_usd_per_gigabyte_month": None, "data": data})
