"""What `/openapi.json` says about responses: the statuses the server really returns, errors in OpenAI's shape.

FastAPI documents a 422 with its own validation body on every route that takes a body; fovea answers those
requests with OpenAI's 400 (errors.py), so `openapi_schema` replaces the 422 and drops FastAPI's validation
schemas. The routes declare their other statuses with `error_responses(...)`. A client generated from the
schema, and a fuzzer (schemathesis, tests/entrypoints/openai/test_openapi_fuzz.py), then see what a real
client sees.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from fovea.entrypoints.openai import protocol as p

_ERROR_DESCRIPTIONS = {
    400: "invalid request: a field out of range, a malformed message or content part, media that cannot be read "
         "or is not allowed, a prompt longer than max_model_len",
    401: "missing or wrong API key (only when the server runs with --api-key)",
    404: "the model is not served here",
    413: "media over a server limit (--max-media-bytes, --max-image-pixels, --max-video-frame-pixels, "
         "--max-video-frames)",
    500: "the engine stopped working",
    503: "the waiting queue is full (--max-waiting-requests), the server is stopping, or a worker process died",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with OpenAI's error body."""
    return {status: {"model": p.ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


def openapi_schema(app: FastAPI, model_names: list[str], vocab_size: int) -> dict[str, Any]:
    """The app's OpenAPI document (cached on the app) with FastAPI's 422 replaced by the 400 the server answers,
    and what this server's model allows: `model` one of `model_names` (or null), token ids below `vocab_size`."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = {"description": _ERROR_DESCRIPTIONS[400], "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        if name in components:
            components[name]["properties"]["model"]["anyOf"] = [{"type": "string", "enum": list(model_names)},
                                                                {"type": "null"}]
    _bound_token_ids(components, vocab_size)
    app.openapi_schema = schema
    return schema


def _bound_token_ids(node: Any, vocab_size: int) -> None:
    if isinstance(node, dict):
        if node.pop("x-token-id", False):
            node["maximum"] = vocab_size - 1
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)
