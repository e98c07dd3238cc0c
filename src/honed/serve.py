"""`honed serve RUN_DIR`: a finished run behind HTTP (FastAPI + uvicorn).

    GET  /health        liveness, no auth: {"status": "ok"}
    GET  /v1/models     OpenAI-style list: the run (id = run directory name), its task and labels
    POST /v1/predict    {"inputs": [{"<text column>": "..."}, ...]}
                        → {"model": id, "predictions": [{"label": ..., "probabilities": {label: p}}]}

The model is loaded once, before the port is bound; a RUN_DIR that is not a finished run is
a RecipeError (exit 2). Requests that arrive together are micro-batched: the batcher collects
for up to `batch_wait_ms` or `batch_texts` texts and runs them in a single worker thread, in
forward passes padded to a few fixed shapes (so CPU kernel caches, and memory, stay bounded). Security (design §6): binds 127.0.0.1 unless told otherwise; with a token every /v1
path needs `Authorization: Bearer <token>` (constant-time compare, checked before the body is
read); the body is capped (Content-Length and while reading); every field is validated with
`extra="forbid"`; errors are `{"error": {"message", "type"}}` and never carry file paths,
stack traces or exception text.

Extension points are literal dicts: LOADERS (task → loader of a `Served`) and ENDPOINTS
(task → {path: route builder}). A chat run adds `"chat": {"/v1/chat/completions": ...}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Optional

from .errors import HonedError, RecipeError

if TYPE_CHECKING:  # for annotations only: the functions that need torch import it themselves
    import torch

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, create_model
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ModuleNotFoundError as _missing:  # the `serve` extra is optional
    raise HonedError(f"honed serve needs fastapi and uvicorn ({_missing.name} is not installed); "
                     "install them with: pip install 'honed[serve]'") from None

log = logging.getLogger("honed.serve")

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how the batcher groups work."""

    max_body_bytes: int = 1 * MIB
    max_inputs: int = 256  # inputs per request
    max_text_chars: int = 100_000  # characters per text
    batch_texts: int = 64  # the batcher stops collecting at this many texts
    batch_wait_ms: float = 5.0  # ... or after this long
    max_pending_texts: int = 8192  # texts waiting for the model; beyond → 503 (bounded memory)

    def check(self) -> None:
        for name in ("max_body_bytes", "max_inputs", "max_text_chars", "batch_texts", "max_pending_texts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RecipeError(f"serve limit '{name}' must be a positive integer. Got {value!r} instead.")
        if self.batch_wait_ms < 0:
            raise RecipeError(f"serve limit 'batch_wait_ms' must be >= 0. Got {self.batch_wait_ms!r} instead.")


@dataclass
class Served:
    """A loaded run: what the endpoints need, nothing about how it was trained."""

    model_id: str
    task: str
    labels: list[str]
    input_column: str
    created: int
    predict: Callable[[list[str]], list[dict]]  # texts → [{"label", "probabilities"}]; only ever called from the batcher's one worker thread
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- loading a run

def finished_run(run_dir: str | Path) -> tuple[Path, dict]:
    """The run directory and its model/honed.json, or a RecipeError saying what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RecipeError(f"RUN_DIR: {run_dir} does not exist; give the folder `honed run` wrote")
    if not run_dir.is_dir():
        raise RecipeError(f"RUN_DIR: {run_dir} is not a folder; give the folder `honed run` wrote")
    meta_path = run_dir / "model" / "honed.json"
    if not meta_path.is_file():
        raise RecipeError(f"RUN_DIR: {run_dir} has no model/honed.json; give a finished run directory (one `honed run` completed)")
    if not (run_dir / "metrics.json").is_file():
        raise RecipeError(f"RUN_DIR: {run_dir} has no metrics.json, so the run did not finish; "
                          f"finish it with `honed run RECIPE --out {run_dir} --resume`")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecipeError(f"RUN_DIR: {meta_path} is not readable JSON ({type(exc).__name__}); the run directory is damaged") from None
    is_chat = isinstance(meta, dict) and meta.get("task") == "chat"
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list) or (not meta["labels"] and not is_chat):
        raise RecipeError(f"RUN_DIR: {meta_path} has no 'labels' list; the run directory is damaged")
    return run_dir, meta


ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)  # rows per forward pass (CHUNK at most)
CHUNK = ROW_BUCKETS[-1]


def bucket_rows(rows: int) -> int:
    return next(b for b in ROW_BUCKETS if b >= rows)


def bucket_width(width: int, max_length: int) -> int:
    """Round a padded width up: to 8 below 64 tokens, 16 below 128, 32 below 256, then 64;
    never past the run's max_length (the model may have no positions beyond it)."""
    step = 8 if width <= 64 else 16 if width <= 128 else 32 if width <= 256 else 64
    return max(width, min(-(-width // step) * step, max_length))


def bucketed_logits(model, split, pad_id: int, max_length: int, precision: str, dev) -> torch.Tensor:
    """tc.predict_logits, with every forward pass padded to a few fixed shapes (rows from
    ROW_BUCKETS, widths from bucket_width). On CPU, oneDNN builds (JIT-compiles) a kernel for
    every new matrix shape and keeps it: a server fed every batch size × length grows by
    hundreds of MB (measured: +330 MB over 8,000 requests in bf16); with the shapes bounded its
    memory levels off. Extra rows are single-token dummies; extra columns are masked padding,
    so the real rows' logits are those of predict_logits (to float rounding)."""
    import torch

    from .models.load import logits_of
    from .tasks import text_classification as tc
    from .train.precision import autocast

    order = torch.argsort(split.lengths, descending=True, stable=True)
    out = None
    for start in range(0, len(order), CHUNK):
        idx = order[start : start + CHUNK]
        batch = tc.collate(split, idx, pad_id)
        rows, width = batch["input_ids"].shape
        shape = (bucket_rows(rows), bucket_width(width, max_length))
        input_ids = torch.full(shape, pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        input_ids[:rows, :width] = batch["input_ids"]
        attention_mask[:rows, :width] = batch["attention_mask"]
        attention_mask[rows:, 0] = 1  # dummy rows attend to one (pad) token: no empty softmax
        with autocast(precision, dev):
            logits = logits_of(model, {"input_ids": input_ids.to(dev), "attention_mask": attention_mask.to(dev)})
        logits = logits[:rows].float().cpu()
        if out is None:
            out = torch.empty((len(order), logits.shape[1]))
        out[idx] = logits
    return out


def load_text_classifier(run_dir: Path, meta: dict) -> Served:
    """The run's classifier in eval mode on the best device, in the precision the run was evaluated in."""
    import torch

    from .models.load import load_saved
    from .tasks import text_classification as tc
    from .train.precision import device as pick_device
    from .train.precision import resolve_precision

    bundle = load_saved(run_dir / "model")
    dev = pick_device()
    precision = resolve_precision(meta.get("precision", "auto"), dev)
    max_length = int(meta.get("max_length", 128))
    model = bundle.model.to(dev).eval()
    labels = [str(label) for label in bundle.labels]

    def predict(texts: list[str]) -> list[dict]:
        with torch.inference_mode():
            encoded = tc.encode(bundle, texts, None, max_length)
            logits = bucketed_logits(model, encoded, bundle.pad_id, max_length, precision, dev)
            probs = torch.softmax(logits, -1)
        best = probs.argmax(-1).tolist()
        return [{"label": labels[b], "probabilities": {label: round(p, 6) for label, p in zip(labels, row)}}
                for b, row in zip(best, probs.tolist())]

    predict(["warm-up"])  # the first forward pass pays one-off costs; not a request's latency
    created = int((run_dir / "metrics.json").stat().st_mtime)
    return Served(model_id=run_dir.resolve().name, task="text-classification", labels=labels,
                  input_column=str(meta.get("text_column", "text")), created=created, predict=predict,
                  info={"max_length": max_length, "precision": precision, "device": dev.type})


def token_usage(tokenizer, messages: list[dict], reply: str) -> dict:
    """OpenAI's `usage`: prompt tokens as the chat template renders them, and the reply's tokens."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "keys"):  # newer transformers return an encoding
        prompt = prompt["input_ids"]
    completion = len(tokenizer(reply, add_special_tokens=False)["input_ids"])
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


def load_chat_model(run_dir: Path, meta: dict) -> Served:
    """A chat run: generation goes through tasks.chat.generate_chat (one model load, thread-safe)."""
    from .models.load import load_saved
    from .tasks.chat import generate_chat

    bundle = load_saved(run_dir / "model")
    bundle.model.eval()

    def reply(messages: list[dict], max_tokens: int, temperature: float) -> tuple[str, dict]:
        text = generate_chat(bundle, messages, max_tokens=max_tokens, temperature=temperature)
        return text, token_usage(bundle.tokenizer, messages, text)

    created = int((run_dir / "metrics.json").stat().st_mtime)
    return Served(model_id=run_dir.resolve().name, task="chat", labels=[], input_column=str(meta.get("messages_column", "messages")),
                  created=created, predict=lambda texts: [], info={"reply": reply})


LOADERS: dict[str, Callable[[Path, dict], Served]] = {
    "text-classification": load_text_classifier,
    "chat": load_chat_model,
}


def load_run(run_dir: str | Path) -> Served:
    run_dir, meta = finished_run(run_dir)
    task = meta.get("task", "text-classification")
    if task not in LOADERS:
        raise RecipeError(f"RUN_DIR: the run's task '{task}' cannot be served yet; servable tasks: {', '.join(LOADERS)}")
    return LOADERS[task](run_dir, meta)


# --------------------------------------------------------------------------- errors

def error_body(message: str, type_: str) -> dict:
    return {"error": {"message": message, "type": type_}}


def error_response(status: int, message: str, type_: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_), status_code=status, headers=headers)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large", 415: "invalid_request_error", 422: "invalid_request_error", 503: "overloaded_error"}


def _where(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def validation_message(errors: list[dict]) -> tuple[int, str]:
    """Pydantic's messages name the field and the rule, never the value; JSON syntax errors are 400."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON; send a JSON object such as {\"inputs\": [...]}"
    shown = []
    for e in errors[:5]:
        where = _where(tuple(e.get("loc", ())))
        if e.get("type") == "extra_forbidden":
            shown.append(f"{where}: unknown field")
        else:
            shown.append(f"{where}: {e.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(shown) + more


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


class HTTPError(Exception):
    """An error a handler raises on purpose: its message is safe to show."""

    def __init__(self, status: int, message: str, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_ or ERROR_TYPES.get(status, "invalid_request_error")


# --------------------------------------------------------------------------- the guard (auth + body size)

class RequestGuard:
    """Pure ASGI middleware: the bearer token for /v1 paths (before the body is read), then the
    body size from Content-Length and while reading; the body is handed on already read."""

    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app = app
        self.expected = token.encode() if token else None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if self.expected is not None and (path == "/v1" or path.startswith("/v1/")):
            given = headers.get(b"authorization", b"")
            scheme, _, credentials = given.strip().partition(b" ")
            # compare_digest takes as long whatever the token given; the scheme is case-insensitive (RFC 9110)
            ok = secrets.compare_digest(credentials.strip(), self.expected) & (scheme.lower() == b"bearer")
            if not ok:
                message = "missing bearer token: send 'Authorization: Bearer <token>'" if not given else "invalid bearer token"
                return await self._reply(send, 401, message, {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._reply(send, 400, "invalid Content-Length header")
            if int(length) > self.max_body:
                return await self._reply(send, 413, self._too_large())
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return await self._reply(send, 413, self._too_large())
            if body:
                chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # waits for the disconnect, as the server's own receive does

        return await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"request body larger than the limit of {self.max_body} bytes; send fewer or shorter inputs per request"

    @staticmethod
    async def _reply(send, status: int, message: str, extra: dict | None = None) -> None:
        payload = json.dumps(error_body(message, ERROR_TYPES.get(status, "invalid_request_error"))).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status in (400, 413):
            headers.append((b"connection", b"close"))  # the rest of the body is not read
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------- the micro-batcher

class Overloaded(Exception):
    pass


class MicroBatcher:
    """Collects the texts of requests that arrive together (up to `max_texts`, or for up to
    `max_wait_s` after the first), runs `fn` once on all of them in one worker thread, and
    hands each request its slice of the results."""

    def __init__(self, fn: Callable[[list[str]], list], max_texts: int, max_wait_s: float, max_pending: int):
        self.fn = fn
        self.max_texts = max_texts
        self.max_wait_s = max_wait_s
        self.max_pending = max_pending
        self.pending = 0
        self.batches = 0
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="honed-infer")

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop(), name="honed-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.queue is not None:
            while not self.queue.empty():
                _, fut = self.queue.get_nowait()
                if not fut.done():
                    fut.set_exception(Overloaded())
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, texts: list[str]) -> list:
        if self.pending + len(texts) > self.max_pending:
            raise Overloaded()
        fut = asyncio.get_running_loop().create_future()
        self.pending += len(texts)
        try:
            await self.queue.put((texts, fut))
            return await fut
        finally:
            self.pending -= len(texts)

    async def _get_within(self, timeout: float):
        """The next queued item within `timeout`, or None; never loses an item to the timeout."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        if timeout <= 0:
            return None
        getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({getter}, timeout=timeout)
        if done:
            return getter.result()
        getter.cancel()
        try:
            return await getter  # it may have completed just before the cancel
        except asyncio.CancelledError:
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            count = len(batch[0][0])
            deadline = loop.time() + self.max_wait_s
            while count < self.max_texts:
                item = await self._get_within(deadline - loop.time())
                if item is None:
                    break
                batch.append(item)
                count += len(item[0])
            batch = [(texts, fut) for texts, fut in batch if not fut.done()]  # clients that went away
            if not batch:
                continue
            texts = [t for item, _ in batch for t in item]
            try:
                results = await loop.run_in_executor(self.executor, self.fn, texts)
            except Exception as exc:  # the handler turns this into a 500 without its text
                log.error("inference failed on a batch of %d texts", len(texts), exc_info=exc)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(RuntimeError("inference failed"))
                continue
            self.batches += 1
            start = 0
            for item, fut in batch:
                if not fut.done():
                    fut.set_result(results[start : start + len(item)])
                start += len(item)


# --------------------------------------------------------------------------- endpoints

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


def predict_route(app: FastAPI, served: Served, limits: Limits, batcher: MicroBatcher) -> None:
    """POST /v1/predict for runs whose input is one text column."""
    column = served.input_column
    item_model = create_model(
        "PredictInput",
        __config__=ConfigDict(extra="forbid"),
        text=(StrictStr, Field(..., alias=column, max_length=limits.max_text_chars)),
    )
    body_model = create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        inputs=(list[item_model], Field(..., min_length=1, max_length=limits.max_inputs)),
        model=(Optional[StrictStr], None),
    )

    async def predict(request: Request):
        body = await parse_body(request, body_model)
        if body.model is not None and body.model != served.model_id:
            raise HTTPError(404, f"model: this server serves '{served.model_id}' only; see GET /v1/models")
        texts = [item.text for item in body.inputs]
        results = await batcher.submit(texts)
        return JSONResponse({"model": served.model_id, "predictions": results})

    app.add_api_route("/v1/predict", predict, methods=["POST"])


MAX_NEW_TOKENS = 512  # the most a chat request may ask for


def chat_route(app: FastAPI, served: Served, limits: Limits, batcher: MicroBatcher) -> None:
    """POST /v1/chat/completions, compatible with the OpenAI API (non-streaming)."""
    import asyncio
    import time
    import uuid

    message_model = create_model(
        "ChatMessage", __config__=ConfigDict(extra="forbid"),
        role=(Literal["system", "user", "assistant"], ...),
        content=(StrictStr, Field(..., max_length=limits.max_text_chars)),
        name=(Optional[StrictStr], None),
    )
    body_model = create_model(
        "ChatRequest", __config__=ConfigDict(extra="forbid"),
        model=(Optional[StrictStr], None),
        messages=(list[message_model], Field(..., min_length=1, max_length=limits.max_inputs)),
        max_tokens=(Optional[int], Field(None, ge=1, le=MAX_NEW_TOKENS)),
        max_completion_tokens=(Optional[int], Field(None, ge=1, le=MAX_NEW_TOKENS)),
        temperature=(Optional[float], Field(None, ge=0, le=2)),
        n=(Optional[int], Field(None, ge=1, le=1)),
        stream=(Optional[bool], None),
        user=(Optional[StrictStr], None),
        seed=(Optional[int], None),
        top_p=(Optional[float], Field(None, gt=0, le=1)),
    )
    lock = asyncio.Lock()  # one generation at a time: the model is shared

    async def completions(request: Request):
        body = await parse_body(request, body_model)
        if body.model is not None and body.model != served.model_id:
            raise HTTPError(404, f"model: this server serves '{served.model_id}' only; see GET /v1/models")
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
}


def create_app(served: Served, token: str | None = None, limits: Limits = Limits()) -> FastAPI:
    """The ASGI app for a loaded run. `token` (when given) guards every /v1 path."""
    from contextlib import asynccontextmanager

    limits.check()
    batcher = MicroBatcher(served.predict, limits.batch_texts, limits.batch_wait_ms / 1000.0, limits.max_pending_texts)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="honed", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.served = served
    app.state.batcher = batcher
    install_error_handlers(app)

    @app.exception_handler(HTTPError)
    async def _expected(request: Request, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.type)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        return error_response(503, "the server is busy; retry shortly", "overloaded_error", headers={"retry-after": "1"})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "honed",
                "task": served.task, "labels": served.labels, "input": served.input_column,
                "endpoints": sorted(ENDPOINTS[served.task])}
        return {"object": "list", "data": [card]}

    for build in ENDPOINTS[served.task].values():
        build(app, served, limits, batcher)

    app.add_middleware(RequestGuard, token=token, max_body_bytes=limits.max_body_bytes)
    return app


# --------------------------------------------------------------------------- running it

def check_token(token: str | None) -> str | None:
    if token is None:
        return None
    if not token or any(c.isspace() or not (32 < ord(c) < 127) for c in token):
        raise RecipeError("--token (or HONED_TOKEN): must be non-empty printable ASCII without spaces; "
                          "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


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
    import os

    if requested is not None:
        if requested < 1:
            raise RecipeError(f"--threads: must be at least 1. Got {requested} instead.")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          limits: Limits = Limits(), threads: int | None = None, announce=print) -> None:
    """Load the run, bind, serve until SIGINT/SIGTERM."""
    from .train.precision import set_threads

    token = check_token(token)
    limits.check()
    set_threads(inference_threads(threads))
    served = load_run(run_dir)
    app = create_app(served, token, limits)
    sock = bind(host, port)
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    if not loopback and token is None:
        announce(f"warning: listening on {host} without --token; anyone who can reach port {port} can use the model")
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                            limit_concurrency=1024, timeout_keep_alive=5, lifespan="on")
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {served.model_id} ({served.task}, {len(served.labels)} labels) on http://{shown}:{port}"
             f"{'  (bearer token required)' if token else ''}")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
