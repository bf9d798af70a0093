"""The HTTP surfaces, one blueprint each, and what every view asks of its request: the app's
Service, the caller's key, the registry as that key sees it, the audit log and the input limits.

Checking bodies is in `validation.py`, queueing requests in `queueing.py`.
"""

from __future__ import annotations

import time
from typing import Any

from flask import current_app, g

from tinkerd import audit as audit_log
from tinkerd import downloads
from tinkerd.config import InputLimits
from tinkerd.keys import ApiKey
from tinkerd.registry import Registry


def service():
    """The app's Service (settings, scheduler, registry)."""
    return current_app.extensions["tinkerd"]


def caller() -> ApiKey:
    """The API key of this request (`keys.OPEN` on a server without keys), set by the app's
    authentication before any view runs."""
    return g.api_key


def registry() -> Registry:
    """The registry as this request's key sees it: another key's records are NotFound."""
    key = caller()
    return service().registry.seen_by(key.name, key.admin)


def audit(event: str, **details: Any) -> None:
    """Record in the audit log that this request's key did `event` (`tinkerd.audit`)."""
    audit_log.record(service().audit, caller().name, event, **details)


def limits() -> InputLimits:
    """The settings' limits on datums and tokens per request."""
    return service().settings.input_limits


def download_grant(kind: str, target: str) -> downloads.Grant:
    """A signed URL's grant of `target` to this request's key, for `downloads.URL_SECONDS`."""
    key = caller()
    return downloads.Grant(kind, target, key.name, key.admin, time.time() + downloads.URL_SECONDS)
