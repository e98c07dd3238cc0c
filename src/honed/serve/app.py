"""The ASGI app for a loaded run (create_app) and the process that serves it (serve): bind the
port ourselves, then uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Sequence

from ..errors import HonedError, RecipeError
from .batching import MicroBatcher, Overloaded
from .http_errors import ERROR_TYPES, HTTPError, error_body, missing_extra, validation_message
from .limits import Limits, RequestGuard, check_token
from .loaders import Served, load_run

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ModuleNotFoundError as missing:  # the `serve` extra is optional
    raise missing_extra(missing.name) from None

from .routes import ENDPOINTS  # after the check above: it needs fastapi too

log = logging.getLogger("honed.serve")


def error_response(status: int, message: str, type_: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        status, message = validation_message(list(exc.errors()))
        return error_response(status, message, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        messages = {404: "no such endpoint; see GET /v1/models and POST /v1/predict",
                    405: "method not allowed for this endpoint"}
        message = messages.get(exc.status_code) or (exc.detail if isinstance(exc.detail, str) else "request failed")
        return error_response(exc.status_code, message, ERROR_TYPES.get(exc.status_code, "invalid_request_error"),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error; the server log has the details", "server_error")

    @app.exception_handler(HTTPError)
    async def _expected(request: Request, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.type)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        return error_response(503, "the server is busy; retry shortly", "overloaded_error", headers={"retry-after": "1"})


def keyed_runs(served: Served | Sequence[Served]) -> dict[str, Served]:
    """{model id: run}; two runs with one id (folders of the same name) are a RecipeError."""
    runs: dict[str, Served] = {}
    for one in [served] if isinstance(served, Served) else list(served):
        if one.model_id in runs:
            raise RecipeError(f"RUN_DIR: two runs are both named '{one.model_id}' (the model id is the folder's name); "
                              "rename one of the folders")
        runs[one.model_id] = one
    if not runs:
        raise RecipeError("RUN_DIR: give at least one finished run directory")
    return runs


def create_app(served: Served | Sequence[Served], token: str | None = None, limits: Limits = Limits()) -> FastAPI:
    """The ASGI app for one or several loaded runs (each a model id; a request's `model` picks
    one). `token` (when given) guards every /v1 path."""
    limits.check()
    runs = keyed_runs(served)
    batchers = {model_id: MicroBatcher(one.predict, limits.batch_texts, limits.batch_wait_ms / 1000.0, limits.max_pending_texts)
                for model_id, one in runs.items() if one.task == "text-classification"}

    @asynccontextmanager
    async def lifespan(app):
        for batcher in batchers.values():
            await batcher.start()
        try:
            yield
        finally:
            for batcher in batchers.values():
                await batcher.stop()

    app = FastAPI(title="honed", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.runs = runs
    app.state.batchers = batchers
    if len(runs) == 1:  # what in-process callers of one run have always read
        app.state.served = next(iter(runs.values()))
        app.state.batcher = next(iter(batchers.values()), None)
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        cards = [{"id": one.model_id, "object": "model", "created": one.created, "owned_by": "honed",
                  "task": one.task, "labels": one.labels, "input": one.input_column,
                  "endpoints": sorted(ENDPOINTS[one.task])} for one in runs.values()]
        return {"object": "list", "data": cards}

    builders: dict[str, tuple] = {}  # path → (builder, {model id: run}): one route per path, for all its runs
    for model_id, one in runs.items():
        for path, build in ENDPOINTS[one.task].items():
            builders.setdefault(path, (build, {}))[1][model_id] = one
    for build, path_runs in builders.values():
        build(app, path_runs, limits, batchers)

    app.add_middleware(RequestGuard, token=token, max_body_bytes=limits.max_body_bytes)
    return app


# --------------------------------------------------------------------------- running it

def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so a taken port is one clear error line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise RecipeError(f"--host: '{host}' is not an address this machine can listen on; the default is 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise HonedError(f"--port: cannot listen on {host}:{port} ({exc.strerror}); choose another port with --port") from None
    sock.set_inheritable(True)
    return sock


def inference_threads(requested: int | None) -> int:
    """Intra-op threads for the model: all cores but one by default, which is left to the event
    loop (HTTP, JSON) and the tokenizer; oversubscribed cores make torch's threads wait on each other."""
    if requested is not None:
        if requested < 1:
            raise RecipeError(f"--threads: must be at least 1. Got {requested} instead.")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def serve(run_dirs: str | Path | Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          limits: Limits = Limits(), threads: int | None = None, announce=print) -> None:
    """Load the runs (one or several), bind, serve until SIGINT/SIGTERM."""
    from ..train.precision import set_threads

    token = check_token(token)
    limits.check()
    set_threads(inference_threads(threads))
    paths = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    runs = keyed_runs([load_run(path) for path in paths])
    app = create_app(list(runs.values()), token, limits)
    sock = bind(host, port)
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    if not loopback and token is None:
        announce(f"warning: listening on {host} without --token; anyone who can reach port {port} can use the model")
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                            limit_concurrency=1024, timeout_keep_alive=5, lifespan="on")
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    names = ", ".join(f"{one.model_id} ({one.task}, {len(one.labels)} labels)" if one.labels else f"{one.model_id} ({one.task})"
                      for one in runs.values())
    announce(f"serving {names} on http://{shown}:{port}{'  (bearer token required)' if token else ''}")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
