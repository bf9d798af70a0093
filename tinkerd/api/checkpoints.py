"""What RestClient does to one checkpoint besides listing and deleting it: publish and unpublish,
set its TTL, copy it, and download it through signed URLs (external weights, the older SDKs'
archive), plus `GET /api/v1/downloads/...`, which serves those URLs without an API key.

Publishing is the one sanctioned crossing of tenant isolation: every key may then read the
checkpoint (load it, sample from it, download it, copy it), never list, change or delete it;
only the key that owns its run publishes, unpublishes or sets its TTL.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from flask import Blueprint, Response, jsonify, request, send_file

from tinkerd import audit as audit_log
from tinkerd import downloads
from tinkerd.api import audit, caller, download_grant, registry, service
from tinkerd.api.sessions import session_trace
from tinkerd.api.validation import get_int, get_str, get_ttl_seconds, json_body
from tinkerd.api.weights import checkpoint_meta
from tinkerd.base_models import resolve_base_model
from tinkerd.registry import COPY_SESSION, ModelRecord
from tinkerd.storage import META_FILE, CheckpointMeta, CheckpointPath, iso_time
from tinkerd.types import LoraConfig, NotFound, UserError

bp = Blueprint("checkpoints", __name__, url_prefix="/api/v1")

CHECKPOINT = "/training_runs/<run_id>/checkpoints/<kind>/<name>"
OPTIMIZER_FILE = "optimizer.pt"  # checkpoint_io.OPTIMIZER_STATE (that module imports torch)
COMPLETE_MARKER = "checkpoint_complete"  # what the SDK's `tinker checkpoint download` checks
_CHUNK = 1 << 20


def _owned(run_id: str, kind: str, name: str) -> tuple[CheckpointPath, CheckpointMeta]:
    """A checkpoint of a run this very key owns (not an admin's view of another key's: only the
    owner publishes or sets a TTL); NotFound otherwise, as for one that does not exist."""
    path = CheckpointPath.parse(f"tinker://{run_id}/{kind}/{name}")
    try:
        run = registry().run(run_id)
    except NotFound:
        run = None
    if run is None or run.owner != caller().name:
        raise NotFound(f"checkpoint {path} not found")
    return path, service().store.meta(path)


@bp.post(f"{CHECKPOINT}/publish")
def publish(run_id: str, kind: str, name: str):
    return _set_public(run_id, kind, name, True)


@bp.delete(f"{CHECKPOINT}/publish")
def unpublish(run_id: str, kind: str, name: str):
    return _set_public(run_id, kind, name, False)


def _set_public(run_id: str, kind: str, name: str, public: bool) -> Response:
    """Publish or unpublish; 409 when it already is what was asked (as Tinker answers)."""
    path, meta = _owned(run_id, kind, name)
    if (meta.public is True) == public:
        raise UserError(f"checkpoint {path} is already {'public' if public else 'private'}", 409)
    service().store.update(path, public=public)
    audit("checkpoint_publish" if public else "checkpoint_unpublish", tinker_path=str(path))
    return jsonify({})


@bp.put(f"{CHECKPOINT}/ttl")
def set_ttl(run_id: str, kind: str, name: str):
    """`ttl_seconds` from now, or null: never expires."""
    path, _ = _owned(run_id, kind, name)
    body = json_body()
    if "ttl_seconds" not in body:
        raise UserError("give ttl_seconds: a number of seconds from now, or null for no expiry")
    ttl = get_ttl_seconds(body)
    expires_at = None if ttl is None else time.time() + ttl
    service().store.update(path, expires_at=expires_at)
    audit("checkpoint_ttl_set", tinker_path=str(path), model_id=run_id, ttl_seconds=ttl)
    expires = None if expires_at is None else iso_time(expires_at)
    return jsonify({"tinker_path": str(path), "expires_at": expires})


# -- copies ----------------------------------------------------------------------------------------


@bp.post("/copy_weights")
def copy_weights():
    """A copy of a checkpoint this key may read (its own, or a published one), as a new training
    run of this key's that cannot be trained on: `{session_id}:train:{model_seq_id}` when the
    request names them, else `copy:<16 hex>` labelled with `destination_project_id`. Files are
    hard-linked, not duplicated. A retry (same X-Idempotency-Key) answers the same copy."""
    body = json_body()
    source, meta = checkpoint_meta(body.get("source_path"), "copy")
    ttl = get_ttl_seconds(body)
    project = body.get("destination_project_id")
    if body.get("session_id") is not None:
        session = registry().session(get_str(body, "session_id"))
        run_id = f"{session.session_id}:train:{get_int(body, 'model_seq_id')}"
        session_id = session.session_id
    elif isinstance(project, str) and project:
        token = request.headers.get("X-Idempotency-Key") or uuid.uuid4().hex
        digest = hashlib.sha256(f"{caller().name}/{token}".encode()).hexdigest()
        run_id, session_id = f"{COPY_SESSION}:{digest[:16]}", COPY_SESSION
    else:
        raise UserError("give destination_project_id, or session_id and model_seq_id")
    path = CheckpointPath(run_id, source.kind, source.name)
    svc = service()
    if svc.registry.exists("run", run_id) or svc.registry.exists("model", run_id):
        copied = registry().run(run_id)  # NotFound: another key's
        if copied.user_metadata.get("copied_from") != str(source):
            raise UserError(f"training run {run_id} already exists; copy into another slot")
        return jsonify({"tinker_path": str(path)})  # a retry of this copy
    record = ModelRecord(
        run_id,
        session_id,
        meta.base_model,
        resolve_base_model(meta.base_model, svc.settings.data_dir).tokenizer_id,
        LoraConfig(**meta.lora),
        {"copied_from": str(source)},
        project_id=project if isinstance(project, str) else None,
    )
    registry().add_run(record)
    now = time.time()
    copy = CheckpointMeta(
        str(path),
        source.kind,
        run_id,
        meta.base_model,
        meta.lora,
        created_at=now,
        expires_at=None if ttl is None else now + ttl,
        user_metadata=meta.user_metadata,
        has_optimizer=meta.has_optimizer,
    )
    svc.store.copy(source, copy)
    audit("checkpoint_copy", tinker_path=str(path), model_id=run_id, source_path=str(source))
    return jsonify({"tinker_path": str(path)})


# -- downloads ------------------------------------------------------------------------------------


def _listing(directory: Path) -> list[Path]:
    """The files of a checkpoint's directory, hidden ones left out; OSError when it is gone."""
    return [f for f in sorted(directory.iterdir()) if not f.name.startswith(".") and f.is_file()]


