"""`honed serve RUN_DIR [RUN_DIR ...]`: finished runs behind HTTP (FastAPI + uvicorn), each a model
id (its folder name) that a request's `model` field picks.

    GET  /health        liveness, no auth: {"status": "ok"}
    GET  /v1/models     OpenAI-style list: the runs (id = run directory name), task and labels
    POST /v1/predict    {"inputs": [{"<text column>": "..."}, ...]}
                        → {"model": id, "predictions": [{"label": ..., "probabilities": {label: p}}]}
    POST /v1/chat/completions   a chat run, OpenAI-compatible, streamed as server-sent events
                        with stream: true (stop sequences, seed, n, logit_bias)

The model is loaded once, before the port is bound; a RUN_DIR that is not a finished run is
a RecipeError (exit 2). Requests that arrive together are micro-batched: the batcher collects
for up to `batch_wait_ms` or `batch_texts` texts and runs them in a single worker thread, in
forward passes padded to a few fixed shapes (so CPU kernel caches, and memory, stay bounded).
Security (design §6): binds 127.0.0.1 unless told otherwise; with a token every /v1 path needs
`Authorization: Bearer <token>` (constant-time compare, checked before the body is read); the
body is capped (Content-Length and while reading); every field is validated with
`extra="forbid"`; errors are `{"error": {"message", "type"}}` and never carry file paths,
stack traces or exception text.

Modules, one concern each (this file imports none of them, so `import honed.serve.schemas`
needs neither fastapi nor torch):

    schemas.py      the request models, one per servable task: REQUEST_SCHEMAS (pydantic only)
    http_errors.py  the error body, HTTPError, pydantic errors as one safe message
    limits.py       Limits, the bearer token, RequestGuard (auth + body size, pure ASGI)
    batching.py     MicroBatcher
    generation.py   chat generation token by token in a worker thread; stop sequences; slots
    bodies.py       a request body: JSON, validated, and the run its `model` names
    chat_api.py     POST /v1/chat/completions: replies, `n` choices, streams
    loaders.py      a finished run → Served: LOADERS (task → loader), bucketed forward passes
    routes.py       the task endpoints: ENDPOINTS (task → {path: route builder})
    app.py          create_app (the FastAPI app) and serve (bind, then uvicorn)

Extension points are literal dicts keyed by task name, with the same keys: REQUEST_SCHEMAS,
LOADERS and ENDPOINTS. Each loader checks the run metadata it needs itself.
"""
