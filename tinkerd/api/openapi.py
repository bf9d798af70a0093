"""`GET /openapi.json`: an OpenAPI 3.1 description of tinkerd's JSON API, written by hand.

The views check their bodies with plain functions (`tinkerd.api.validation.get_int`,
`wire.decode.parse_*`), not with models a framework could read, so the description is plain data:
`openapi_schema.py` holds its builders and shared shapes, `openapi_paths.py` its route table;
each request schema states what its view accepts.
`tests/test_openapi.py` fails when a route of the app is not described, and fuzzes a live server
against this document with schemathesis. Public (no API key): it holds no user data.
"""

from __future__ import annotations

from flask import Blueprint, jsonify

import tinkerd
from tinkerd.api.openapi_paths import (
    openai_paths,
    rest_paths,
    sdk_paths,
    session_paths,
    simple_paths,
)
from tinkerd.api.openapi_schema import Schema, components

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(describe())


def describe() -> Schema:
    """The whole document, built afresh (microseconds), so no caller shares a mutable copy.
    In each group the operations that end or delete something come last, so that a fuzz run
    in the document's order reaches the others with its ids still alive."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tinkerd",
            "version": tinkerd.__version__,
            "description": "A self-hosted training service that speaks the Tinker API: the "
            "SDK's protocol under /api/v1, a simple JSON API at the root, OpenAI-compatible "
            'sampling under /v1. Errors are {"error", "category"} (OpenAI\'s shape on /v1).',
        },
        "components": {
            "schemas": components(),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{"apiKey": []}, {"bearer": []}],
        "paths": {
            **sdk_paths(),
            **rest_paths(),
            **session_paths(),
            **simple_paths(),
            **openai_paths(),
        },
    }
