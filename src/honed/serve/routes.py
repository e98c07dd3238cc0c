"""The task endpoints: ENDPOINTS (task → {path: route builder}). A builder adds its route to the
app for the runs of its tasks ({model id: Served}); the request's `model` picks the run and the
body is validated against the task's model from schemas.py."""

from __future__ import annotations

from typing import Callable

from .batching import MicroBatcher
from .bodies import parse_body, pick_run, requested_model
from .http_errors import missing_extra
from .limits import Limits
from .loaders import Served
from .schemas import classifier_request

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
except ModuleNotFoundError as missing:  # the `serve` extra is optional
    raise missing_extra(missing.name) from None

from .chat_api import chat_route  # after the check above: it needs fastapi too


def predict_route(app: FastAPI, runs: dict[str, Served], limits: Limits, batchers: dict[str, MicroBatcher]) -> None:
    """POST /v1/predict for runs whose input is one text column; the request's model picks the run."""
    body_models = {model_id: classifier_request(served.input_column, limits.max_text_chars, limits.max_inputs)
                   for model_id, served in runs.items()}
    columns = {served.input_column for served in runs.values()}

    async def predict(request: Request):
        if len(columns) == 1:  # one body model: its errors name the field the client got wrong
            body = await parse_body(request, next(iter(body_models.values())))
            served = pick_run(body.model, runs)
        else:  # the runs read different columns: which one is known once the model is
            raw = await request.body()
            served = pick_run(requested_model(raw), runs)
            body = await parse_body(request, body_models[served.model_id])
        texts = [item.text for item in body.inputs]
        results = await batchers[served.model_id].submit(texts)
        return JSONResponse({"model": served.model_id, "predictions": results})

    app.add_api_route("/v1/predict", predict, methods=["POST"])


ENDPOINTS: dict[str, dict[str, Callable[[FastAPI, dict[str, Served], Limits, dict[str, MicroBatcher]], None]]] = {
    "text-classification": {"/v1/predict": predict_route},
    "chat": {"/v1/chat/completions": chat_route},
    "preference": {"/v1/chat/completions": chat_route},  # a preference-tuned model chats
}
