"""The task endpoints: ENDPOINTS (task → {path: route builder}). A builder adds its route to the
app; the request body is validated against the task's model from schemas.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Callable

from pydantic import BaseModel, ValidationError

from ..errors import HonedError
from .batching import MicroBatcher
from .http_errors import HTTPError, missing_extra, validation_message
from .limits import Limits
from .loaders import Served
from .schemas import chat_request, classifier_request

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
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


def check_model(requested: str | None, served: Served) -> None:
    """A request may name the model; it must be the one this server serves."""
    if requested is not None and requested != served.model_id:
        raise HTTPError(404, f"model: this server serves '{served.model_id}' only; see GET /v1/models")


def predict_route(app: FastAPI, served: Served, limits: Limits, batcher: MicroBatcher) -> None:
    """POST /v1/predict for runs whose input is one text column."""
    body_model = classifier_request(served.input_column, limits.max_text_chars, limits.max_inputs)

    async def predict(request: Request):
        body = await parse_body(request, body_model)
        check_model(body.model, served)
        texts = [item.text for item in body.inputs]
        results = await batcher.submit(texts)
        return JSONResponse({"model": served.model_id, "predictions": results})

    app.add_api_route("/v1/predict", predict, methods=["POST"])


def chat_route(app: FastAPI, served: Served, limits: Limits, batcher: MicroBatcher) -> None:
    """POST /v1/chat/completions, compatible with the OpenAI API (non-streaming)."""
    body_model = chat_request(limits.max_text_chars, limits.max_inputs)
    lock = asyncio.Lock()  # one generation at a time: the model is shared

    async def completions(request: Request):
        body = await parse_body(request, body_model)
        check_model(body.model, served)
        if body.stream:
            raise HTTPError(400, "stream: streaming is not supported; send stream: false")
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens or 128
        async with lock:
            try:
                reply, usage = await asyncio.to_thread(served.info["reply"], messages, max_tokens, body.temperature or 0.0)
            except HonedError as exc:  # a prompt longer than the context, malformed turns: the client's to fix
                raise HTTPError(400, str(exc).split(" (")[0]) from None
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": served.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": usage,
        })

    app.add_api_route("/v1/chat/completions", completions, methods=["POST"])


ENDPOINTS: dict[str, dict[str, Callable[[FastAPI, Served, Limits, MicroBatcher], None]]] = {
    "text-classification": {"/v1/predict": predict_route},
    "chat": {"/v1/chat/completions": chat_route},
    "preference": {"/v1/chat/completions": chat_route},  # a preference-tuned model chats
}
