"""Reading a request body: declared JSON, validated against a schema, and the run it names."""

from __future__ import annotations

import json

from pydantic import BaseModel, ValidationError

from .http_errors import HTTPError, missing_extra, validation_message
from .loaders import Served

try:
    from fastapi import Request
except ModuleNotFoundError as missing:  # the `serve` extra is optional
    raise missing_extra(missing.name) from None


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The body as `model`: 415 unless it is declared JSON (a web page cannot send that to a
    loopback server without a CORS preflight, which this server never grants), 400 for bad JSON,
    422 for bad fields."""
    if not is_json(request.headers.get("content-type", "")):
        raise HTTPError(415, "Content-Type must be application/json")
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        status, message = validation_message(exc.errors(include_input=False, include_url=False))
        raise HTTPError(status, message) from None


def pick_run(requested: str | None, runs: dict[str, Served]) -> Served:
    """The run a request names in `model`; the only one when it names none and there is one."""
    if requested is None:
        if len(runs) == 1:
            return next(iter(runs.values()))
        raise HTTPError(400, f"model: this server serves several models here ({', '.join(sorted(runs))}); name one in 'model'")
    if requested not in runs:
        raise HTTPError(404, f"model: this server serves {', '.join(repr(m) for m in sorted(runs))} here; see GET /v1/models")
    return runs[requested]


def requested_model(raw: bytes) -> str | None:
    """The body's `model` field, read before the body is validated against that model's schema."""
    try:
        value = json.loads(raw).get("model")
    except (ValueError, AttributeError):
        raise HTTPError(400, "the request body is not a JSON object") from None
    if value is not None and not isinstance(value, str):
        raise HTTPError(422, "model: must be a string")
    return value