def _files(directory: Path) -> list[Path]:
    """A checkpoint's own files: the PEFT adapter (and optimizer state), not tinkerd's record."""
    try:
        return [f for f in _listing(directory) if f.name != META_FILE]
    except OSError:
        return []


@bp.get(f"{CHECKPOINT}/external_weights_urls")
def external_weights_urls(run_id: str, kind: str, name: str):
    """A signed URL per file of an external weights checkpoint (a Hugging Face PEFT adapter
    directory), served by this server, valid for an hour."""
    if kind != "external_weights":
        raise UserError(
            "get_external_weights_urls takes an external weights checkpoint "
            "(tinker://<run>/external_weights/<name>, from save_weights_external)"
        )
    path, _ = checkpoint_meta(f"tinker://{run_id}/{kind}/{name}")
    grant = download_grant("external", str(path))
    root, data_dir = request.url_root, service().settings.data_dir
    files = _files(service().store.directory(path))
    return jsonify(
        {
            "urls": {f.name: downloads.url(root, data_dir, grant, f.name) for f in files},
            "expires": iso_time(grant.expires),
        }
    )


@bp.get(f"{CHECKPOINT}/archive")
def archive_url(run_id: str, kind: str, name: str):
    """The older SDKs' `get_checkpoint_archive_url`: a signed URL to the checkpoint as a tar of
    its adapter files and a `checkpoint_complete` marker (the layout their `tinker checkpoint
    download` checks), without the optimizer state."""
    path, _ = checkpoint_meta(f"tinker://{run_id}/{kind}/{name}")
    grant = download_grant("archive", str(path))
    url = downloads.url(request.url_root, service().settings.data_dir, grant, file_name_of(path))
    return jsonify({"url": url, "expires": iso_time(grant.expires)})


