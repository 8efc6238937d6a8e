"""The api's OpenAPI document (``GET /openapi.json``): the public routes with their real request bodies.

The chat route reads its body itself (bounded decoding in ``json_body``, errors in the OpenAI shape), so
FastAPI cannot see the body's model: this module adds it, with the ``Last-Event-ID`` header and the
``last_event_id`` query parameter of the resumable routes and the OpenAI error shape of every failure, so
that a fuzzer (schemathesis in ``tests/api/test_fuzz.py``) can drive the service from the document alone.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.api.openai_schemas import ChatCompletionRequest

CHAT_PATH = "/v1/chat/completions"
EVENTS_PATH = "/v1/sessions/{session_id}/events"
_REF = "#/components/schemas/{model}"

_RESUME_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "`<session_id>:<index>` or `<index>`: resume after that event",
        "schema": {"type": "string"},
    },
    {
        "name": "last_event_id",
        "in": "query",
        "required": False,
        "description": "the same as the Last-Event-ID header (the header wins)",
        "schema": {"type": "string"},
    },
]

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (served at the app's ``openapi_url``) return :func:`build_openapi`'s
    document, built once on first request."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of the routes plus what it cannot infer (see the module docstring)."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    doc["paths"].pop("/openapi.json", None)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    request_schema = ChatCompletionRequest.model_json_schema(ref_template=_REF)
    schemas.update(request_schema.pop("$defs", {}))
    schemas["ChatCompletionRequest"] = request_schema
    schemas["Error"] = _ERROR_SCHEMA
    chat = doc["paths"][CHAT_PATH]["post"]
    chat["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ChatCompletionRequest")}}},
    }
    for operation in (chat, doc["paths"][EVENTS_PATH]["get"]):
        operation.setdefault("parameters", []).extend(_RESUME_PARAMETERS)
    error = {"description": "an error in the OpenAI shape", "content": _error_content()}
    for path in doc["paths"].values():
        for operation in path.values():
            operation["responses"].pop("422", None)  # FastAPI's own validation shape is never sent
            operation["responses"]["default"] = error
    return doc


def _error_content() -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}}
