"""Signed download URLs: what the SDK calls a signed URL, served by tinkerd itself.

`get_external_weights_urls`, the older SDKs' checkpoint archive route and `export_session_trace`
answer URLs that a plain GET with no API key downloads (`curl URL`), until they expire. A URL
carries its grant (what it downloads, for which key, until when) and an HMAC-SHA256 of it under
a secret of this server, so nobody can forge or stretch one:

    /api/v1/downloads/<grant, base64url JSON>.<signature>/<file name>

The secret is `<data-dir>/download.key` (32 random bytes, mode 0600), made by the first process
that needs it: every API process of a cluster shares the data directory, so each verifies what
another signed. Removing the file (and restarting) voids every URL given out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinkerd.types import Forbidden, ServerError

SECRET_FILE = "download.key"
URL_SECONDS = 3600.0  # how long a URL stays valid
PREFIX = "/api/v1/downloads/"


@dataclass(frozen=True)
class Grant:
    """What a URL downloads: `kind` (external, archive, trace), `target` (a tinker path or a
    session id), as the key `key` (with `admin` its view), until `expires` (Unix time)."""

    kind: str
    target: str
    key: str
    admin: bool
    expires: float


def _secret(data_dir: Path) -> bytes:
    path = Path(data_dir) / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # its maker may not have written it yet
            secret = path.read_bytes()
            if len(secret) == 32:
                return secret
            time.sleep(0.01)
        raise ServerError(f"{path} is not a 32-byte secret; remove it to make a new one") from None
    secret = secrets.token_bytes(32)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(data_dir: Path, grant: Grant) -> str:
    """The token of `grant`: the path component between PREFIX and the file name."""
    body = _b64(json.dumps(asdict(grant), separators=(",", ":")).encode())
    mac = hmac.new(_secret(data_dir), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def verify(data_dir: Path, token: str, now: float | None = None) -> Grant:
    """The grant a token carries; Forbidden when it was not signed here or has expired."""
    body, _, mac = token.partition(".")
    expected = hmac.new(_secret(data_dir), body.encode(), hashlib.sha256).digest()
    try:
        valid = hmac.compare_digest(_unb64(mac), expected)
        raw: Any = json.loads(_unb64(body)) if valid else None
        grant = Grant(**raw) if isinstance(raw, dict) else None
    except (ValueError, TypeError):
        grant = None
    if grant is None:
        raise Forbidden("this download URL is not valid (not signed by this server)")
    if grant.expires <= (now or time.time()):
        raise Forbidden("this download URL has expired; ask for a new one")
    return grant


def url(root: str, data_dir: Path, grant: Grant, file_name: str) -> str:
    """The full URL of `file_name` under `grant`; `root` is the server's URL as the client
    reached it (`request.url_root`)."""
    return f"{root.rstrip('/')}{PREFIX}{sign(data_dir, grant)}/{file_name}"
