"""The web console at `/console`: runs with live loss curves, workers, queue and checkpoints.

One HTML page, with its script and style (`tinkerd/console/`) inlined, so it needs no other
route, no CDN and no build step. It holds no data of its own: the browser fetches the JSON
routes (`/api/v1/training_runs`, `.../events`, `.../checkpoints`, `/api/v1/system/status`,
`/api/v1/healthz`) with the user's `X-API-Key`, so the page itself is served without a key.
The Content-Security-Policy allows exactly the inlined script and style (by hash) and requests
to this origin.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from flask import Blueprint, Response

bp = Blueprint("console", __name__)

ASSETS = ("console.html", "console.css", "console.js")
STYLE_SLOT = "/*STYLE*/"
SCRIPT_SLOT = "/*SCRIPT*/"


@dataclass(frozen=True)
class Page:
    html: str
    csp: str


def inline(html: str, style: str, script: str) -> Page:
    """`html` with `style` and `script` put in its slots, and the CSP that allows just those."""
    for slot in (STYLE_SLOT, SCRIPT_SLOT):
        if html.count(slot) != 1:
            raise ValueError(f"the console page must have one {slot} slot")
    for name, text, tag in (("style", style, "</style"), ("script", script, "</script")):
        if tag in text.lower():  # it would end the inline element early
            raise ValueError(f"the console's {name} contains {tag}")
    csp = "; ".join(
        [
            "default-src 'none'",
            f"script-src '{_sha256(script)}'",
            f"style-src '{_sha256(style)}'",
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return Page(html.replace(STYLE_SLOT, style).replace(SCRIPT_SLOT, script), csp)


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


@cache
def page() -> Page:
    """The page from the package's files, read once."""
    folder = resources.files("tinkerd").joinpath("console")
    html, style, script = (folder.joinpath(name).read_text("utf-8") for name in ASSETS)
    return inline(html, style, script)


@bp.get("/console")
@bp.get("/console/")
def console():
    built = page()
    response = Response(built.html, content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = built.csp
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