@bp.get(f"{downloads.PREFIX.removeprefix('/api/v1')}<token>/<file_name>")
def download(token: str, file_name: str):
    """A signed URL's file (no API key: the signature is the grant). The grant's key must still
    be able to read what it names: a checkpoint deleted, expired or unpublished since is 404."""
    svc = service()
    grant = downloads.verify(svc.settings.data_dir, token)
    reg = svc.registry.seen_by(grant.key, grant.admin)
    if grant.kind == "trace":
        response = jsonify(session_trace(reg, grant.target))
        response.headers["Content-Disposition"] = f'attachment; filename="{file_name}"'
        return response
    path = CheckpointPath.parse(grant.target)
    try:
        owner_run = reg.run(path.model_id)
    except NotFound:
        owner_run = None
    meta = svc.store.meta(path)
    if owner_run is None and meta.public is not True:
        raise NotFound(f"checkpoint {path} not found")
    audit_log.record(
        svc.audit, grant.key, "checkpoint_read", tinker_path=str(path), purpose="download"
    )
    directory = svc.store.directory(path)
    if grant.kind == "external":
        chosen = [f for f in _files(directory) if f.name == file_name]
        if not chosen:
            raise NotFound(f"{path} has no file {file_name!r}")
        return send_file(chosen[0], as_attachment=True, download_name=file_name)
    files = [f for f in _files(directory) if f.name != OPTIMIZER_FILE]
    return tar_response(path, files, "", file_name, marker=COMPLETE_MARKER)


def tar_response(
    path: CheckpointPath,
    files: list[Path],
    prefix: str,
    file_name: str,
    marker: str | None = None,
) -> Response:
    """`files` as an uncompressed tar stream, each under `prefix`, and an empty `marker` file
    last when given. The files are opened before the answer starts, so a delete cannot cut the
    stream; a checkpoint whose files are gone is 404."""
    members: list[tuple[bytes, IO[bytes] | None, int]] = []
    opened: list[IO[bytes]] = []
    try:
        for f in files:
            fh: IO[bytes] = open(f, "rb")  # noqa: SIM115 - closed when the response closes
            opened.append(fh)
            stat = os.fstat(fh.fileno())
            info = tarfile.TarInfo(f"{prefix}{f.name}")
            info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
            members.append((info.tobuf(tarfile.GNU_FORMAT), fh, info.size))
    except OSError:
        for fh in opened:
            fh.close()
        raise NotFound(f"checkpoint {path} not found") from None
    if marker is not None:
        info = tarfile.TarInfo(f"{prefix}{marker}")
        info.mtime, info.mode = int(time.time()), 0o644
        members.append((info.tobuf(tarfile.GNU_FORMAT), None, 0))

    def stream() -> Iterator[bytes]:
        for header, fh, size in members:
            yield header
            left = size
            while fh is not None and left > 0:
                chunk = fh.read(min(_CHUNK, left))
                if not chunk:
                    raise OSError(f"{fh.name} shrank while it was sent")
                left -= len(chunk)
                yield chunk
            yield b"\0" * (-size % tarfile.BLOCKSIZE)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end of archive

    length = sum(len(h) + size + (-size % tarfile.BLOCKSIZE) for h, _, size in members)
    response = Response(stream(), mimetype="application/x-tar")
    response.headers["Content-Length"] = str(length + 2 * tarfile.BLOCKSIZE)
    response.headers["Content-Disposition"] = f'attachment; filename="{file_name}"'
    response.call_on_close(lambda: [fh.close() for fh in opened])
    return response


def checkpoint_files(path: CheckpointPath, directory: Path, with_optimizer: bool) -> list[Path]:
    """What `tinkerd export` downloads of a checkpoint: the adapter and tinkerd.json, and the
    optimizer state when asked; NotFound when its directory is gone."""
    try:
        found = _listing(directory)
    except OSError:
        raise NotFound(f"checkpoint {path} not found") from None
    return [f for f in found if with_optimizer or f.name != OPTIMIZER_FILE]


def file_name_of(path: CheckpointPath) -> str:
    """A download's file name: the checkpoint's path, in characters any filesystem takes."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{path.model_id}-{path.kind}-{path.name}.tar")
